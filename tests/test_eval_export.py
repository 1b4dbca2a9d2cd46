"""Reading a run back: `runs.load_run`, the evaluation CLI (`experiments/eval.py`) and the Hugging
Face export (`tools/export_hf.py`), on one tiny GSM8K run trained here (a random Qwen2 checkpoint
with a real tokenizer.json), against transformers on CPU."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (test extra: fail, never skip, when missing)
import transformers  # noqa: E402

from experiments import eval as eval_cli
from experiments.configs import gsm8k as gsm8k_config
from grpo_jax import evaluation, metrics, models, runs, trainer
from grpo_jax.data import arithmetic
from grpo_jax.settings import ConfigError
from grpo_jax.tokenizer_training import train_sentencepiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")
STOP = "<|im_end|>"


def _load_tool(name):
  """tools/ is not an installed package: import the file (its flags are defined only when run)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
  module = sys.modules[name] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


export_hf = _load_tool("export_hf")


def _gsm8k_dir(root):
  if os.path.isdir(GSM8K_DIR):
    return GSM8K_DIR
  d = root / "gsm8k"
  d.mkdir()
  for split in ("train", "test"):
    with open(d / f"{split}.jsonl", "w") as f:
      for r in arithmetic.generate(100, 0, split=split):
        f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
  return str(d)


def _tiny_hf_checkpoint(path, texts):
  """A random tiny Qwen2 checkpoint with a byte-level BPE tokenizer.json trained on `texts`
  (digits split), eos <|endoftext|>, end-of-turn <|im_end|>, as an HF model directory holds."""
  import tokenizers
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(texts, trainer=tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", STOP],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "bos_token": None}, f)
  config = models.get_config("tiny_qwen2", vocab_size=tok.get_vocab_size())
  models.save_hf_checkpoint(path, config, _random_params(config))


def _random_params(config):
  """Random weights (std 0.1, norm scales around 1) filled in NumPy from init_params' shapes:
  no init program to compile."""
  shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def fill(path, x):
    offset = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (offset + 0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Programs compiled by the run are compiled again by every experiment rebuilt from its
  workdir (new jit objects, same HLO): a persistent cache for this module turns those compiles
  into reads. Restored afterwards, so other modules compile as before."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


class TrainedRun(NamedTuple):
  workdir: str
  files: dict  # path -> size after training: what every read must leave as it was


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TrainedRun:
  """A finished 2-step GRPO run on the 8 simulated devices, checkpoints at steps 1 and 2."""
  root = tmp_path_factory.mktemp("eval_export")
  data = _gsm8k_dir(root)
  records = [json.loads(line) for line in open(os.path.join(data, "train.jsonl"))][:200]
  hf = str(root / "tiny_hf")
  _tiny_hf_checkpoint(hf, [r["question"] + " " + r["answer"] for r in records])
  cfg = gsm8k_config.get_config("smoke")
  cfg.model.hf_checkpoint, cfg.data.path, cfg.grpo.stop_tokens = hf, data, STOP
  cfg.grpo.num_prompts = cfg.eval.batch_size = 8  # divisible by the 8 data-parallel devices
  cfg.checkpoint.every = 1
  # Rollouts decode as the eval's k samples do: the same program (shapes too), compiled once.
  cfg.grpo.temperature, cfg.grpo.top_p = cfg.eval.temperature, cfg.eval.top_p
  workdir = str(root / "run")
  trainer.train(cfg, workdir)
  return TrainedRun(workdir, _snapshot(workdir))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "hf")
  return export_hf.export(run.workdir, out)


@pytest.fixture(scope="module")
def report(run):
  return eval_cli.evaluate_workdir(run.workdir)


def _snapshot(workdir):
  """Every file under the workdir with its size."""
  return {os.path.relpath(os.path.join(d, n), workdir): os.path.getsize(os.path.join(d, n))
          for d, _, names in os.walk(workdir) for n in names}


def _ours(config, params, tokens, mask):
  positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
  forward = jax.jit(lambda p, t, q, m: models.forward(p, config, t, q, m)[0])
  return np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                            jnp.asarray(mask, jnp.int32)))


# ----------------------------------------------------------------------------- export


