"""tools/memory_plan.py: the plan from abstract inputs against what a real sharded run holds."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import arithmetic as arithmetic_config
from experiments.configs import gsm8k as gsm8k_config
from grpo_jax import experiment, settings, sharding, weights
from grpo_jax import train_step as ts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import memory_plan, memory_programs  # noqa: E402  (tools/ is not an installed package)


def test_qwen25_7b_state_per_device_with_fsdp8():
  cfg = gsm8k_config.get_config("qwen2.5-7b")
  cfg.mesh.data, cfg.mesh.fsdp = 1, 8
  s = settings.from_config(cfg, 8)
  config = memory_plan.model_config(s)  # the preset the variant names: no checkpoint needed
  setup = memory_programs.build_setup(s, config, sharding.make_mesh(*s.mesh), "replicated")
  b = memory_plan.state_bytes(setup)
  assert b["params"] == pytest.approx(7.6e9 * 4 / 8, rel=0.05)  # float32 master weights / 8
  assert b["gradients"] == b["params"]
  assert b["optimizer"] == pytest.approx(2 * b["params"], rel=1e-6)  # Adam's mu and nu
  assert b["reference"] == b["policy_copy"] == b["params"] // 2  # bfloat16 (beta = 0.04)
  assert b["decode_copy"] == memory_programs.tree_bytes(setup.decode)  # whole on every device


def on_device(tree, device) -> int:
  """Bytes of `tree`'s buffers that live on `device` (measured on the arrays themselves)."""
  return sum(shard.data.nbytes for x in jax.tree.leaves(tree)
             for shard in x.addressable_shards if shard.device == device)


