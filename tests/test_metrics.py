"""Metrics: JSON lines, hand-written TensorBoard event files, progress lines, the plot tool."""

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import metrics, tensorboard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT_TOOL = os.path.join(REPO, "tools", "plot_metrics.py")


def _plot_module():
  spec = importlib.util.spec_from_file_location("plot_metrics", PLOT_TOOL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reject(constant):
  raise AssertionError(f"non-standard JSON constant {constant}")


def test_crc32c_check_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283
  assert tensorboard.crc32c(b"") == 0
  # RFC 3720 B.4: 32 bytes of zeros.
  assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA


def test_tfrecord_framing_and_crc_detection(tmp_path):
  path = tmp_path / "records"
  path.write_bytes(tensorboard.tfrecord(b"hello") + tensorboard.tfrecord(b""))
  assert tensorboard.read_tfrecords(str(path)) == [b"hello", b""]
  data = bytearray(path.read_bytes())
  assert struct.unpack("<Q", data[:8])[0] == 5
  data[13] ^= 1  # flip one payload bit
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="payload CRC mismatch at byte 0"):
    tensorboard.read_tfrecords(str(path))


def test_event_encoding_round_trip():
  payload = tensorboard.encode_event(1.5, -3, scalars={"grpo/reward": 0.25, "a": 2.0})
  event = tensorboard.decode_event(payload)
  assert event["wall_time"] == 1.5 and event["step"] == -3
  assert event["scalars"] == {"grpo/reward": 0.25, "a": 2.0}
  # Known bytes: wall_time=1.0, step=1, file_version="brain.Event:2" (as TensorFlow writes it).
  expected = b"\t\x00\x00\x00\x00\x00\x00\xf0?\x10\x01\x1a\rbrain.Event:2"
  assert tensorboard.encode_event(1.0, 1, file_version=tensorboard.FILE_VERSION) == expected


def test_jsonl_and_tensorboard_agree(tmp_path):
  workdir = str(tmp_path)
  written = [
      (0, "sft", {"loss": jnp.float32(2.5), "lr": np.float64(1e-3)}),
      (1, "sft", {"loss": 1.75, "tokens": np.int64(1024)}),
      (0, "grpo", {"reward": jnp.array(0.5), "eval/accuracy": 0.25, "note": "warm start"}),
      (1, "grpo", {"reward": float("nan"), "kl": float("inf"), "clip": -math.inf}),
  ]
  with metrics.MetricsWriter(workdir) as writer:
    for step, phase, figures in written:
      writer.write(step, phase, figures)
    assert writer.num_lines == 4

  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 4
  raw = [json.loads(line, parse_constant=_reject) for line in lines]  # strict JSON: no NaN literal
  assert raw[3]["reward"] == "NaN" and raw[3]["kl"] == "Infinity" and raw[3]["clip"] == "-Infinity"
  assert type(raw[1]["tokens"]) is int and raw[0]["loss"] == 2.5 and raw[2]["note"] == "warm start"

  rows = metrics.read_metrics(workdir)
  assert [(r["step"], r["phase"]) for r in rows] == [(s, p) for s, p, _ in written]
  assert math.isnan(rows[3]["reward"]) and rows[3]["kl"] == math.inf
  assert all(isinstance(r["time"], float) for r in rows)

  scalars = metrics.read_tensorboard_scalars(str(tmp_path / "tb"))
  assert set(scalars) == {"sft/loss", "sft/lr", "sft/tokens", "grpo/reward", "grpo/eval/accuracy",
                          "grpo/kl", "grpo/clip"}
  assert scalars["sft/loss"] == [(0, 2.5), (1, 1.75)]
  assert scalars["grpo/eval/accuracy"] == [(0, 0.25)]
  assert scalars["sft/lr"][0][1] == pytest.approx(1e-3)  # float32 on disk
  assert scalars["grpo/reward"][0] == (0, 0.5) and math.isnan(scalars["grpo/reward"][1][1])
  assert scalars["grpo/kl"] == [(1, math.inf)]
  tb_files = os.listdir(tmp_path / "tb")
  assert len(tb_files) == 1 and "tfevents" in tb_files[0]
  records = tensorboard.read_tfrecords(str(tmp_path / "tb" / tb_files[0]))
  assert tensorboard.decode_event(records[0])["file_version"] == "brain.Event:2"
  assert metrics.read_tensorboard_scalars is tensorboard.read_tensorboard_scalars  # re-export


