"""One process of the multi-host test (and the shared problem of tests/test_train_step.py).

Run by the test as 2 processes x 4 CPU devices with jax.distributed on 127.0.0.1:
  python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=PORT --out=FILE
"""

import argparse
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import advantages, losses, models, sharding
from grpo_jax import train_step as ts

MODEL = models.get_config("tiny_qwen2")
P, G, TP, C = 4, 4, 6, 8  # prompts, group size, prompt and completion lengths
OPTIM = ts.OptimConfig(learning_rate=1e-3, eps=1e-3, max_grad_norm=1.0, weight_decay=0.01)
LOSS = losses.LossConfig(beta=0.04, loss_type="dapo", epsilon_high=0.28)


def subprocess_env(num_devices: int) -> dict:
  """os.environ for a test's JAX subprocess on `num_devices` simulated CPU devices: the XLA flags
  and compilation cache of conftest.py are kept, only the device count is replaced."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"{flags.strip()} --xla_force_host_platform_device_count={num_devices}")


def make_batch(seed: int = 0) -> ts.TrainBatch:
  """A deterministic rollout batch: left-padded prompts, ragged completions, group advantages."""
  rng = np.random.default_rng(seed)
  B = P * G
  prompt_tokens = rng.integers(3, MODEL.vocab_size, (B, TP)).astype(np.int32)
  prompt_len = np.repeat(rng.integers(2, TP + 1, P), G)
  prompt_mask = (np.arange(TP)[None] >= TP - prompt_len[:, None]).astype(np.int32)
  prompt_tokens = prompt_tokens * prompt_mask
  completion_tokens = rng.integers(3, MODEL.vocab_size, (B, C)).astype(np.int32)
  lengths = rng.integers(0, C + 1, B)
  completion_mask = (np.arange(C)[None] < lengths[:, None]).astype(np.int32)
  rewards = rng.integers(0, 2, (P, G)).astype(np.float32)
  adv = np.asarray(advantages.group_advantages(rewards)).reshape(B)
  old = -rng.uniform(3.0, 6.0, (B, C)).astype(np.float32)
  return ts.TrainBatch(prompt_tokens, prompt_mask, completion_tokens, completion_mask, adv,
                       old_logprobs=old)


@functools.lru_cache(maxsize=1)
def _host_init():
  init = jax.jit(models.init_params, static_argnums=0)
  optimizer = ts.make_optimizer(OPTIM)
  state = ts.init_train_state(init(MODEL, jax.random.key(0)), optimizer)
  return jax.device_get(state), jax.device_get(init(MODEL, jax.random.key(1)))


def init_params():
  """The model's params for key 0 (host NumPy, the same values `run` starts from): one compile
  of init_params for the session."""
  return _host_init()[0].params


def run(mesh, loss_cfg: losses.LossConfig, num_microbatches: int = 1):
  """Reference pass + one update on `mesh`; returns host NumPy results (gathered)."""
  from jax.experimental import multihost_utils
  optimizer = ts.make_optimizer(OPTIM)
  if jax.process_count() > 1:  # created in place, in shards (the multi-host path)
    state, state_sh = ts.init_sharded_state(mesh, MODEL, optimizer, jax.random.key(0))
    ref_params = jax.jit(models.init_params, static_argnums=0, out_shardings=state_sh.params)(
        MODEL, jax.random.key(1))
  else:  # same values, placed from the host: fewer compiles per mesh in the tests
    host_state, host_ref = _host_init()
    state_sh = ts.state_shardings(mesh, MODEL, optimizer, jax.eval_shape(lambda: host_ref))
    state, ref_params = jax.device_put((host_state, host_ref), (state_sh, state_sh.params))
  batch = sharding.shard_batch(make_batch(), mesh)
  ref_fn = ts.make_logprob_fn(mesh, state_sh.params, model_config=MODEL,
                              num_microbatches=num_microbatches)
  batch = batch.replace(ref_logprobs=ref_fn(ref_params, batch))
  grad_fn = jax.jit(lambda p, b: ts.loss_and_grads(p, b, model_config=MODEL, loss_cfg=loss_cfg,
                                                   num_microbatches=num_microbatches),
                    out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh),
                                   state_sh.params))
  _, metrics, grads = grad_fn(state.params, batch)
  update = ts.make_update_fn(mesh, state_sh, model_config=MODEL, optimizer=optimizer,
                             loss_cfg=loss_cfg, num_microbatches=num_microbatches)
  new_state, step_metrics = update(state, batch)
  gather = lambda t: jax.tree.map(np.asarray, multihost_utils.process_allgather(t, tiled=True))
  return dict(ref=gather(batch.ref_logprobs), metrics=gather(metrics), grads=gather(grads),
              params=gather(new_state.params), step_metrics=gather(step_metrics))


def flat(tree) -> dict:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  sharding.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  mesh = sharding.make_mesh(2, 2, 2)
  out = run(mesh, LOSS, num_microbatches=2)
  if jax.process_index() == 0:
    np.savez(args.out, **flat({g: out[g] for g in ("ref", "metrics", "grads", "params")}))


if __name__ == "__main__":
  main()
