"""DeepSeekMath's claims as experiments: every run of a claim, over seeds, with a table, a plot and
a verdict.

  python -m tools.reproduce --claim=paradigms --seeds=0,1,2 --out=experiments/results/claims
  python -m tools.reproduce --claim=majk --seeds=0,1,2 --out=experiments/results/claims
  python -m tools.reproduce --claim=iterative --seeds=0,1,2 --out=experiments/results/claims
  python -m tools.reproduce --claim=paradigms --seeds=0 --out=/tmp/c --smoke   # seconds: a check
  python -m tools.reproduce --claim=paradigms --seeds=0 --out=/tmp/g \
      --config=experiments/configs/gsm8k.py:qwen2.5-0.5b    # at scale (an accelerator)

Claims (DeepSeekMath, section 5.2):
  paradigms  Figure 5: RFT < Online RFT < GRPO (outcome) <= GRPO (process), held-out greedy
             accuracy over training steps;
  iterative  Figure 6: iterative GRPO (the learned reward model retrained on the policy's own
             samples with replay, the reference reset) beats one iteration; logs the reward
             model's agreement with the exact answer on fresh samples (`rm_agreement`) and the
             rate of reward hacking (high reward, wrong answer: `reward_hacking`); each pair
             with three rewards: the RM's probability alone (the paper's), added to the exact
             answer's ("_rule") and alone with unscaled advantages ("_unscaled"; both guards
             of later work against hacking); --every sets how often the RM is retrained;
  majk       Figure 7: RL raises Maj@K (and greedy accuracy) more than Pass@K, K = 1 .. 64: the
             warm start against the paradigms claim's GRPO run of the same seed.

Per seed, one SFT warm start (<out>/seed<s>/warmstart, shared by the claims) and each method from
it (`--config.init_from`), the same data, model and step budget; runs already finished are kept.
Writes <out>/<claim>.json (every figure), <out>/<claim>.md (the table: mean and 95% t-interval
over seeds, and the verdict) and <out>/<claim>.png. --config is any experiment config (default:
the "multistep" task, experiments/configs/multistep.py); --set adds --config.key=value flags to
every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grpo_jax import metrics  # noqa: E402

DEFAULT_CONFIG = "experiments/configs/multistep.py"
_ORM = ["--config.grpo.algorithm=grpo", "--config.grpo.rewards.exact_answer=0.0",
        "--config.grpo.loss.beta=0.04", "--config.reward_model.enabled=True",
        "--config.reward_model.kind=orm", "--config.reward_model.weight=1.0"]
_GUARDS = {"": [], "_rule": ["--config.grpo.rewards.exact_answer=1.0"],  # the last flag wins
           "_unscaled": ["--config.grpo.advantage_scale=none"]}
METHODS = {
    "paradigms": {
        "rft": ["--config.grpo.algorithm=rft"],
        "online_rft": ["--config.grpo.algorithm=online_rft"],
        "grpo": ["--config.grpo.algorithm=grpo"],
        "grpo_process": ["--config.grpo.algorithm=grpo", "--config.grpo.supervision=process"],
    },
    # The ORM trained once on the warm start's samples, or every --every (25) steps, as the reward:
    # alone (the paper's), added to the exact answer's 0 / 1 ("_rule": Qwen2.5-Math's
    # r = sigmoid(RM) + (verifier - 1) up to a shift: the RM ranks the right answers among
    # themselves and the wrong ones, never a wrong one above a right one), or alone with the
    # group mean as the only baseline ("_unscaled": Dr. GRPO's advantages, r - mean: a group
    # whose RM scores barely differ gets a small update, not one amplified to unit size).
    "iterative": {f"{name}{guard}": [*_ORM, *extra, f"--config.reward_model.iteration_steps={n}"]
                  for guard, extra in _GUARDS.items()
                  for name, n in (("one_iteration", "0"), ("iterative", "{every}"))},
}
CLAIMS = ("paradigms", "iterative", "majk")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262}  # Student's t, 97.5% quantile, by degrees of freedom


def interval(values) -> tuple[float, float]:
  """(mean, half-width of the 95% t-interval) over seeds; half-width nan for one seed."""
  v = np.asarray(values, np.float64)
  if len(v) < 2:
    return float(v.mean()), float("nan")
  return float(v.mean()), T_975.get(len(v) - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(len(v))


def fmt(values, scale: float = 100.0) -> str:
  mean, half = interval(values)
  return f"{scale * mean:.1f}" + ("" if math.isnan(half) else f" ± {scale * half:.1f}")


class Runner:
  """Launches `experiments.train` runs (skipping finished ones) under <out>/seed<s>/."""

  def __init__(self, args):
    self.out, self.config, self.extra = args.out, args.config, [f"--config.{kv}" for kv in args.set]
    self.smoke, self.every = args.smoke, args.every

  def workdir(self, seed: int, name: str) -> str:
    return os.path.join(self.out, f"seed{seed}", name)

  def train(self, seed: int, name: str, flags: list[str]) -> str:
    workdir = self.workdir(seed, name)
    if not _finished(workdir):
      cmd = [sys.executable, "-m", "experiments.train", f"--config={self.config}",
             f"--workdir={workdir}", f"--config.seed={seed}", f"--config.data.seed={seed}",
             *flags, *self.extra]
      print("+", " ".join(cmd), flush=True)
      subprocess.run(cmd, cwd=ROOT, check=True)
    return workdir

  def warm_start(self, seed: int) -> str:
    return self.train(seed, "warmstart", ["--config.grpo.steps=0"])

  def method(self, claim: str, seed: int, name: str) -> str:
    every = 2 if self.smoke else self.every
    flags = [f.format(every=every) for f in METHODS[claim][name]]
    return self.train(seed, name, [f"--config.init_from={self.warm_start(seed)}", *flags])


def _finished(workdir: str) -> bool:
  """A run that wrote its final evaluation: at its config's last GRPO step."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")) or not os.path.exists(path):
    return False
  with open(path) as f:
    steps = json.load(f)["grpo"]["steps"]
  return any(r.get("step") == steps for r in metrics.read_metrics(workdir)
             if "eval/accuracy" in r and r.get("phase") == "grpo")


