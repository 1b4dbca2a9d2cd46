"""Metrics: JSON lines, hand-written TensorBoard event files, progress lines, the plot tool."""

import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import jsonl, metrics, tensorboard
from grpo_jax import progress as progress_lib

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

  scalars = tensorboard.read_tensorboard_scalars(str(tmp_path / "tb"))
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
  lines = jsonl.read_jsonl(str(tmp_path / "samples.jsonl"))
  assert lines[0] == {"step": 7, "phase": "eval", "prompt": "1+1=", "completion": "#### 2",
                      "reward": 1.0}
  assert lines[2]["step"] == 8 and "phase" not in lines[2] and len(lines) == 3


def test_sample_text():
  row = {"question": "Ann has 3 apples.", "completion": "3 + 2 = 5.\n#### 5", "reward": 1.0,
         "advantage": np.float32(0.7071), "correct": True, "steps": [{"span": [0, 3]}]}
  assert metrics.sample_text(row) == ("question:\nAnn has 3 apples.\n\ncompletion:\n3 + 2 = 5.\n"
                                      "#### 5\n\nreward 1, advantage 0.707, correct True")


def test_progress_line():
  progress = progress_lib.Progress(total_steps=200, phase="grpo", every=10, print_fn=lambda s: None)
  line = progress.format(40, elapsed=28.0, steps_timed=40, figures={
      "reward": 0.62, "acc": 0.71, "kl": 0.003, "clip": 0.01, "len": 23.1,
      "sample_s": 0.31, "score_s": 0.01, "update_s": 0.22, "tok_per_s": 1200.0})
  assert line == ("grpo   40/200 20% | 0:28<1:52 | reward 0.62 acc 0.71 kl 0.003 clip 0.01 "
                  "len 23.1 | sample 0.31s score 0.01s update 0.22s | 1.2k tok/s")
  assert progress_lib.format_duration(3723) == "1:02:03"
  assert progress_lib.format_number(1234567) == "1.23M"


def test_progress_logs_every_n_and_last():
  printed = []
  progress = progress_lib.Progress(total_steps=5, phase="sft", every=2, print_fn=printed.append)
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


# ----------------------------------------------------------------------------------------------
# TensorBoard's own reader, remote-style workdirs, W&B, where progress goes.


def _tensorboard_run(directory):
  """The event files under `directory` as TensorBoard itself loads them (no size limits)."""
  from tensorboard.backend.event_processing import event_accumulator
  accumulator = event_accumulator.EventAccumulator(
      str(directory), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
  accumulator.Reload()
  return accumulator


def test_tensorboard_reads_scalars_histograms_and_text(tmp_path):
  from tensorboard import data_compat
  from tensorboard.util import tensor_util
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(4, 8))  # any shape is flattened
  lengths = np.array([3, 7, 7, 12, np.nan, np.inf])  # non-finite entries are left out
  with metrics.MetricsWriter(f"file://{tmp_path}") as writer:  # a URL: through paths.as_path
    writer.write(1, "grpo", {"reward": 0.25, "kl": np.float32(1e-3), "note": "text is no scalar"})
    writer.write(2, "grpo", {"reward": 0.5})
    writer.write_histograms(2, "grpo", {"rewards": rewards, "completion_length": lengths,
                                        "constant": np.ones(5), "empty": np.zeros(0)})
    writer.write_text(2, "grpo", {"sample": "Q: 2+2?\n#### 4"})
    writer.write_text(2, "grpo", {"table": "| a | b |\n|---|---|"}, markdown=True)

  run = _tensorboard_run(tmp_path / "tb")
  tags = run.Tags()
  assert set(tags["scalars"]) == {"grpo/reward", "grpo/kl"}
  assert [(e.step, e.value) for e in run.Scalars("grpo/reward")] == [(1, 0.25), (2, 0.5)]
  assert run.Scalars("grpo/kl")[0].value == pytest.approx(1e-3)

  assert set(tags["histograms"]) == {"grpo/rewards", "grpo/completion_length", "grpo/constant"}
  (event,) = run.Histograms("grpo/rewards")
  h = event.histogram_value
  assert event.step == 2 and sum(h.bucket) == rewards.size == h.num
  assert (h.min, h.max) == (rewards.min(), rewards.max())
  assert h.sum == pytest.approx(rewards.sum())
  assert h.sum_squares == pytest.approx((rewards**2).sum())
  (event,) = run.Histograms("grpo/completion_length")
  assert sum(event.histogram_value.bucket) == 4
  assert (event.histogram_value.min, event.histogram_value.max) == (3, 12)
  # TensorBoard's own conversion to [left, right, count] buckets (what its dashboard draws).
  from tensorboard.backend.event_processing import event_file_loader
  (tb_file,) = (tmp_path / "tb").iterdir()
  (value,) = [v for e in event_file_loader.EventFileLoader(str(tb_file)).Load()
              for v in e.summary.value if v.tag == "grpo/rewards"]
  buckets = tensor_util.make_ndarray(data_compat.migrate_value(value).tensor)
  assert buckets[0, 0] == pytest.approx(rewards.min()) and buckets[-1, 1] == pytest.approx(
      rewards.max())
  assert np.all(buckets[:, 0] <= buckets[:, 1]) and buckets[:, 2].sum() == rewards.size
  expected, _ = np.histogram(rewards, bins=30)
  np.testing.assert_array_equal(buckets[:, 2], expected[expected.nonzero()[0][0]:
                                                        expected.nonzero()[0][-1] + 1])
  (event,) = run.Histograms("grpo/constant")
  assert list(event.histogram_value.bucket) == [5] and event.histogram_value.min == 1

  assert set(run.PluginTagToContent("text")) == {"grpo/sample", "grpo/table"}
  (event,) = run.Tensors("grpo/sample")
  text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
  assert event.step == 2 and text == "    Q: 2+2?\n    #### 4"  # a code block: shown as written
  (event,) = run.Tensors("grpo/table")
  assert tensor_util.make_ndarray(event.tensor_proto).item().decode() == "| a | b |\n|---|---|"
  # Our own reader still sees the scalars and skips the rest.
  assert tensorboard.read_tensorboard_scalars(f"file://{tmp_path}/tb")["grpo/reward"] == [
      (1, 0.25), (2, 0.5)]


