"""The sampler's inference layout: on a (data=1, fsdp=8) mesh the training layout splits every
weight over fsdp, so its decode loop all-gathers weights at every token; the decode layout
(weights whole on every batch member, split over "tensor" only) gathers none inside the loop,
and draws the same tokens and log-probs for the same key."""

import functools
import re

import jax
import numpy as np

from grpo_jax import models, sampling, sharding
from grpo_jax import train_step as ts

CONFIG = models.get_config("tiny_qwen2", hidden_size=64, intermediate_size=128)


def _called(hlo: str) -> dict[str, set[str]]:
  """computation name -> the computations its instructions call (bodies, fusions, reducers)."""
  calls, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      name = head.group(1)
      calls[name] = set()
    elif name:
      calls[name] |= set(re.findall(
          r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-]+)", line))
      calls[name] |= set(re.findall(r"%([\w.\-]+)", " ".join(re.findall(
          r"(?:calls|branch_computations)=\{([^}]*)\}", line))))
  return calls


def while_body_collectives(hlo: str, op: str = "all-gather") -> int:
  """Instructions `op` inside while-loop bodies (and everything they call), in compiled HLO."""
  calls = _called(hlo)
  blocks, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      name = head.group(1)
      blocks[name] = []
    elif name:
      blocks[name].append(line)
  bodies = {b for line in hlo.splitlines() for b in re.findall(r"body=%?([\w.\-]+)", line)}
  seen, todo = set(), list(bodies)
  while todo:
    c = todo.pop()
    if c not in seen and c in blocks:
      seen.add(c)
      todo += list(calls.get(c, ()))
  return sum(1 for c in seen for line in blocks[c] if re.search(rf"\b{op}(-start)?\(", line))


def test_decode_layout_gathers_no_weights_in_the_loop_and_samples_the_same():
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  shapes = jax.eval_shape(functools.partial(models.init_params, CONFIG), jax.random.key(0))
  train_sh = ts.state_shardings(mesh, CONFIG, ts.make_optimizer(ts.OptimConfig()), shapes).params
  decode_sh = sharding.tree_shardings(mesh, models.param_logical_axes(CONFIG), shapes,
                                      rules=sharding.DECODE_RULES)
  params = jax.jit(functools.partial(models.init_params, CONFIG),
                   out_shardings=train_sh)(jax.random.key(0))
  decode = jax.jit(lambda p: p, out_shardings=decode_sh)(params)
  split = lambda tree: sum(x.sharding.shard_shape(x.shape) != x.shape  # noqa: E731
                           for x in jax.tree.leaves(tree))
  assert split(params) > 0 and split(decode) == 0  # fsdp-split weights vs whole ones

  settings = sampling.SamplingSettings(num_samples=2, max_new_tokens=6, temperature=1.0,
                                       eos_ids=(1,), pad_id=0)
  sampler = sampling.make_sampler(CONFIG, settings, mesh)
  rng = np.random.default_rng(0)
  ids = rng.integers(2, CONFIG.vocab_size, (8, 5)).astype(np.int32)
  mask = np.ones_like(ids)
  key = jax.random.key(3)
  hlo = {name: sampler.lower(p, ids, mask, key).compile().as_text()
         for name, p in (("training", params), ("decode", decode))}
  assert while_body_collectives(hlo["training"]) > 0  # the check can see the gathers
  assert while_body_collectives(hlo["decode"]) == 0

  a, b = sampler(params, ids, mask, key), sampler(decode, ids, mask, key)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
