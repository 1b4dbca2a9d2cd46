"""On-policy distillation: the teacher's per-token log-probs against an independent forward pass,
the advantage's sign and zero point, a LoRA student, and bad teachers named before compiling."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import arithmetic
from grpo_jax import distill, metrics, models, settings, trainer, updates
from grpo_jax import train_step as ts

SMOKE_MODEL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_heads=2,
                   num_kv_heads=2, head_dim=16)


def _save_model(path, seed, **overrides):
  config = models.get_config("tiny_llama", **{**SMOKE_MODEL, **overrides})
  models.save_hf_checkpoint(str(path), config, models.init_params(config, jax.random.key(seed)))
  return str(path), config


def _config(teacher, *variants, steps=2):
  cfg = arithmetic.get_config(",".join(("smoke",) + variants))
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.eval.every = 8, steps, 0
  cfg.grpo.algorithm, cfg.distill.teacher = "distill", teacher
  cfg.sft.steps = 0  # distillation needs no warm start (and no reward)
  cfg.eval.k = 1  # no pass@k sampler to compile
  return cfg


def _grpo_rows(workdir):
  return [r for r in metrics.read_metrics(workdir) if r.get("phase") == "grpo" and "loss" in r]


def test_advantage_is_teacher_minus_student_on_the_mask():
  t = np.array([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
  s = np.array([[-1.5, -1.0, -0.5], [-0.2, -0.3, -9.0]])
  mask = np.array([[1, 1, 0], [1, 1, 1]])
  np.testing.assert_allclose(distill.advantages(t, s, mask),
                             [[0.5, -1.0, 0.0], [0.1, -2.7, 8.0]], rtol=1e-6)
  fig = distill.figures(distill.advantages(t, s, mask), mask)
  np.testing.assert_allclose(fig["distill/reverse_kl"], -(0.5 - 1.0 + 0.1 - 2.7 + 8.0) / 5,
                             rtol=1e-6)


def test_the_teachers_logprobs_are_its_own_forward_pass(tmp_path, monkeypatch):
  """A larger teacher (3 layers, width 48) scores the student's tokens: the advantages the
  update receives are its log-probs, recomputed here from its full logits, minus the
  sampler's; a teacher that is the student itself (same weights, float32) gives ~0."""
  big, big_config = _save_model(tmp_path / "big", 1, num_layers=3, hidden_size=48,
                                num_heads=3, num_kv_heads=3)
  seen = []
  real = distill.advantages
  monkeypatch.setattr(distill, "advantages", lambda t, s, m: (seen.append((t, s, m)),
                                                                real(t, s, m))[1])
  batches = []
  real_dispatch = updates.dispatch_update
  monkeypatch.setattr(updates, "dispatch_update", lambda device, g, state, ready, frozen=None: (
      batches.append(jax.device_get(ready.batch)), real_dispatch(device, g, state, ready,
                                                                 frozen))[1])
  trainer.train(_config(big), str(tmp_path / "run"))
  assert len(seen) == len(batches) == 2
  _, params = models.load_hf_checkpoint(big)
  for (teacher_lp, sampler_lp, mask), batch in zip(seen, batches):
    tokens = jnp.concatenate([batch.prompt_tokens, batch.completion_tokens], 1)
    attn = jnp.concatenate([batch.prompt_mask, jnp.ones_like(batch.completion_tokens)], 1)
    logits, _ = models.forward(params, big_config, tokens,
                               jnp.maximum(jnp.cumsum(attn, 1) - 1, 0), attn)
    P = batch.prompt_tokens.shape[1]
    want = ts.token_logprobs(logits[:, P - 1:-1], batch.completion_tokens)
    valid = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(teacher_lp)[valid], np.asarray(want)[valid],
                               atol=2e-5)
    np.testing.assert_allclose(batch.advantages, np.where(valid, want - sampler_lp, 0.0),
                               atol=2e-5)
  rows = _grpo_rows(tmp_path / "run")
  assert all(r["distill/reverse_kl"] > 1e-3 for r in rows)  # random teacher, other student

  same, _ = _save_model(tmp_path / "same", 2)
  shutil.copy(tmp_path / "run" / "tokenizer.model", same)  # the student reads it from there
  cfg = _config(same, steps=1)
  cfg.model.hf_checkpoint = same  # the student starts as the teacher
  trainer.train(cfg, str(tmp_path / "self"))
  for row in _grpo_rows(tmp_path / "self")[:1]:
    assert abs(row["distill/reverse_kl"]) < 1e-5, row


def test_a_lora_student_distills(tmp_path):
  teacher, _ = _save_model(tmp_path / "teacher", 3, num_layers=3)
  trainer.train(_config(teacher, "lora", steps=3), str(tmp_path / "run"))
  rows = _grpo_rows(tmp_path / "run")
  assert len(rows) == 3 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
  assert (tmp_path / "run" / "lora_adapter").is_dir()


def test_bad_teachers_are_named_before_compiling(tmp_path):
  from grpo_jax import experiment  # pylint: disable=import-outside-toplevel
  small, _ = _save_model(tmp_path / "small_vocab", 0, vocab_size=128)
  for teacher, says in ((str(tmp_path / "nowhere"), "does not exist"),
                        (small, "vocab_size 128, fewer than the student's tokenizer")):
    with pytest.raises(settings.ConfigError, match=f"config.distill.teacher: .*{says}"):
      experiment.build(settings.from_config(_config(teacher), 8), str(tmp_path / "w"))
  cfg = _config("")
  with pytest.raises(settings.ConfigError, match="config.distill.teacher and config.grpo."
                                                 "algorithm = 'distill' go together"):
    settings.from_config(cfg, 8)