# A (1, 8, 1) mesh, float32 master weights, bfloat16 compute, a KL reference, the sampler's
# replicated layout, 2 micro-batches: as config overrides, shared by the CLI test.
TINY = ("mesh.data=1", "mesh.fsdp=8", "mesh.decode_layout=replicated", "model.dtype=bfloat16",
        "sft.steps=0", "grpo.num_prompts=8", "grpo.micro_batch_size=16", "grpo.loss.beta=0.04",
        "model.overrides.num_layers=1", "model.overrides.hidden_size=64")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A real experiment of the TINY config, and its plan."""
  cfg = arithmetic_config.get_config("smoke")
  for override in TINY:
    path, value = override.split("=")
    *parents, leaf = path.split(".")
    node = cfg
    for name in parents:
      node = node[name]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], str) else value
  s = settings.from_config(cfg, jax.device_count())
  exp = experiment.build(s, str(tmp_path_factory.mktemp("plan")))
  plan = memory_plan.plan(exp.settings, exp.device.model_config, exp.device.mesh, layers="exact")
  assert memory_plan.model_config(s) == exp.device.model_config  # what the CLI plans
  return exp, plan


def test_plan_agrees_with_a_measured_run(tiny):
  exp, plan = tiny
  device = exp.device
  dev = device.mesh.devices.flat[0]
  r = exp.settings.rollout
  state = experiment.init_state(device, exp.keys, "grpo")
  reference = weights.reference_copy(device, state.params)
  policy = weights.policy_params(device, state)
  decode = weights.decode_params(device, policy)
  measured = dict(params=on_device(state.params, dev), optimizer=on_device(state.opt_state, dev),
                  reference=on_device(reference, dev), policy_copy=on_device(policy, dev),
                  decode_copy=on_device(decode, dev))
  for name, value in measured.items():  # exact: the same shapes, dtypes and shardings
    assert plan["state_bytes"][name] == value, name

  # The sampler: its arguments and outputs on device 0, and the plan compiled its program.
  ids = np.zeros((r.num_prompts, r.max_prompt_length), np.int32)
  ids_d, mask_d = device.shard(ids, np.ones_like(ids))
  key = exp.keys(experiment.Stream.ROLLOUT, 0)
  out = device.programs.sample_train.program(decode, ids_d, mask_d, key)
  sampler = plan["programs"]["sample_train"]
  assert sampler["argument"] == pytest.approx(on_device((decode, ids_d, mask_d), dev), rel=0.2)
  assert sampler["output"] == pytest.approx(on_device(out, dev), rel=0.2)  # + alignment
  real = memory_programs.ProgramMemory.of(
      device.programs.sample_train.program.lower(decode, ids_d, mask_d, key).compile())
  assert real.temp == sampler["temp"]
  del decode, out  # rollout.collect drops its decode copy before the update

  # The update phase: every buffer the step holds, measured on device 0, + the program's temp.
  N, C = r.num_prompts * r.num_samples, r.max_completion_length + 1
  f32 = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
  batch = device.shard(ts.TrainBatch(
      prompt_tokens=np.zeros((N, r.max_prompt_length), np.int32),
      prompt_mask=np.ones((N, r.max_prompt_length), np.int32),
      completion_tokens=np.zeros((N, C), np.int32), completion_mask=np.ones((N, C), np.int32),
      advantages=f32(N), ref_logprobs=f32(N, C)))[0]
  held = on_device((state, reference, policy, batch), dev)  # what grpo_step holds
  update = plan["programs"]["update"]
  assert update["argument"] == on_device((state, batch), dev)
  real = memory_programs.ProgramMemory.of(
      device.programs.policy_update.lower(state, batch).compile())
  assert real == memory_programs.ProgramMemory(**{k: update[k] for k in (
      "argument", "output", "alias", "temp")})
  new_state, metrics = device.programs.policy_update(state, batch)
  assert update["output"] == pytest.approx(on_device((new_state, metrics), dev), rel=0.2)
  measured_peak = held + real.temp + real.output - real.alias
  assert plan["phase_peak_bytes"]["update"] == pytest.approx(measured_peak, rel=0.2)


class _FakePlanner(memory_plan.Planner):
  """Compiles nothing: an update's temp grows with its micro-batch, a sampler's with its
  prompts (1 MB per prompt past 100 prompts per device: not linear)."""

  def memory(self, probe, program, size=0, slope_sizes=()):
    self.calls.append((program, size))
    if program == "update":
      micro_batch = size // probe.settings.grpo.num_microbatches
      return memory_programs.ProgramMemory(0, 0, 0, 10 ** 6 * micro_batch)
    prompts = size // 8
    return memory_programs.ProgramMemory(0, 0, 0,
                                         10 ** 5 * prompts + 10 ** 6 * max(0, prompts - 100))


def test_search_finds_the_largest_batches_under_a_budget(tiny):
  exp, plan = tiny
  planner = _FakePlanner(exp.device.mesh, "exact")
  planner.calls = []
  b = dict(plan["state_bytes"], params=0, optimizer=0, step=0, reference=0, policy_copy=0,
           decode_copy=0)  # nothing held: the peaks are the fake programs'
  probe = memory_plan.Probe(exp.settings, exp.device.model_config, plan["decode_layout"])
  result = memory_plan.search(planner, probe, b, budget=20.5e6)
  assert result["micro_batch_size"] == 16  # 32 rows in micro-batches of 8, 16, 32: 16 MB fits
  assert result["update_peak_bytes"] == {16: 16e6, 32: 32e6}
  # Sampler: 10 MB at 100 prompts per device, +1.1 MB per prompt beyond: 109 is the last under.
  assert result["prompts_per_device"] == 109
  assert result["sample_peak_bytes"][110] > 20.5e6
  assert result["sampling_rows_per_device"] == 109 * exp.settings.rollout.num_samples
  assert result["num_prompts"] == 109 * 8
  assert len(planner.calls) <= 14  # the kink costs a few probes; walking down would be ~100


def test_affine_guess_lands_under_the_budget():
  peaks = {2: 200, 4: 400}  # 100 bytes per prompt
  guess = memory_plan.affine_guess(peaks, 1050, list(range(1, 101)))
  assert guess() == 9  # index of 10: 10 prompts -> 1000 bytes; 11 would exceed
  assert memory_plan.affine_guess({2: 200}, 1050, [1, 2])() is None


def test_largest_bisects_or_follows_a_guess():
  probes = []

  def fits(c):
    probes.append(c)
    return c <= 37

  assert memory_plan.largest(list(range(1, 101)), fits) == 37
  assert len(probes) <= 7
  probes.clear()
  assert memory_plan.largest(list(range(1, 101)), fits, {10: True}, guess=lambda: 36) == 37
  assert probes == [37, 38]  # the guess, then the next one up: two probes
  assert memory_plan.largest([50, 60], fits) is None


def test_extrapolation_is_linear_in_depth():
  one = memory_programs.ProgramMemory(10, 4, 2, 100)
  per_layer = memory_programs.ProgramMemory(3, 1, 1, 20)
  m = one.plus(per_layer, 26, "x")
  assert (m.argument, m.output, m.alias, m.temp) == (88, 30, 28, 620)
  assert m.peak == 88 + 30 - 28 + 620
  assert one.lerp(one.plus(per_layer, 2, ""), 0.5) == one.plus(per_layer, 1, "").scaled(1.0)


def test_cli_prints_and_writes_json(tiny, tmp_path):
  out = tmp_path / "plan.json"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # The fixture's programs again: the subprocess loads them from the tests' compilation cache.
  proc = subprocess.run(
      [sys.executable, "-m", "tools.memory_plan",
       "--config=experiments/configs/arithmetic.py:smoke", *(f"--config.{o}" for o in TINY),
       f"--out={out}"],
      cwd=root, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "memory plan: tiny_llama" in proc.stdout and "PEAK" in proc.stdout
  assert "h100" in proc.stdout and "cpu upcast" in proc.stdout
  plan = json.loads(out.read_text())
  assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert plan["peak_bytes"] == max(plan["phase_peak_bytes"].values())
  assert set(plan["programs"]) >= {"update", "sample_train"}
