"""The package's shape: modules of one job (<= 400 lines), functions <= 60 lines, the library
independent of experiments/, and the frozen settings at the ground floor of the import graph."""

import ast
import os
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "grpo_jax"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# Functions allowed to be longer because they read as a flat table.
TABLES = {"defaults.py:config"}  # every config field with its default and a comment


def _modules():
  return sorted(PACKAGE.rglob("*.py"))


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(PACKAGE))


def test_modules_and_functions_are_short():
  too_long = []
  for path in _modules():
    source = path.read_text()
    if source.count("\n") > MAX_MODULE_LINES:
      too_long.append(f"{_name(path)}: {source.count(chr(10))} lines")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES and f"{_name(path)}:{node.name}" not in TABLES:
          too_long.append(f"{_name(path)}:{node.name}: {length} lines")
  assert not too_long, too_long


def test_the_library_does_not_import_experiments():
  importers = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n == "experiments" or n.startswith("experiments.") for n in names):
        importers.append(f"{_name(path)}:{node.lineno}")
  assert not importers, importers


def test_settings_import_no_host_module():
  """The frozen settings stand at the ground floor: importing them loads only the settings'
  own modules and the small pure ones they configure (the loss options, the paradigm table,
  the mesh shape), never the data, tasks, tools, set-up or loop."""
  code = ("import sys, grpo_jax.settings; "
          "print(' '.join(sorted(m for m in sys.modules if m.startswith('grpo_jax.'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout.split()
  allowed = {"grpo_jax.settings", "grpo_jax.settings_types", "grpo_jax.settings_checks",
             "grpo_jax.record_fields", "grpo_jax.paradigms", "grpo_jax.losses",
             "grpo_jax.corrections", "grpo_jax.covariance",
             "grpo_jax.sharding"}
  assert set(out) <= allowed, sorted(set(out) - allowed)
  assert "grpo_jax.settings" in out