def test_file_url_workdir_resume_and_samples(tmp_path):
  url = f"file://{tmp_path}/run"
  with metrics.MetricsWriter(url) as writer:
    for step in range(3):
      writer.write(step, "grpo", {"reward": step})
    writer.write_samples(2, [{"completion": "#### 2"}], phase="grpo")
  metrics.write_samples(url, 3, [{"completion": "#### 3"}])
  with metrics.MetricsWriter(url, truncate_to=2) as writer:
    assert writer.num_lines == 2
    writer.write(2, "grpo", {"reward": 20})
  assert [r["reward"] for r in metrics.read_metrics(url)] == [0, 1, 20]
  assert [r["step"] for r in jsonl.read_jsonl(f"{url}/samples.jsonl")] == [2, 3]
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")  # the URL named a local directory
  assert len(os.listdir(tmp_path / "run" / "tb")) == 2


def test_object_store_files_are_rewritten_whole(tmp_path, monkeypatch, caplog):
  """gs:// cannot append: a growing file is published by rewriting it (every SYNC_S s and at
  close); a run killed before publishing leaves fewer lines than its checkpoint counted."""
  path = metrics.paths.as_path(tmp_path / "lines")
  with jsonl.GrowingFile(path, b"kept\n", local=False, sync_s=3600) as f:
    assert path.read_bytes() == b"kept\n"
    f.write(b"a\n")
    assert path.read_bytes() == b"kept\n"  # not yet published
  assert path.read_bytes() == b"kept\na\n"
  with jsonl.GrowingFile(path, local=False, sync_s=0) as f:  # head None: continue the file
    f.write(b"b\n")
    assert path.read_bytes() == b"kept\na\nb\n"

  monkeypatch.setattr(metrics.paths, "is_local", lambda path: False)
  workdir = str(tmp_path / "run")
  with metrics.MetricsWriter(workdir) as writer:
    writer.write(0, "grpo", {"reward": 0})
  killed = metrics.MetricsWriter(workdir, truncate_to=1)
  killed.write(1, "grpo", {"reward": 1})
  killed.flush()  # what the trainer does before a checkpoint: published
  assert len(metrics.read_metrics(workdir)) == 2
  killed.write(2, "grpo", {"reward": 2})
  checkpointed = killed.num_lines  # the checkpoint says 3, the store has 2: the run is killed
  with caplog.at_level("WARNING"), metrics.MetricsWriter(workdir, truncate_to=checkpointed) as w:
    assert w.num_lines == 2
    w.write(3, "grpo", {"reward": 3})
  assert "fewer than the 3 lines" in caplog.text
  assert [r["reward"] for r in metrics.read_metrics(workdir)] == [0, 1, 3]
  monkeypatch.undo()
  with pytest.raises(ValueError, match="asked to keep 5 lines"):
    metrics.MetricsWriter(workdir, truncate_to=5)  # on a local disk it is an error


