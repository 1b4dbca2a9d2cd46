"""tools/train_state_memory.py: train-state bytes from shapes alone, checked against hand counts."""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "train_state_memory.py")
MODEL = "qwen2.5-0.5b"
RANK = 16


@pytest.fixture(scope="module")
def tool():
  spec = importlib.util.spec_from_file_location("train_state_memory", TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def rows(tool):
  return {mode: tool.row(MODEL, mode, RANK) for mode in tool.MODES}


def hand_param_count(c) -> int:
  """Parameters of a Qwen2 decoder from its config fields (independent of the model code)."""
  E, V, M, L = c.hidden_size, c.vocab_size, c.intermediate_size, c.num_layers
  H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
  attn = E * H * D + 2 * E * K * D + H * D * E  # q, k, v, o
  bias = (H * D + 2 * K * D) if c.qkv_bias else 0  # q, k, v biases (no o bias)
  mlp = 3 * E * M  # gate, up, down
  norms = 2 * E  # before attention and before the MLP
  head = 0 if c.tie_embeddings else E * V
  return V * E + L * (attn + bias + mlp + norms) + E + head  # + final norm


def hand_lora_count(c, r: int) -> int:
  """r * (in + out) per adapted weight, summed over qkv, o, gate_up, down and the layers."""
  E, M, H, K, D = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
  in_out = {"qkv": (E, (H + 2 * K) * D), "o": (H * D, E), "gate_up": (E, 2 * M), "down": (M, E)}
  return c.num_layers * sum(r * (i + o) for i, o in in_out.values())


def test_full_f32_params_are_4_bytes_per_published_parameter(tool, rows):
  c = tool.model_config(MODEL)
  count = hand_param_count(c)
  assert count == 494_032_768  # Qwen2.5-0.5B as published (tied embeddings)
  r = rows["full_f32"]
  assert r["num_params"] == r["num_trained"] == count
  assert r["params_bytes"] == 4 * count
  assert r["reference_bytes"] == 2 * count  # bfloat16 copy
  assert rows["full_bf16"]["params_bytes"] == rows["full_bf16"]["reference_bytes"] == 2 * count


def test_adam_moments_are_twice_the_trained_params(rows):
  for mode in ("full_f32", "full_bf16"):
    r = rows[mode]
    assert r["adam_moments_bytes"] == 2 * r["params_bytes"]
    # The rest of the optimiser state: step counters (scalars) and the clip's empty state.
    assert 0 <= r["optimizer_bytes"] - r["adam_moments_bytes"] <= 64


def test_lora_adapters_match_hand_formula(tool, rows):
  c = tool.model_config(MODEL)
  n_adapter = hand_lora_count(c, RANK)
  n_base = hand_param_count(c)
  r = rows["lora"]
  assert r["num_trained"] == n_adapter
  assert r["num_params"] == n_base + n_adapter
  assert r["params_bytes"] == 2 * n_base + 4 * n_adapter  # base bf16, adapters f32
  assert r["adam_moments_bytes"] == 2 * 4 * n_adapter  # float32 moments
  assert r["reference_bytes"] == 0  # the frozen base is the reference


def test_lora_total_under_40_percent_of_full(rows):
  assert rows["lora"]["total_bytes"] < 0.4 * rows["full_f32"]["total_bytes"]
  assert rows["full_bf16"]["total_bytes"] < rows["full_f32"]["total_bytes"]


def test_per_device_and_fits(rows):
  for mode, r in rows.items():
    assert r["total_bytes"] == r["params_bytes"] + r["optimizer_bytes"] + r["reference_bytes"]
    assert r["gpu_per_device_gib"] == pytest.approx(r["total_gib"])
    ideal = r["total_gib"] / 8
    assert r["tpu_ideal_per_device_gib"] == pytest.approx(ideal)
    # Under the repo's fsdp rules a chip never holds less than the ideal share; full
    # fine-tuning is within 1% of it (only norms and biases stay replicated).
    assert r["tpu_per_device_gib"] >= ideal * (1 - 1e-9)
    if mode != "lora":
      assert r["tpu_per_device_gib"] == pytest.approx(ideal, rel=0.01)
    assert r["gpu_fits"] == (r["gpu_per_device_gib"] <= 0.7 * 80)
    assert r["tpu_fits"] == (r["tpu_per_device_gib"] <= 0.7 * 16)


def test_cli_markdown_and_json(tool, capsys):
  tool.main(["--models", MODEL, "--modes", "lora", "--json"])
  out = capsys.readouterr().out.strip().splitlines()
  assert out[0].startswith("| model | mode |")
  assert any(line.startswith(f"| {MODEL} | lora r={RANK} |") for line in out)
  assert any("excludes activations" in line.lower() for line in out)
  row = json.loads(out[-1])
  assert row["model"] == MODEL and row["mode"] == "lora" and row["lora_rank"] == RANK
