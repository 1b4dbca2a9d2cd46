"""The persistent compilation cache (on by default) and the profiler trace option."""

import glob
import os

from experiments.configs import arithmetic as arithmetic_config
from grpo_jax import settings, trainer
import test_trainer  # tests/ is on sys.path (pytest rootdir-less import mode), as multihost_worker


def test_compile_cache_dir_settings(monkeypatch):
  monkeypatch.setenv("GRPO_JAX_COMPILE_CACHE", "off")
  assert trainer.compile_cache_dir() is None
  monkeypatch.setenv("GRPO_JAX_COMPILE_CACHE", "/some/where")
  assert trainer.compile_cache_dir() == "/some/where"


def test_second_launch_compiles_nothing(tmp_path):
  """Two launches of the same config with a fresh cache: the first fills it, the second adds
  no entry (every program is loaded, none compiled)."""
  cache = tmp_path / "cache"
  env = {"GRPO_JAX_COMPILE_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": ""}
  flags = test_trainer.SMOKE + ["--config.grpo.steps=2", "--config.sft.steps=2"]
  code, out = test_trainer.launch(tmp_path / "a", *flags, env_extra=env)
  assert code == 0, out[-3000:]
  first = sorted(os.listdir(cache))
  assert len(first) > 5, first
  code, out = test_trainer.launch(tmp_path / "b", *flags, env_extra=env)
  assert code == 0, out[-3000:]
  assert sorted(os.listdir(cache)) == first
  rows = [test_trainer.comparable(tmp_path / d) for d in ("a", "b")]
  assert rows[0] == rows[1]  # loaded programs compute what compiled ones did


def test_profile_steps_write_a_trace(tmp_path):
  cfg = arithmetic_config.get_config("smoke")
  cfg.grpo.num_prompts, cfg.grpo.steps, cfg.profile_steps = 8, 3, "2-3"
  trainer.train(cfg, str(tmp_path))
  assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
  cfg.profile_steps = "3-2"
  try:
    settings.from_config(cfg, 8)
  except settings.ConfigError as e:
    assert "config.profile_steps" in str(e)
  else:
    raise AssertionError("a reversed range must be a ConfigError")