def wall_s(workdir: str) -> float:
  """A run's wall time: from its config.json (written once its inputs are built) to its last
  metrics row (the process's start-up, a few seconds, not counted)."""
  rows = metrics.read_metrics(workdir)
  return float(rows[-1]["time"] - os.path.getmtime(os.path.join(workdir, "config.json")))


def eval_curve(workdir: str) -> list[tuple[int, float]]:
  return [(r["step"], r["eval/accuracy"]) for r in metrics.read_metrics(workdir)
          if "eval/accuracy" in r and r.get("phase") == "grpo"]


def grpo_rows(workdir: str) -> list[dict]:
  return [r for r in metrics.read_metrics(workdir) if r.get("phase") == "grpo" and "loss" in r]


# ----------------------------------------------------------------------------- the claims


def paradigms(runner: Runner, seeds: list[int], methods: list[str]) -> dict:
  runs = {name: {s: eval_curve(runner.method("paradigms", s, name)) for s in seeds}
          for name in methods}
  start = {s: eval_curve(runner.warm_start(s))[0][1] for s in seeds}
  final = {name: [curves[s][-1][1] for s in seeds] for name, curves in runs.items()}
  order = [("rft", "online_rft", ">"), ("online_rft", "grpo", ">"), ("grpo", "grpo_process", ">=")]
  verdicts = [_compare(final, a, b, op) for a, b, op in order if a in final and b in final]
  rows = ["| method | held-out greedy accuracy at the end (%) | gain over the warm start "
          "(points) |", "|---|---|---|",
          f"| warm start (SFT) | {fmt(list(start.values()))} | |"]
  rows += [f"| {name} | {fmt(v)} | {fmt(np.subtract(v, list(start.values())))} |"
           for name, v in final.items()]
  return {"runs": runs, "start": start, "final": final, "verdicts": verdicts, "trained": methods,
          "reproduced": len(verdicts) == len(order) and all(v["holds"] for v in verdicts),
          "table": rows}


