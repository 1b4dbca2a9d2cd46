"""tools/bench_step.py, tools/bench_device.py and tools/bench_rollout.py at a tiny size, in this
process.

Each tool's last stdout line is one JSON object; checked here for its keys and sane values (not
for speed). The accelerator peaks are checked on the device kinds JAX reports.
"""

import importlib.util
import json
import os

import pytest

from grpo_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench_step():
  return load_tool("bench_step")


@pytest.fixture(scope="module")
def bench_device():
  return load_tool("bench_device")


def last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_step_tiny(bench_step, capsys):
  P, G, N = 8, 2, 6  # P: one prompt per simulated device
  result = bench_step.main(["--model=tiny_qwen2", f"--prompts={P}", f"--samples={G}",
                            "--prompt_len=4", f"--new_tokens={N}", "--steps=2",
                            "--micro_batch_size=0"])
  assert last_json(capsys) == json.loads(json.dumps(result))
  for key in ("gen_s", "step_s", "ref_s", "update_s", "score_s"):
    low, high = result[f"{key}_range"]
    assert 0 < low <= result[key] <= high, key
  # The parts are timed one after another inside the step.
  assert result["gen_s"] + result["ref_s"] + result["update_s"] <= result["step_s"] * 1.001
  assert result["gen_tok_s"] == pytest.approx(P * G * N / result["gen_s"])
  assert result["peak_rss_mb"] > 0 and result["warmup_step_s"] > result["step_s"]
  assert result["all_completions_full"] and result["skipped"] == 0
  assert 0.0 <= result["reward"] <= 1.0  # fraction of even ids
  assert len(result["steps"]) == 3 and result["counted"] == 2
  assert result["weights"].startswith("random init of tiny_qwen2")
  assert (result["prompts"], result["samples"], result["new_tokens"]) == (P, G, N)


def test_bench_device_tiny(bench_device, capsys):
  result = bench_device.main(["--model=tiny_qwen2", "--layers=1", "--batches=16", "--samples=2",
                              "--prompt_len=4", "--new_tokens=16", "--update_rows=16",
                              "--micro_batch_size=0", "--repeats=1"])
  assert last_json(capsys) == json.loads(json.dumps(result))
  assert result["num_layers"] == 1 and result["dtype"] == "bfloat16"
  (row,) = result["decode"]
  assert row["batch"] == 16 and row["prompts"] == 8
  assert row["gen_tok_s"] > 0 and row["call_s"] > 0 and row["decode_bytes_per_token"] > 0
  # Decode = the N-token call minus the 1-token call: null if noise beats it (tiny, loaded CPU).
  assert row["decode_tok_s"] is None or row["decode_tok_s"] > 0
  assert result["decode_tok_s"] == {"16": row["decode_tok_s"]}
  assert result["update_tok_s"] > 0 and result["ref_tok_s"] > 0 and result["update_loss_finite"]
  assert result["update_tokens"] == 16 * (4 + 16) and result["micro_batch_size"] == 16
  # CPU: no peak in the table, no device memory statistics.
  assert result["platform"] == "cpu"
  assert result["roofline_frac"] == {"16": None} and result["update_mfu"] is None
  assert result["peak_device_bytes"] is None


@pytest.mark.parametrize("kind, bandwidth, flops", [
    ("NVIDIA H100 80GB HBM3", 3.35e12, 989e12),
    ("NVIDIA H100 PCIe", 2.0e12, 756e12),
    ("NVIDIA H200", 4.8e12, 989e12),
    ("NVIDIA A100-SXM4-80GB", 2.0e12, 312e12),
    ("TPU v5 lite", 819e9, 197e12),
    ("TPU v5p", 2.76e12, 459e12),
    ("TPU v5", 2.76e12, 459e12),
    ("TPU v6 lite", 1.64e12, 918e12),
    ("cpu", None, None),
])
def test_device_peaks(bench_device, kind, bandwidth, flops):
  assert bench_device.device_peaks(kind) == (bandwidth, flops)


def test_decode_bytes_by_hand(bench_device):
  from grpo_jax import models
  c = models.get_config("qwen2.5-0.5b", dtype="bfloat16")
  P, G, Tp, N = 8, 8, 64, 256
  kv_per_token = 2 * 2 * 64 * 24 * 2  # K and V, 2 KV heads, head_dim 64, 24 layers, bf16
  kv_tokens = sum(P * Tp + P * G * step for step in range(1, N))  # what decode step `step` reads
  expected = (N - 1) * 1_000_000 + kv_per_token * kv_tokens
  assert bench_device.decode_bytes(c, 1_000_000, 1, P, G, Tp, N) == pytest.approx(expected)


