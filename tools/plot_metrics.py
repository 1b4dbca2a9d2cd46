"""Plots a run's `metrics.jsonl` as a PNG grid of curves (one subplot per figure, x = step).

    python tools/plot_metrics.py WORKDIR                         # -> WORKDIR/metrics.png
    python tools/plot_metrics.py WORKDIR --out curves.png --keys eval/accuracy,reward,kl
    python tools/plot_metrics.py RUN_A RUN_B --label base --label dapo --out compare.png

Each subplot draws one line per (workdir, phase), e.g. `sft` and `grpo`; points logged only once
(an eval at step 0) show as markers. Default keys: those present among DEFAULT_KEYS, where a `*`
stands for what the config chose (`eval/pass_at_*` -> `eval/pass_at_8`); --keys takes patterns
too. Needs matplotlib (`pip install grpo_jax[plot]`); uses the Agg backend, so no display is
required.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import os
import re
import sys
from collections.abc import Sequence

from grpo_jax.metrics import RESERVED_KEYS, read_metrics

# The trainer names pass@k / maj@k after the configured k (eval/pass_at_8), hence the patterns.
DEFAULT_KEYS = ("eval/accuracy", "eval/pass_at_*", "eval/maj_at_*", "reward", "kl", "loss",
                "clip_frac", "completion_length")


def curves(rows: Sequence[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
  """{phase: (steps, values)} of one key, in file order, skipping rows without a numeric value."""
  out: dict[str, tuple[list[int], list[float]]] = {}
  for row in rows:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    steps, values = out.setdefault(row.get("phase", ""), ([], []))
    steps.append(row["step"])
    values.append(float(value))
  return out


def logged_keys(runs: Sequence[Sequence[dict]]) -> list[str]:
  """Every figure name in the runs (not step/phase/time), in first-seen order."""
  seen: dict[str, None] = {}
  for rows in runs:
    for row in rows:
      seen.update((k, None) for k in row if k not in RESERVED_KEYS)
  return list(seen)


def natural_order(key: str) -> list:
  """Sort key comparing digit runs as numbers, so pass_at_4 < pass_at_16 (re.split with a group
  alternates text and digits, so like always meets like)."""
  return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", key))]


def resolve_keys(runs: Sequence[Sequence[dict]], candidates: Sequence[str]) -> list[str]:
  """The candidates with each `*` pattern replaced by the logged keys it matches, in natural
  order; plain names pass through whether logged or not. No duplicates."""
  logged = logged_keys(runs)
  out: dict[str, None] = {}
  for candidate in candidates:
    if "*" in candidate:
      matches = [k for k in logged if fnmatch.fnmatchcase(k, candidate)]
      out.update((k, None) for k in sorted(matches, key=natural_order))
    else:
      out[candidate] = None
  return list(out)


def present_keys(runs: Sequence[Sequence[dict]], candidates: Sequence[str] = DEFAULT_KEYS
                 ) -> list[str]:
  """The resolved candidates that have at least one numeric value in any run, in candidate
  order."""
  return [k for k in resolve_keys(runs, candidates) if any(curves(rows, k) for rows in runs)]


def plot_workdirs(workdirs: Sequence[str], labels: Sequence[str] | None = None,
                  keys: Sequence[str] | None = None, out: str | None = None) -> str:
  """Draw the metrics of `workdirs` (labelled `labels`, default: the directory names) into the
  PNG `out` (default: `<first workdir>/metrics.png`); returns the path written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if labels is None or not labels:
    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = [read_metrics(w) for w in workdirs]
  asked = list(keys) if keys else list(DEFAULT_KEYS)
  keys = resolve_keys(runs, asked) if keys else present_keys(runs)
  if not keys:
    raise ValueError(f"none of the keys {asked} appears in {list(workdirs)}; pass --keys")
  out = out or os.path.join(workdirs[0], "metrics.png")

  cols = min(len(keys), 3)
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for label, rows in zip(labels, runs):
      for phase, (steps, values) in curves(rows, key).items():
        name = phase if len(runs) == 1 else f"{label} {phase}".strip()
        ax.plot(steps, values, marker="o" if len(steps) < 3 else None, markersize=4, label=name)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize="small")
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
  for ax in list(axes.flat)[len(keys):]:
    ax.set_visible(False)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
  parser.add_argument("--out", help="PNG to write (default: FIRST_WORKDIR/metrics.png)")
  parser.add_argument("--keys", help="comma-separated figures or * patterns to plot (default: "
                      f"those present among {','.join(DEFAULT_KEYS)})")
  parser.add_argument("--label", action="append", default=[],
                      help="legend label of each workdir, once per workdir, in order")
  args = parser.parse_args(argv)
  keys = [k for k in args.keys.split(",") if k] if args.keys else None
  try:
    out = plot_workdirs(args.workdirs, args.label or None, keys, args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"plot_metrics: {e}", file=sys.stderr)
    return 1
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
