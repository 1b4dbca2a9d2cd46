"""The Python tool: an environment whose observation is the output of the policy's code.

    env = PythonTool(timeout_s=5.0, memory_mb=512)
    state = env.reset(record)
    state, step = env.step(state, "...```python\\nprint(12 * 34)\\n```\\n```output")
    step.observation == "\\n408\\n```\\n"; step.info == {"status": "ok", "seconds": ...}

The format is Qwen2.5-Math's tool-integrated reasoning (and ToRA's): the policy writes a
```python block, then "```output" (the stop string that ends its turn); the tool runs the LAST
python block of the turn in the sandbox (`sandbox.run_python`: a child process, never the
trainer's, see that module for what confines it) and answers "\\n<output>\\n```\\n", after which
the policy continues. A failing program answers its last error line (as a Python session would
show it), a timeout or memory error says so: whatever the code does, the policy gets text and
the trainer goes on. Each call is stateless (no variables carry over between turns).

`teacher_segments` splits a worked solution written in this format into policy and observation
parts, so that SFT targets carry loss only on the policy's tokens, tokenized as a rollout
tokenizes them (each observation encoded on its own).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import signal
import threading

from grpo_jax import sandbox
from grpo_jax.multiturn import CUT_MARK, EnvStep


@dataclasses.dataclass(frozen=True)
class PythonTool:
  """The sandboxed Python interpreter as a `multiturn.Environment`."""
  stop_strings: tuple[str, ...] = ("```output",)
  code_pattern: str = r"```python\n(.*?)```"
  observation_template: str = "\n{output}\n```\n"
  timeout_s: float = 5.0
  memory_mb: int = 512
  max_output_chars: int = 400
  cache: bool = True          # identical programs run once (see `_run`)
  hidden_paths: tuple[str, ...] = ()  # hidden from the code besides home, cwd, /root

  def __post_init__(self):
    if "{output}" not in self.observation_template:
      raise ValueError(f"observation_template {self.observation_template!r} has no {{output}}")
    re.compile(self.code_pattern)
    if not self.stop_strings or not all(self.stop_strings):
      raise ValueError("PythonTool: stop_strings must be non-empty strings")

  def reset(self, record: dict) -> tuple:
    del record
    return ()

  def step(self, state: tuple, text: str) -> tuple[tuple, EnvStep]:
    codes = re.findall(self.code_pattern, text, flags=re.S)
    if not codes:
      return state, EnvStep(self.observation("SyntaxError: no ```python block before the "
                                             "output marker"), info={"status": "no_code",
                                                                     "seconds": 0.0})
    result = _run(codes[-1], self.timeout_s, self.memory_mb, self.hidden_paths, self.cache)
    return state, EnvStep(self.observation(describe(result)),
                          info={"status": result.status, "seconds": result.seconds})

  def observation(self, output: str) -> str:
    """The template around the output, at most `max_output_chars` of it. The rollout cuts the
    output further to fit `max_observation_tokens`, keeping the template whole
    (`multiturn.Environment`'s `observation_template`)."""
    output = output.strip()
    if len(output) > self.max_output_chars:
      output = output[:self.max_output_chars] + CUT_MARK
    return self.observation_template.format(output=output)

  def teacher_segments(self, solution: str) -> list[tuple[str, bool]]:
    """[(text, is_observation)] of a solution in this format: each stop string ends a policy
    part, the observation template's text after it is an observation."""
    before, after = self.observation_template.split("{output}")
    obs = re.compile(re.escape(before) + r"(.*?)" + re.escape(after), flags=re.S)
    stop = "|".join(re.escape(s) for s in self.stop_strings)
    parts, pos = [], 0
    for m in re.finditer(stop, solution):
      if m.end() < pos:
        continue
      o = obs.match(solution, m.end())
      if o is None:
        continue
      parts += [(solution[pos:m.end()], False), (solution[m.end():o.end()], True)]
      pos = o.end()
    if pos < len(solution) or not parts:
      parts.append((solution[pos:], False))
    return parts


_CACHE: collections.OrderedDict = collections.OrderedDict()  # key -> ToolResult, oldest first
_CACHE_SIZE = 4096
_CACHE_LOCK = threading.Lock()


def _run(code: str, timeout_s: float, memory_mb: int, hidden_paths: tuple[str, ...],
         cache: bool) -> sandbox.ToolResult:
  """The sandbox's result; with `cache`, a program seen before (the G samples of a group often
  write the same one) returns its first result: the tool is then a function of the code,
  which also makes a resumed run's observations those of the run it continues. Only results
  that the code alone decides are kept (`deterministic`): a timeout or a kill may come from
  the machine's load and is run again next time. A program that reads the clock or draws
  random numbers keeps its first output (pass cache=False)."""
  key = (code, timeout_s, memory_mb, hidden_paths)
  if cache:
    with _CACHE_LOCK:
      if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
  result = sandbox.run_python(code, timeout_s=timeout_s, memory_mb=memory_mb,
                              hidden_paths=hidden_paths)
  if cache and deterministic(result):
    with _CACHE_LOCK:
      _CACHE[key] = result
      while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
  return result


def deterministic(result: sandbox.ToolResult) -> bool:
  """Whether the code alone decided this result: not a timeout (wall or CPU time depend on
  the load) nor a SIGKILL (the deadline's, or the kernel's OOM killer)."""
  if result.status == "timeout":
    return False
  return not (result.status == "killed" and result.returncode == -signal.SIGKILL)


def describe(result: sandbox.ToolResult) -> str:
  """The text the policy sees: stdout, or the error's last line, or what stopped the program."""
  if result.status == "ok":
    return result.stdout
  if result.status == "timeout":
    return "TimeoutError: the program did not finish in time"
  if result.status == "memory":
    return "MemoryError: the program ran out of memory"
  lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
  if result.status == "killed":
    return f"the program was killed ({lines[-1] if lines else 'signal'})"
  return lines[-1] if lines else f"error (exit status {result.returncode})"