def test_export_loads_in_transformers_with_the_same_logits(run, exported):
  out = exported.out
  assert exported.step == 2 and exported.dtype == "float32" and not os.path.exists(out + ".tmp")
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json"):
    assert name in exported.files, name
  policy = runs.load_run(run.workdir)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  texts = [r["question"] for r in policy.experiment.data.task.eval[:3]]
  ids = [policy.tokenizer.encode(t)[:24] for t in texts]
  assert [hf_tok(t, add_special_tokens=False)["input_ids"][:24] for t in texts] == ids
  lengths = [len(x) for x in ids]
  tokens = np.zeros((len(ids), max(lengths)), np.int64)
  for row, x in enumerate(ids):
    tokens[row, :len(x)] = x
  mask = (np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  valid = mask.astype(bool)
  diff = np.abs(_ours(policy.model_config, policy.params, tokens, mask)[valid] -
                ref.numpy()[valid])
  assert diff.max() <= 1e-4
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  eos, stop = policy.tokenizer.eos_id, hf_tok.convert_tokens_to_ids(STOP)
  assert gen["eos_token_id"] == [eos, stop] and eos != stop
  assert gen["pad_token_id"] == policy.tokenizer.pad_id and gen["bos_token_id"] is None
  assert (gen["temperature"], gen["top_p"], gen["top_k"]) == (0.6, 0.95, 0)  # the eval decoding
  assert hf_model.generation_config.eos_token_id == [eos, stop]
  assert _snapshot(run.workdir) == run.files


def test_export_of_an_older_step_in_bfloat16_replaces_an_export(run, exported, tmp_path):
  out = str(tmp_path / "hf")
  shutil.copytree(exported.out, out)
  done = export_hf.export(run.workdir, out, step=1, dtype="bfloat16")
  assert done.step == 1 and not os.path.exists(out + ".tmp")
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  assert _snapshot(run.workdir) == run.files


def test_exported_model_evaluates_like_the_run(run, exported, report):
  """The export on the run's task through --hf_checkpoint: its weights and tokenizer files
  give the run's greedy completions."""
  theirs = eval_cli.evaluate_hf(exported.out, runs.read_config(run.workdir))
  assert theirs.model == exported.out and theirs.step is None
  assert theirs.samples == report.samples
  assert (theirs.accuracy_strict, theirs.accuracy_lenient, theirs.format) == (
      report.accuracy_strict, report.accuracy_lenient, report.format)


def test_export_refuses_to_replace_what_is_not_an_export(run, tmp_path):
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "keep.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not a Hugging Face checkpoint"):
    export_hf.export(run.workdir, str(tmp_path / "notes"))
  for out in (run.workdir, os.path.dirname(run.workdir)):
    with pytest.raises(ConfigError, match="is the workdir"):
      export_hf.export(run.workdir, out)
  assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
  assert _snapshot(run.workdir) == run.files


def test_sentencepiece_export_tokenizes_like_ours(tmp_path):
  """The offline default's trained tokenizer.model, with the tokenizer_config.json the export
  writes, gives transformers the same ids on the task's text."""
  texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in arithmetic.generate(300, 0)]
  tok = train_sentencepiece(texts, model_prefix=str(tmp_path / "tokenizer"), vocab_size=200)
  config = models.get_config("tiny_llama", vocab_size=tok.vocab_size)
  offline = types.SimpleNamespace(  # what _copy_tokenizer reads of a Run
      settings=types.SimpleNamespace(tokenizer_path="", init_from="",
                                     model=types.SimpleNamespace(hf_checkpoint="")),
      workdir=str(tmp_path), tokenizer=tok, model_config=config)
  out = tmp_path / "out"
  out.mkdir()
  export_hf._copy_tokenizer(offline, str(out))  # pylint: disable=protected-access
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
      tok.bos_id, tok.eos_id, tok.pad_id)
  for text in texts[:50]:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text


# ----------------------------------------------------------------------------- evaluation


def test_eval_matches_the_runs_last_eval(run, report, tmp_path):
  last = [r for r in metrics.read_metrics(run.workdir) if "eval/accuracy" in r][-1]
  assert last["step"] == 2 and report.step == 2
  assert {k: last[k] for k in report.figures} == report.figures  # same keys, same draws
  assert report.accuracy_lenient == last["eval/accuracy"]
  assert report.accuracy_strict == last["eval/accuracy_strict"]
  assert report.pass_at_k == last["eval/pass_at_2"]
  assert report.maj_at_k_strict == last["eval/strict_maj_at_2"]
  assert (report.num_problems, report.k, report.pass_k_problems) == (4, 2, 2)
  logged = [json.loads(line) for line in open(os.path.join(run.workdir, "samples.jsonl"))]
  logged = [{k: v for k, v in r.items() if k not in ("step", "phase")} for r in logged
            if r["phase"] == "eval" and r["step"] == 2]
  assert report.samples == logged and logged  # the same greedy completions, word for word
  json_path, md_path = eval_cli.write_report(report, str(tmp_path / "res.json"))
  saved = json.load(open(json_path))
  assert saved["accuracy_strict"] == report.accuracy_strict and saved["step"] == 2
  assert "| greedy pass@1 | 4 |" in open(md_path).read()
  assert _snapshot(run.workdir) == run.files