def test_bench_rollout_tiny(capsys):
  """The variable-length workload at a small size: lengths from exactly uniform draws (the
  final norm zeroed), so the stop ids' share sets them on any machine; the static batch and
  continuous batching give the same samples; the compile part emits one figure per program and
  depth."""
  bench_rollout = load_tool("bench_rollout")
  N = 64
  assert bench_rollout.stop_ids("fixed", 4096, N) == ()
  k = len(bench_rollout.stop_ids("varlen", 4096, N))
  assert (1 - k / 4096) ** N == pytest.approx(0.1, rel=0.05)  # P(no stop in N steps)
  vocab = models.get_config("tiny_qwen2").vocab_size  # the benchmark's model at a test's size
  k = len(bench_rollout.stop_ids("varlen", vocab, N))
  assert (1 - k / vocab) ** N == pytest.approx(0.1, rel=0.5)
  config = os.path.join(REPO, "experiments/configs/arithmetic.py:smoke")
  figures = bench_rollout.main(["--part=all", "--model=tiny_qwen2", "--prompts=8", "--samples=8",
                                f"--new_tokens={N}", "--prompt_len=4", "--repeats=1",
                                f"--config={config}", "--layers=1", "--set=grpo.num_prompts=8",
                                "--slots=0,64"])
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert lines == json.loads(json.dumps(figures))
  generation, compiled = figures[:4], figures[4:]
  assert [(f["workload"], f["batching"]) for f in generation] == [
      (w, b) for w in ("fixed", "varlen") for b in ("static", "continuous")]
  assert all(f["same_samples"] and f["max_logprob_diff"] <= 1e-6 for f in generation)
  fixed, varlen = generation[0], generation[2]
  assert fixed["static_useful_fraction"] == 1.0 and fixed["tokens"] == 64 * N
  assert varlen["stop_ids"] == k and varlen["tokens"] < 64 * N
  assert varlen["static_useful_fraction"] < 1.0
  assert fixed["speedup_vs_static"] == 1.0 and all(f["speedup_vs_static"] > 0 for f in generation)
  assert 0.02 <= varlen["at_budget_fraction"] <= 0.3  # 0.1 expected, 64 rows
  assert 0.25 <= varlen["mean_length_fraction"] <= 0.55  # ~0.39 expected
  assert [(f["program"], f["layers"]) for f in compiled] == [
      ("sample_train", 1), ("update", 1), ("logprobs", 1)]
  assert all(f["compile_s"] > 0 for f in compiled)


def test_bench_rollout_decode_step_parts(capsys):
  bench_rollout = load_tool("bench_rollout")
  figures = bench_rollout.main(["--part=step", "--step_model=tiny_qwen2", "--step_rows=8",
                                "--step_context=16", "--repeats=1"])
  assert [f["part"] for f in figures] == ["layers", "unembed", "draw", "draw_top_p_0.95_flat",
                                          "draw_top_p_0.95_peaked"]
  assert all(f["seconds"] > 0 for f in figures)
  step = sum(f["seconds"] for f in figures[:3])
  assert sum(f["share_of_step"] for f in figures[:3]) == pytest.approx(1.0, abs=0.01)
  assert figures[3]["share_of_step"] == pytest.approx(figures[3]["seconds"] / step, abs=0.01)
  capsys.readouterr()


def test_the_idle_fraction_reads_the_steps_and_the_executions(tmp_path):
  """bench_async.idle_fraction on a written trace: two steps of 100 us, executions that overlap
  each other, one step and the gap between the steps; 75 of the 200 us run nothing."""
  import gzip  # pylint: disable=import-outside-toplevel
  x = lambda name, ts, dur: {"ph": "X", "name": name, "ts": ts, "dur": dur}  # noqa: E731
  events = [x("grpo_step", 0, 100), x("grpo_step", 150, 100),
            x("ThunkExecutor::Execute", 10, 30), x("ThunkExecutor::Execute (wait)", 20, 40),
            x("ThunkExecutor::Execute", 90, 75), x("ThunkExecutor::Execute", 200, 50),
            x("ynn_fusion", 60, 30), {"ph": "M", "name": "thread_name"}]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  # busy inside the steps: [10, 60) + [90, 100) + [150, 165) + [200, 250) = 50 + 10 + 15 + 50
  assert load_tool("bench_async").idle_fraction(str(path)) == pytest.approx(1 - 125 / 200)
