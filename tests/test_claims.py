"""The paper's claims (tools/reproduce.py): pass@K / maj@K curves against a brute-force oracle,
the seed intervals, and every claim's command at smoke size (the runs, table, plot and
verdict written; majk reuses the paradigms claim's warm start and GRPO run)."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

from grpo_jax import evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import reproduce  # noqa: E402  pylint: disable=wrong-import-position


def test_the_at_k_curve_matches_brute_force():
  """pass@K: the mean over every K-subset of the k samples of "any right"; maj@K: the mean over
  the disjoint blocks of K of "the most common answer is right" (unparsed answers do not vote)."""
  rng = np.random.default_rng(0)
  answers = ["3", "7", "12"]
  groups = [[f"#### {rng.choice(['3', '4', '5', '7', '12'])}" if rng.uniform() > 0.1 else "no"
             for _ in range(8)] for _ in answers]
  curve = evaluation.at_k_curve(groups, answers)
  assert sorted(curve) == [1, 2, 4, 8]
  for K, (pass_at, maj_at) in curve.items():
    want_pass = np.mean([np.mean([any(g[i] == f"#### {a}" for i in subset)
                                  for subset in itertools.combinations(range(8), K)])
                         for g, a in zip(groups, answers)])
    want_maj = []
    for g, a in zip(groups, answers):
      blocks = []
      for b in range(8 // K):
        votes = [t[5:] for t in g[b * K:(b + 1) * K] if t.startswith("####")]
        top = max(set(votes), key=lambda v, votes=votes: (votes.count(v), -votes.index(v))) \
            if votes else None
        blocks.append(top == a)
      want_maj.append(np.mean(blocks))
    np.testing.assert_allclose(pass_at, want_pass, rtol=1e-12)
    np.testing.assert_allclose(maj_at, np.mean(want_maj), rtol=1e-12)


def test_intervals_and_verdicts():
  mean, half = reproduce.interval([0.5, 0.6, 0.7])
  assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / np.sqrt(3))
  assert np.isnan(reproduce.interval([0.4])[1])
  final = {"a": [0.5, 0.6, 0.55], "b": [0.7, 0.8, 0.75], "c": [0.69, 0.81, 0.74]}
  up = reproduce._compare(final, "a", "b", ">")  # pylint: disable=protected-access
  assert up["holds"] and up["clearly"] and up["difference"] == pytest.approx(20.0)
  tie = reproduce._compare(final, "b", "c", ">=")  # pylint: disable=protected-access
  assert tie["holds"] and not tie["clearly"]


@pytest.mark.parametrize("claim", ["paradigms", "iterative"])
def test_every_methods_flags_make_valid_settings(claim):
  """The runs the smoke test leaves out: each method's flags on the default config (and its
  smoke variant) are settings that build."""
  import ast  # pylint: disable=import-outside-toplevel
  from experiments.configs import multistep  # pylint: disable=import-outside-toplevel
  from grpo_jax import runs, settings  # pylint: disable=import-outside-toplevel
  assert reproduce.DEFAULT_CONFIG == "experiments/configs/multistep.py"
  value = lambda text: ast.literal_eval(text) if text[:1].isdigit() or text in (  # noqa: E731
      "True", "False") else text
  for name, method_flags in reproduce.METHODS[claim].items():
    overrides = dict(f.format(every=25)[len("--config."):].split("=", 1) for f in method_flags)
    for variant in ("local", "smoke"):
      cfg = runs.apply_overrides(multistep.get_config(variant),
                                 {k: value(v) for k, v in overrides.items()})
      s = settings.from_config(cfg, 1)
      assert s.rollout.paradigm is not None and s.data.task == "multistep", name


def test_every_claims_command_at_smoke_size(tmp_path):
  """paradigms with its GRPO run only and iterative with its iterative run only (the other
  methods' settings: above), majk on the GRPO run."""
  out = tmp_path / "claims"
  for claim, extra in (("paradigms", ["--methods=grpo"]), ("majk", ["--k=4", "--problems=8"]),
                       ("iterative", ["--methods=iterative"])):
    assert reproduce.main([f"--claim={claim}", "--seeds=0", f"--out={out}", "--smoke",
                           "--set=grpo.num_prompts=8", *extra]) == 0  # 8 simulated devices
    for suffix in (".json", ".md", ".png"):
      assert (out / f"{claim}{suffix}").stat().st_size > 0
    result = json.loads((out / f"{claim}.json").read_text())
    assert bool(result["verdicts"]) == (claim == "majk") and "reproduced" in result
    assert "Reproduced:" in (out / f"{claim}.md").read_text()
  runs = sorted(p.name for p in (out / "seed0").iterdir())
  assert runs == sorted(["warmstart", "grpo", "iterative"])
  paradigms = json.loads((out / "paradigms.json").read_text())
  assert [step for step, _ in paradigms["runs"]["grpo"]["0"]] == [0, 2, 4]
  majk = json.loads((out / "majk.json").read_text())
  assert sorted(majk["curves"]["grpo"]["0"]) == ["1", "2", "4", "greedy"]
  iterative = json.loads((out / "iterative.json").read_text())
  assert set(iterative["rm"]["iterative"]) == {"rm_agreement", "reward_hacking"}
  assert iterative["reproduced"] is False  # no verdict without both of its runs
  with pytest.raises(SystemExit):
    reproduce.main(["--claim=paradigms", "--smoke", "--config=experiments/configs/gsm8k.py"])
