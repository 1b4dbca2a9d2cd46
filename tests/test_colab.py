"""The Colab quickstart runs end to end (small settings), so it cannot rot."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "quickstart.ipynb")


def notebook_code(path: str) -> str:
  """The code cells, without shell (!) and magic (%) lines, which need IPython."""
  cells = json.load(open(path))["cells"]
  lines = []
  for cell in cells:
    if cell["cell_type"] == "code":
      src = "".join(cell["source"])
      lines += [l for l in src.splitlines() if not l.lstrip().startswith(("!", "%"))]
  return "\n".join(lines)


def test_quickstart_notebook_executes():
  code = notebook_code(NOTEBOOK)
  assert "trainer.train(config, workdir)" in code
  env = dict(os.environ, GRPO_QUICKSTART_SMALL="1", JAX_PLATFORMS="cpu", MPLBACKEND="Agg",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "completion" in proc.stdout  # the last cell printed logged samples
