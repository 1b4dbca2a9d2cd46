"""The Colab quickstart runs end to end (small settings) and shows training progress, and its
install cell finds a real source (no placeholder URL), so it cannot rot."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "quickstart.ipynb")


CELL_MARK = "<<< cell {} >>>"


def notebook_code(path: str, marks: bool = False) -> str:
  """The code cells, without shell (!) and magic (%) lines, which need IPython; with `marks`,
  each cell first prints CELL_MARK with its index, so the output can be split by cell."""
  cells = json.load(open(path))["cells"]
  lines = []
  for index, cell in enumerate(cells):
    if cell["cell_type"] == "code":
      src = "".join(cell["source"])
      if marks:
        lines.append(f"print({CELL_MARK.format(index)!r}, flush=True)")
      lines += [l for l in src.splitlines() if not l.lstrip().startswith(("!", "%"))]
  return "\n".join(lines)


def cell_outputs(stdout: str) -> dict[int, str]:
  """{cell index: what it printed} from the output of `notebook_code(path, marks=True)`."""
  pieces = re.split(CELL_MARK.format(r"(\d+)"), stdout)
  return {int(index): text for index, text in zip(pieces[1::2], pieces[2::2])}


def install_cell(path: str) -> str:
  """The one code cell that installs grpo_jax (it reads GRPO_JAX_SOURCE)."""
  cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
  (cell,) = [c for c in cells if "GRPO_JAX_SOURCE" in "".join(c["source"])]
  return "".join(cell["source"])


def run_install_cell(cwd, **env_overrides) -> subprocess.CompletedProcess:
  """The install cell in a fresh interpreter, forced past its "already importable" shortcut
  (grpo_jax is importable in the test environment), with GRPO_JAX_SOURCE only where given."""
  env = {k: v for k, v in os.environ.items() if k != "GRPO_JAX_SOURCE"}
  env |= {"GRPO_QUICKSTART_FORCE_INSTALL": "1"} | env_overrides
  return subprocess.run([sys.executable, "-c", install_cell(NOTEBOOK)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_notebook_has_no_placeholder_url():
  text = open(NOTEBOOK).read()
  assert "YOUR_ORG" not in text
  # No public URL is known, so any hard-coded repository URL would be a guess.
  assert not re.search(r"git\+https?://|github\.com/|YOUR_|<org>|example\.(com|org)", text)


def test_install_cell_installs_from_grpo_jax_source(tmp_path):
  # -v cancels the cell's -q, so pip prints its "Would install ..." line.
  proc = run_install_cell(str(tmp_path), GRPO_JAX_SOURCE=ROOT,
                          GRPO_QUICKSTART_PIP_ARGS="--dry-run --no-deps --no-build-isolation -v")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"installing grpo_jax from {ROOT}" in proc.stdout
  assert re.search(r"Would install grpo_jax-0\.1\.0\b", proc.stdout), proc.stdout[-2000:]


def test_install_cell_finds_the_checkout_it_runs_in(tmp_path):
  # Jupyter starts the kernel in the notebook's folder: the checkout is a parent of it.
  proc = run_install_cell(os.path.join(ROOT, "experiments", "colab"), HOME=str(tmp_path),
                          GRPO_QUICKSTART_PIP_ARGS="--dry-run --no-deps --no-build-isolation -v")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f"installing grpo_jax from {ROOT}\n" in proc.stdout
  assert "Would install grpo_jax-0.1.0" in proc.stdout

def test_install_cell_without_a_source_names_the_three_ways(tmp_path):
  home = tmp_path / "home"
  work = tmp_path / "work"
  home.mkdir()
  work.mkdir()
  proc = run_install_cell(str(work), HOME=str(home),
                          GRPO_QUICKSTART_PIP_ARGS="--dry-run --no-deps --no-build-isolation")
  assert proc.returncode != 0
  assert "no source for it was found" in proc.stderr, proc.stderr[-2000:]
  for way in ("1. set the environment variable GRPO_JAX_SOURCE", "2. put a checkout",
              "3. put a wheel grpo_jax-*.whl"):
    assert way in proc.stderr
  assert "pip install" not in proc.stdout and "installing grpo_jax" not in proc.stdout


def test_quickstart_notebook_executes_and_shows_progress():
  code = notebook_code(NOTEBOOK, marks=True)
  assert "trainer.train(config, workdir)" in code
  cells = json.load(open(NOTEBOOK))["cells"]
  (train_cell,) = [i for i, c in enumerate(cells) if "trainer.train(" in "".join(c["source"])]
  env = {k: v for k, v in os.environ.items() if k != "GRPO_JAX_PROGRESS"}
  env |= dict(GRPO_QUICKSTART_SMALL="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  outputs = cell_outputs(proc.stdout)
  assert "completion" in outputs[max(outputs)]  # the last cell printed logged samples
  # An executed notebook with no terminal and no absl set-up: progress is printed, in the
  # training cell's own output (in a live kernel it is a tqdm bar; tests/test_metrics.py).
  shown = outputs[train_cell]
  assert re.search(r"^sft +\d+/\d+ +\d+% \| \d+:\d\d<", shown, re.MULTILINE), shown[-2000:]
  assert re.search(r"^grpo +(\d+)/\1 100% \| \S+ \| reward \S+ .*acc ", shown, re.MULTILINE), \
      shown[-2000:]