def _wandb_records(run_dir):
  """The records of an offline run's `.wandb` file. This wandb has no Python reader of it, so
  this reads its LevelDB log framing (7-byte W&B header, 32 KiB blocks, 7-byte chunk headers:
  CRC-32 of type + data, uint16 length, uint8 type 1 full / 2 first / 3 middle / 4 last)
  and parses each record with wandb's own protobuf."""
  from wandb.proto import wandb_internal_pb2
  (path,) = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".wandb")]
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  records, chunks, pos = [], b"", 7
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    chunk = data[pos + 7:pos + 7 + length]
    assert crc == zlib.crc32(bytes([kind]) + chunk)
    chunks, pos = chunks + chunk, pos + 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      records.append(record)
      chunks = b""
  return records


def _wandb_history(records):
  """[{key: value}] of the history rows (`_step` included; a histogram as a dict)."""
  rows = []
  for record in records:
    if record.WhichOneof("record_type") == "history":
      row = {}
      for item in record.history.item:
        *outer, last = list(item.nested_key) or [item.key]
        node = row
        for key in outer:
          node = node.setdefault(key, {})
        node[last] = json.loads(item.value_json)
      rows.append(row)
  return rows


def _and_teardown(close):
  def close_and_teardown(self):
    close(self)
    import wandb
    wandb.teardown()
  return close_and_teardown


class _Wandb:
  """Stands for settings.WandbSettings: any object with these four fields."""

  def __init__(self, mode="offline", project="grpo-jax-test", entity="", name="unit"):
    self.mode, self.project, self.entity, self.name = mode, project, entity, name


def test_wandb_offline_logs_the_metrics_and_resumes_the_run(tmp_path, monkeypatch):
  import wandb  # test extra: fail, never skip
  # wandb-core writes the .wandb file from its own process after `finish` returns; its teardown
  # (at exit in a script) waits for that, and makes the next run read the environment again.
  monkeypatch.setattr(metrics.MetricsWriter, "close", _and_teardown(metrics.MetricsWriter.close))
  wandb_dir = tmp_path / "wandb_files"
  wandb_dir.mkdir()
  for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir),
                     "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
    monkeypatch.setenv(key, value)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"grpo": {"steps": 3}}))
  with metrics.MetricsWriter(str(workdir), wandb=_Wandb()) as writer:
    writer.write(1, "sft", {"loss": 2.5})
    writer.write(0, "grpo", {"eval/accuracy": 0.25})
    writer.write(1, "grpo", {"reward": 0.5, "note": "not a number"})
    writer.write_histograms(1, "grpo", {"rewards": np.array([0.0, 1.0, 1.0])})
  run_id = (workdir / "wandb_run_id").read_text().strip()
  (first,) = [wandb_dir / "wandb" / n for n in os.listdir(wandb_dir / "wandb")
              if n.startswith("offline-run") and n.endswith(run_id)]
  records = _wandb_records(first)
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert (run.run_id, run.project, run.display_name) == (run_id, "grpo-jax-test", "unit")
  config = {item.key: json.loads(item.value_json) for item in run.config.update}
  assert config["grpo"] == {"steps": 3}  # workdir/config.json
  rows = _wandb_history(records)
  assert [(r["_step"], r.get("sft/loss"), r.get("grpo/eval/accuracy"), r.get("grpo/reward"))
          for r in rows] == [(0, 2.5, None, None), (1, None, 0.25, None), (2, None, None, 0.5)]
  assert rows[0]["sft/step"] == 1 and rows[1]["grpo/step"] == 0 and rows[2]["grpo/step"] == 1
  assert rows[2]["grpo/rewards"]["_type"] == "histogram" and "grpo/note" not in rows[2]
  assert sum(rows[2]["grpo/rewards"]["values"]) == 3

  # A resume that keeps lines continues the W&B run; its _step stays the line number.
  with metrics.MetricsWriter(str(workdir), truncate_to=2, wandb=_Wandb()) as writer:
    writer.write(1, "grpo", {"reward": 0.75})
  assert (workdir / "wandb_run_id").read_text().strip() == run_id
  runs = sorted(n for n in os.listdir(wandb_dir / "wandb") if n.endswith(run_id))
  assert len(runs) == 2  # offline: a second directory of the same run, joined by `wandb sync`
  rows = _wandb_history(_wandb_records(wandb_dir / "wandb" / runs[-1]))
  assert [(r["_step"], r["grpo/reward"]) for r in rows] == [(2, 0.75)]

  # A writer that keeps nothing (a fresh start in the same workdir) starts a new W&B run.
  with metrics.MetricsWriter(str(workdir), truncate_to=0, wandb=_Wandb()):
    pass
  assert (workdir / "wandb_run_id").read_text().strip() != run_id