def _compare(final: dict, a: str, b: str, op: str) -> dict:
  """b `op` a over seeds (paired by seed): the mean difference, its interval, whether it holds
  (the mean; and "clearly": the interval excludes 0), in points."""
  diff = np.subtract(final[b], final[a])
  mean, half = interval(diff)
  holds = mean > 0 if op == ">" else mean >= -(0 if math.isnan(half) else half)
  return {"claim": f"{b} {op} {a}", "difference": 100 * mean, "interval": 100 * half,
          "holds": bool(holds), "clearly": bool(not math.isnan(half) and mean - half > 0)}


def _verdict(claim: str, holds: bool, per_seed) -> dict:
  """A verdict with its per-seed differences' mean and 95% interval, in points."""
  mean, half = interval(per_seed) if len(per_seed) else (float("nan"), float("nan"))
  return {"claim": claim, "holds": bool(holds), "difference": 100 * mean, "interval": 100 * half,
          "clearly": bool(holds and not math.isnan(half) and mean - half > 0)}


def iterative(runner: Runner, seeds: list[int], names: list[str]) -> dict:
  work = {name: {s: runner.method("iterative", s, name) for s in seeds} for name in names}
  final = {name: [eval_curve(w[s])[-1][1] for s in seeds] for name, w in work.items()}
  tail = lambda rows, key: float(np.mean([r[key] for r in rows[-20:]]))  # noqa: E731
  rm = {name: {key: [tail(grpo_rows(w[s]), key) for s in seeds]
               for key in ("rm_agreement", "reward_hacking")} for name, w in work.items()}
  final["warm start"] = [eval_curve(runner.warm_start(s))[0][1] for s in seeds]
  verdicts, holds_with = [], []
  for guard in _GUARDS:  # the paper's figure, and that RL with the RM helps at all
    if {"one_iteration" + guard, "iterative" + guard} <= set(names):
      pair = [_compare(final, "one_iteration" + guard, "iterative" + guard, ">"),
              _compare(final, "warm start", "iterative" + guard, ">")]
      verdicts += pair
      holds_with += ["iterative" + guard] if all(v["holds"] for v in pair) else []
  del final["warm start"]
  rows = ["| method | held-out greedy accuracy (%) | RM agreement with the exact answer, last "
          "20 steps (%) | reward hacking, last 20 steps (%) |", "|---|---|---|---|"]
  rows += [f"| {name} | {fmt(final[name])} | {fmt(rm[name]['rm_agreement'])} | "
           f"{fmt(rm[name]['reward_hacking'])} |" for name in names]
  return {"runs": {n: {s: eval_curve(w[s]) for s in seeds} for n, w in work.items()},
          "trained": names,
          "final": final, "rm": rm, "verdicts": verdicts, "reproduced_with": holds_with,
          "reproduced": bool(holds_with), "table": rows}