def test_eval_of_an_older_step_with_other_sizes(run):
  seen = []
  report = eval_cli.evaluate_workdir(run.workdir, step=1, overrides=eval_cli.eval_overrides(
      num_problems=8, k=1), progress=lambda *a: seen.append(a))
  assert report.step == 1 and report.num_problems == 8
  assert report.pass_at_k is None and report.pass_k_problems == 0
  assert seen == [("greedy", 1, 1)]  # one batch of 8: one progress call


def test_overrides_name_unknown_fields(run):
  cfg = runs.read_config(run.workdir)
  assert runs.apply_overrides(cfg, {"eval.k": 4}).eval.k == 4 and cfg.eval.k == 2
  with pytest.raises(ConfigError, match="config.eval.nope"):
    runs.apply_overrides(cfg, {"eval.nope": 1})


def test_strict_and_lenient_readings():
  assert evaluation.answer_key("so it is 12") == 12
  assert evaluation.answer_key("so it is 12", strict=True) is None
  assert evaluation.answer_key("#### 12 then 13", strict=True) == 12
  groups = [["it is 5", "it is 5", "#### 4"], ["#### 7", "7", "8"]]
  at_k = evaluation._at_k  # pylint: disable=protected-access
  # lenient: 5 is right in group 0 (majority 5), 7 in group 1; strict: only "####" answers
  # vote, so group 0's majority is 4 (wrong) and group 1's is 7.
  assert at_k(groups, ["5", "7"], strict=False) == (1.0, 1.0)
  assert at_k(groups, ["5", "7"], strict=True) == (0.5, 0.5)


# ----------------------------------------------------------------------------- errors


def _corrupt(workdir, step):
  """Truncate every file of a step's saved state (a torn copy)."""
  for d, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    for n in names:
      with open(os.path.join(d, n), "r+b") as f:
        f.truncate(max(os.path.getsize(os.path.join(d, n)) // 3, 1))


@pytest.fixture
def damaged(run, tmp_path):
  """A copy of the run whose step 2 is corrupted, and one with no checkpoints."""
  copy = str(tmp_path / "copy")
  shutil.copytree(run.workdir, copy)
  _corrupt(copy, 2)
  empty = str(tmp_path / "empty")
  shutil.copytree(run.workdir, empty, ignore=shutil.ignore_patterns("checkpoints"))
  return copy, empty


@pytest.mark.parametrize("read", ["load", "eval", "export"])
def test_bad_workdirs_are_clear_errors_that_touch_nothing(damaged, tmp_path, read):
  copy, empty = damaged
  fn = {"load": runs.load_run, "eval": eval_cli.evaluate_workdir,
        "export": lambda w, step=None: export_hf.export(w, str(tmp_path / "out"), step=step)}[read]
  with pytest.raises(ConfigError, match="does not exist"):
    fn(str(tmp_path / "missing"))
  with pytest.raises(ConfigError, match=re.escape(f"no checkpoint in {empty}")):
    fn(empty)
  before = _snapshot(copy)
  with pytest.raises(ConfigError, match=re.escape(f"{copy}/checkpoints/2")):
    fn(copy, step=2)
  with pytest.raises(ConfigError, match="no checkpoint for step 5"):
    fn(copy, step=5)
  assert _snapshot(copy) == before and not os.path.exists(tmp_path / "out")
  (tmp_path / "missing_config").mkdir()
  with pytest.raises(ConfigError, match="config.json does not exist"):
    fn(str(tmp_path / "missing_config"))


def test_unreadable_latest_falls_back_without_moving_it(damaged):
  copy, _ = damaged
  before = _snapshot(copy)
  policy = runs.load_run(copy)
  assert (policy.step, policy.skipped) == (1, (2,))
  assert _snapshot(copy) == before  # read-only: the damaged step stays where it is
  _corrupt(copy, 1)
  with pytest.raises(ConfigError, match="no readable checkpoint"):
    runs.load_run(copy)


def test_command_line_errors_are_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  for cmd in (["-m", "experiments.eval", f"--workdir={tmp_path / 'nope'}"],
              ["-m", "tools.export_hf", f"--workdir={tmp_path / 'nope'}",
               f"--out={tmp_path / 'out'}"]):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: workdir {tmp_path / 'nope'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