def test_wandb_is_imported_only_when_a_mode_is_set(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
  for mode in ("", "disabled"):
    with metrics.MetricsWriter(str(tmp_path / mode), wandb=_Wandb(mode=mode)) as writer:
      writer.write(0, "grpo", {"reward": 1.0})
  with pytest.raises(ImportError, match=r"pip install 'grpo_jax\[wandb\]'"):
    metrics.MetricsWriter(str(tmp_path / "on"), wandb=_Wandb(mode="online"))
  with pytest.raises(ValueError, match="wandb mode 'onlin'"):
    metrics.MetricsWriter(str(tmp_path / "typo"), wandb=_Wandb(mode="onlin"))


class _Shell:
  kernel = object()  # what a Jupyter / Colab kernel's IPython shell has


def test_progress_mode_follows_the_user(monkeypatch):
  from types import SimpleNamespace
  monkeypatch.delenv(progress_lib.PROGRESS_ENV, raising=False)
  monkeypatch.setattr(sys, "stderr", SimpleNamespace(isatty=lambda: False, write=lambda s: 0))
  monkeypatch.delitem(sys.modules, "IPython", raising=False)
  assert progress_lib.progress_mode() == "print"  # a script: absl would drop INFO lines
  parsed = SimpleNamespace(FLAGS=SimpleNamespace(is_parsed=lambda: True))
  monkeypatch.setattr(progress_lib, "flags", parsed)
  assert progress_lib.progress_mode() == "log"    # a launched job's logs
  monkeypatch.setitem(sys.modules, "IPython", SimpleNamespace(get_ipython=lambda: _Shell()))
  assert progress_lib.progress_mode() == "bar"    # a notebook kernel
  monkeypatch.delitem(sys.modules, "IPython")
  monkeypatch.setattr(sys, "stderr", SimpleNamespace(isatty=lambda: True, write=lambda s: 0))
  assert progress_lib.progress_mode() == "bar"    # a terminal
  monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
  assert progress_lib.progress_mode() == "print"
  monkeypatch.setenv(progress_lib.PROGRESS_ENV, "log")
  assert progress_lib.progress_mode() == "log"


def test_progress_bar_and_print_reach_the_user(monkeypatch, capsys):
  from absl import logging as absl_logging
  monkeypatch.setenv(progress_lib.PROGRESS_ENV, "bar")
  absl_console = absl_logging.get_absl_handler().python_handler
  monkeypatch.setattr(absl_console, "stream", sys.stderr)
  with progress_lib.Progress(total_steps=4, phase="grpo", every=2) as progress:
    lines = [progress.update(1, reward=0.5, update_s=0.2)]
    absl_console.stream.write("I1126 a log line while the bar is open\n")  # through tqdm.write
    lines += [progress.update(step, reward=0.5 * step, update_s=0.2) for step in range(2, 4)]
    lines.append(progress.update(4))  # no figures: the bar keeps step 3's
    assert progress._bar is None and absl_console.stream is sys.stderr  # closed, undone
  progress_lib.announce("eval @ grpo step 4: accuracy 0.75")  # tqdm.write: above any open bar
  captured = capsys.readouterr()
  assert "grpo: 100%" in captured.err and "4/4" in captured.err
  assert "\rI1126 a log line while the bar is open\n" in captured.err  # the bar cleared first
  final = captured.err.split("\r")[-1]  # the bar as it was left
  assert "4/4" in final and "reward 1.5 | update 0.2s" in final  # the figures: its postfix
  assert captured.out == "eval @ grpo step 4: accuracy 0.75\n"
  assert lines[0] is None and lines[1].startswith("grpo  2/4 50% | ")  # returned, not printed
  monkeypatch.setenv(progress_lib.PROGRESS_ENV, "print")
  progress = progress_lib.Progress(total_steps=3, phase="eval", every=2, unit="batch")
  for batch in range(1, 4):
    progress.update(batch, accuracy=0.5)
  progress_lib.announce("restored checkpoint 40")
  out = capsys.readouterr().out.splitlines()
  assert [line.split(" | ")[0] for line in out[:2]] == ["eval  2/3 66%", "eval  3/3 100%"]
  assert out[2] == "restored checkpoint 40"


def test_progress_callback_shows_each_eval_pass(monkeypatch, capsys):
  monkeypatch.setenv(progress_lib.PROGRESS_ENV, "print")
  callback = progress_lib.progress_callback("eval")
  for what, total in (("greedy", 20), ("samples", 3)):
    for done in range(1, total + 1):
      callback(what, done, total)
  heads = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()]
  assert heads == [f"eval greedy  {b:>2}/20 {5 * b}%" for b in range(2, 21, 2)] + [
      f"eval samples  {b}/3 {100 * b // 3}%" for b in (1, 2, 3)]