def majk(runner: Runner, seeds: list[int], k: int, problems: int) -> dict:
  """Pass@K and Maj@K of the warm start and of the paradigms claim's GRPO run, K = 1 .. k."""
  curves = {}
  for name in ("warmstart", "grpo"):
    for s in seeds:
      workdir = (runner.warm_start(s) if name == "warmstart"
                 else runner.method("paradigms", s, "grpo"))
      out = os.path.join(workdir, f"eval_k{k}.json")
      if not os.path.exists(out):  # `python -m experiments.eval`'s work, in this process
        from experiments import eval as eval_lib  # pylint: disable=import-outside-toplevel
        print(f"+ experiments.eval --workdir={workdir} --k={k} --num_problems={problems} "
              f"--pass_k_problems={problems} --out={out}", flush=True)
        report = eval_lib.evaluate_workdir(workdir, overrides=eval_lib.eval_overrides(
            problems, k, problems), progress=eval_lib.progress_printer())
        eval_lib.write_report(report, out)
      with open(out) as f:
        report = json.load(f)
      curves.setdefault(name, {})[s] = {"greedy": report["accuracy_lenient"],
                                        **{int(K): v for K, v in report["curve"].items()}}
  ks = sorted(K for K in curves["grpo"][seeds[0]] if K != "greedy")
  gain = lambda K, i: [curves["grpo"][s][K][i] - curves["warmstart"][s][K][i]  # noqa: E731
                       for s in seeds]
  greedy_gain = [curves["grpo"][s]["greedy"] - curves["warmstart"][s]["greedy"] for s in seeds]
  rows = ["| K | Pass@K warm start | Pass@K GRPO | gain | Maj@K warm start | Maj@K GRPO | gain |",
          "|---|---|---|---|---|---|---|"]
  for K in ks:
    at = lambda name, i: [curves[name][s][K][i] for s in seeds]  # noqa: E731
    rows.append(f"| {K} | {fmt(at('warmstart', 0))} | {fmt(at('grpo', 0))} | {fmt(gain(K, 0))} "
                f"| {fmt(at('warmstart', 1))} | {fmt(at('grpo', 1))} | {fmt(gain(K, 1))} |")
  rows.append(f"| greedy | {fmt([curves['warmstart'][s]['greedy'] for s in seeds])} | "
              f"{fmt([curves['grpo'][s]['greedy'] for s in seeds])} | {fmt(greedy_gain)} | | | |")
  # Maj@2 is no majority: of two different answers it keeps the first, so Maj@2 = Pass@1 in
  # expectation; the claim is read from K = 4 on.
  big = [K for K in ks if K >= 4]
  maj_more = [float(np.mean(gain(K, 1)) - np.mean(gain(K, 0))) for K in big]
  per_seed = np.mean([np.subtract(gain(K, 1), gain(K, 0)) for K in big], axis=0) if big else []
  verdicts = [_verdict("Maj@K gains more than Pass@K, every K >= 4 (difference: mean over K)",
                       bool(maj_more) and min(maj_more) > 0, per_seed),
              _verdict(f"greedy gains more than Pass@{ks[-1]}",
                       float(np.mean(greedy_gain)) > float(np.mean(gain(ks[-1], 0))),
                       np.subtract(greedy_gain, gain(ks[-1], 0)))]
  return {"curves": curves, "verdicts": verdicts, "table": rows, "trained": ["grpo"],
          "reproduced": all(v["holds"] for v in verdicts)}


# ----------------------------------------------------------------------------- output