def test_writer_rejects_bad_figures_and_can_be_disabled(tmp_path):
  with metrics.MetricsWriter(str(tmp_path)) as writer:
    with pytest.raises(ValueError, match="logits: expected a scalar"):
      writer.write(0, "grpo", {"logits": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, "grpo", {"step": 1})
  off = tmp_path / "off"
  metrics.MetricsWriter(str(off), enabled=False).write(0, "grpo", {"reward": 1.0})
  assert not off.exists()


def test_truncate_on_resume_drops_redone_and_half_written_lines(tmp_path):
  workdir = str(tmp_path)
  with metrics.MetricsWriter(workdir) as writer:
    for step in range(3):
      writer.write(step, "grpo", {"reward": step})
    checkpointed = writer.num_lines  # pretend a checkpoint recorded this after step 1
    writer.write(3, "grpo", {"reward": 3})
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 4, "pha')  # killed mid-line
  with metrics.MetricsWriter(workdir, truncate_to=checkpointed) as writer:
    assert writer.num_lines == 3
    writer.write(3, "grpo", {"reward": 30})
  assert [r["reward"] for r in metrics.read_metrics(workdir)] == [0, 1, 2, 30]


def test_read_metrics_names_bad_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 0, "phase": "sft"}\n{oops\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    metrics.read_metrics(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no metrics file"):
    metrics.read_metrics(str(tmp_path / "missing"))


def test_write_samples(tmp_path):
  rows = [{"prompt": "1+1=", "completion": "#### 2", "reward": np.float32(1.0)},
          {"prompt": "2+2=", "completion": "5", "reward": 0.0}]
  metrics.write_samples(str(tmp_path), 7, rows, phase="eval")
  metrics.write_samples(str(tmp_path), 8, rows[:1])
  lines = metrics.read_jsonl(str(tmp_path / "samples.jsonl"))
  assert lines[0] == {"step": 7, "phase": "eval", "prompt": "1+1=", "completion": "#### 2",
                      "reward": 1.0}
  assert lines[2]["step"] == 8 and "phase" not in lines[2] and len(lines) == 3


def test_progress_line():
  progress = metrics.Progress(total_steps=200, phase="grpo", every=10, print_fn=lambda s: None)
  line = progress.format(40, elapsed=28.0, steps_timed=40, figures={
      "reward": 0.62, "acc": 0.71, "kl": 0.003, "clip": 0.01, "len": 23.1,
      "sample_s": 0.31, "score_s": 0.01, "update_s": 0.22, "tok_per_s": 1200.0})
  assert line == ("grpo   40/200 20% | 0:28<1:52 | reward 0.62 acc 0.71 kl 0.003 clip 0.01 "
                  "len 23.1 | sample 0.31s score 0.01s update 0.22s | 1.2k tok/s")
  assert metrics.format_duration(3723) == "1:02:03"
  assert metrics.format_number(1234567) == "1.23M"


def test_progress_logs_every_n_and_last():
  printed = []
  progress = metrics.Progress(total_steps=5, phase="sft", every=2, print_fn=printed.append)
  for step in range(1, 6):
    progress.update(step, {"eval/accuracy": 0.5}, loss=1.0)
  assert [line.split("|")[0].split()[1] for line in printed] == ["2/5", "4/5", "5/5"]
  assert "eval/accuracy 0.5 loss 1" in printed[-1]


def _synthetic_workdir(path, offset=0.0):
  with metrics.MetricsWriter(str(path)) as writer:
    for step in range(5):
      writer.write(step, "sft", {"loss": 2.0 - 0.3 * step})
    writer.write(0, "grpo", {"eval/accuracy": 0.2 + offset})
    for step in range(1, 6):
      writer.write(step, "grpo", {"reward": 0.1 * step + offset, "kl": 0.001 * step,
                                  "completion_length": 20 + step})
    writer.write(5, "grpo", {"eval/accuracy": 0.6 + offset})
  return str(path)


def _assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_function_single_and_comparison(tmp_path):
  import matplotlib  # noqa: F401  (test extra: fail, never skip)
  plot = _plot_module()
  run_a = _synthetic_workdir(tmp_path / "a")
  run_b = _synthetic_workdir(tmp_path / "b", offset=0.1)
  rows = metrics.read_metrics(run_a)
  assert plot.present_keys([rows]) == ["eval/accuracy", "reward", "kl", "loss",
                                       "completion_length"]
  assert plot.curves(rows, "eval/accuracy") == {"grpo": ([0, 5], [0.2, 0.6])}
  out = plot.plot_workdirs([run_a], None, None, None)
  assert out == os.path.join(run_a, "metrics.png")
  _assert_png(out)
  compare = plot.plot_workdirs([run_a, run_b], ["base", "tuned"], ["reward", "kl"],
                               str(tmp_path / "cmp" / "compare.png"))
  _assert_png(compare)
  with pytest.raises(ValueError, match="2 labels for 1 workdirs"):
    plot.plot_workdirs([run_a], ["x", "y"], None, str(tmp_path / "x.png"))


def test_plot_default_keys_find_pass_and_maj_at_configured_k(tmp_path):
  """The trainer names these after config.eval.k; the default plot must not miss them."""
  import matplotlib  # noqa: F401  (test extra: fail, never skip)
  plot = _plot_module()
  lines = [{"step": 0, "phase": "grpo", "time": 1.0, "eval/accuracy": 0.2,
            "eval/pass_at_8": 0.5, "eval/maj_at_8": 0.3, "eval/pass_at_16": 0.6},
           {"step": 1, "phase": "grpo", "time": 2.0, "reward": 0.4},
           {"step": 2, "phase": "grpo", "time": 3.0, "eval/accuracy": 0.4,
            "eval/pass_at_8": 0.7, "eval/maj_at_8": 0.5, "eval/pass_at_16": 0.8}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))
  rows = metrics.read_metrics(str(tmp_path))
  assert plot.present_keys([rows]) == ["eval/accuracy", "eval/pass_at_8", "eval/pass_at_16",
                                       "eval/maj_at_8", "reward"]
  assert plot.resolve_keys([rows], ["eval/pass_at_*", "kl"]) == [
      "eval/pass_at_8", "eval/pass_at_16", "kl"]
  assert plot.resolve_keys([rows], ["eval/nothing_*"]) == []
  _assert_png(plot.plot_workdirs([str(tmp_path)], None, None, None))


def test_plot_cli(tmp_path):
  import matplotlib  # noqa: F401  (test extra: fail, never skip)
  run = _synthetic_workdir(tmp_path / "run")
  out = tmp_path / "curves.png"
  result = subprocess.run(
      [sys.executable, PLOT_TOOL, run, "--out", str(out), "--keys", "reward,eval/accuracy",
       "--label", "run"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == str(out)
  _assert_png(out)
  missing = subprocess.run([sys.executable, PLOT_TOOL, str(tmp_path / "nope")],
                           capture_output=True, text=True, timeout=120)
  assert missing.returncode == 1 and "no metrics file" in missing.stderr