def plot(claim: str, result: dict, path: str) -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if claim == "majk":
    for name, style in (("warmstart", "--"), ("grpo", "-")):
      seeds = sorted(result["curves"][name])
      ks = sorted(K for K in result["curves"][name][seeds[0]] if K != "greedy")
      for i, label in ((0, "Pass@K"), (1, "Maj@K")):
        mean = [np.mean([result["curves"][name][s][K][i] for s in seeds]) for K in ks]
        ax.plot(ks, mean, style, marker="o", label=f"{label}, {name}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
  else:
    guards = sorted(_GUARDS, key=len, reverse=True)  # "_unscaled" before ""
    for name, per_seed in result["runs"].items():  # the mean, and each seed thin
      seeds = sorted(per_seed)
      steps = [step for step, _ in per_seed[seeds[0]]]
      acc = np.array([[a for _, a in per_seed[s]] for s in seeds])
      style = {}  # iterative: a colour per reward, the RM trained once dashed
      if claim == "iterative":
        guard = next(g for g in guards if name.endswith(g))
        style = {"color": f"C{list(_GUARDS).index(guard)}",
                 "linestyle": "--" if name.startswith("one_iteration") else "-"}
      line, = ax.plot(steps, acc.mean(0), marker="o", label=f"{name} (mean of {len(seeds)})",
                      **style)
      for row in acc if len(seeds) > 1 else ():
        ax.plot(steps, row, color=line.get_color(), alpha=0.3, linewidth=0.8)
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
  ax.set_ylabel("held-out accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write(out: str, claim: str, result: dict, seeds: list[int]) -> None:
  os.makedirs(out, exist_ok=True)
  result["wall_s"] = {f"seed{s}/{name}": round(wall_s(os.path.join(out, f"seed{s}", name)), 1)
                      for s in seeds for name in ["warmstart", *result["trained"]]}
  with open(os.path.join(out, f"{claim}.json"), "w") as f:
    json.dump({"seeds": seeds, **result}, f, indent=1, default=str)
  lines = [*result["table"], "", "| claim | holds (mean over seeds) | clearly (95% interval "
           "excludes 0) | difference (points) |", "|---|---|---|---|"]
  for v in result["verdicts"]:
    spread = v.get("interval", float("nan"))
    diff = f"{v['difference']:+.1f}" + ("" if math.isnan(spread) else f" ± {spread:.1f}")
    lines.append(f"| {v['claim']} | {'yes' if v['holds'] else 'no'} | "
                 f"{'yes' if v.get('clearly') else '-'} | {diff} |")
  walls = result["wall_s"]
  lines += ["", f"Runs: {len(walls)}, wall time each {min(walls.values()):.0f}-"
            f"{max(walls.values()):.0f} s (warm starts included; {claim}.json lists them)."]
  lines += ["", f"Reproduced: {'yes' if result['reproduced'] else 'no'} (seeds "
            f"{', '.join(map(str, seeds))}"
            + ("" if result["verdicts"] else "; not every method was run")
            + (f"; both orderings hold with {', '.join(result['reproduced_with'])} only"
               if result.get("reproduced_with") else "") + ")."]
  with open(os.path.join(out, f"{claim}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print("figure:", plot(claim, result, os.path.join(out, f"{claim}.png")))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--claim", required=True, choices=CLAIMS)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", default="experiments/results/claims")
  parser.add_argument("--config", default=None, help=f"default: {DEFAULT_CONFIG}")
  parser.add_argument("--smoke", action="store_true", help="the default config's smoke variant")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a --config.KEY=VALUE flag for every run")
  parser.add_argument("--methods", default="", help="paradigms / iterative: some of the "
                      "claim's methods (default: all; a verdict needs both of its methods)")
  parser.add_argument("--every", type=int, default=25, help="iterative: GRPO steps between the "
                      "reward model's retrainings")
  parser.add_argument("--k", type=int, default=64, help="majk: samples per problem")
  parser.add_argument("--problems", type=int, default=200, help="majk: held-out problems")
  args = parser.parse_args(argv)
  if args.config is None:
    args.config = DEFAULT_CONFIG + (":smoke" if args.smoke else "")
  elif args.smoke:
    parser.error("--smoke picks the default config's smoke variant: with --config, name the "
                 "variant in it (--config=...py:smoke)")
  args.out = os.path.abspath(args.out)
  seeds = [int(s) for s in args.seeds.split(",")]
  runner = Runner(args)
  methods = list(METHODS.get(args.claim, ()))
  if args.methods:
    unknown = sorted(set(args.methods.split(",")) - set(methods))
    if unknown:
      parser.error(f"--methods: {unknown} are not methods of {args.claim} ({', '.join(methods)})")
    methods = [m for m in methods if m in args.methods.split(",")]
  if args.claim == "paradigms":
    result = paradigms(runner, seeds, methods)
  elif args.claim == "iterative":
    result = iterative(runner, seeds, methods)
  else:
    result = majk(runner, seeds, args.k, args.problems)
  write(args.out, args.claim, result, seeds)
  return 0


if __name__ == "__main__":
  sys.exit(main())
