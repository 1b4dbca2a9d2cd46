"""Tests for grpo_jax.sandbox: wrong or hostile code comes back as a ToolResult, nothing escapes.

The hostile programs live in HOSTILE_PROGRAMS so they can be copied elsewhere. Some use names
the test defines in a prefix (`MARKER`, `PORT`, ...), listed next to each program. Fast: the
timeouts are 1-2 s and the whole file takes ~10 s.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid

import pytest

from grpo_jax import sandbox
from grpo_jax.sandbox import ToolResult, run_python, run_python_batch
from grpo_jax.sandbox_isolation import isolation

pytestmark = pytest.mark.usefixtures("sandbox_lock")  # one sandbox test at a time (conftest)

# Names a program expects its test to define in a prefix are listed in the comment.
HOSTILE_PROGRAMS = {
    "infinite_loop": "print('started')\nwhile True:\n  pass\n",
    # MARKER: a process name (<= 15 chars) every process of the bomb carries, to count them.
    "fork_bomb": (
        "import ctypes, os\n"
        "ctypes.CDLL(None).prctl(15, MARKER.encode(), 0, 0, 0)\n"
        "while True:\n"
        "  os.fork()\n"),
    # MARKER, as above. Children leave the process group and sleep, hoping to outlive the run.
    "fork_bomb_setsid": (
        "import ctypes, os, time\n"
        "ctypes.CDLL(None).prctl(15, MARKER.encode(), 0, 0, 0)\n"
        "for _ in range(1000):\n"
        "  try:\n"
        "    if os.fork() == 0:\n"
        "      os.setsid()\n"
        "      time.sleep(60)\n"
        "      os._exit(0)\n"
        "  except OSError:\n"
        "    break\n"
        "time.sleep(60)\n"),
    "memory_hog": "x = bytearray(2 * 1024**3)\n",
    "memory_hog_list": "x = []\nwhile True:\n  x.append(bytearray(10**6))\n",
    "big_output": "print('x' * 10_000_000)\n",
    "endless_output": "while True:\n  print('spam' * 100)\n",
    # SENTINEL_DIR, SENTINEL_FILE (in it), TMP_TARGET (a path in /tmp), REPO_TARGET (a new file
    # in the repository, which is root-owned and world-readable).
    "write_outside": (
        "import os\n"
        "for path in (os.path.join(SENTINEL_DIR, 'planted'), SENTINEL_FILE, TMP_TARGET,\n"
        "             REPO_TARGET):\n"
        "  try:\n"
        "    with open(path, 'w') as f:\n"
        "      f.write('pwned')\n"
        "    print('wrote', path)\n"
        "  except OSError as e:\n"
        "    print('refused', path, e)\n"
        "try:\n"
        "  os.remove(SENTINEL_FILE)\n"
        "  print('removed', SENTINEL_FILE)\n"
        "except OSError as e:\n"
        "  print('refused', SENTINEL_FILE, e)\n"
        "with open('inside.txt', 'w') as f:\n"
        "  f.write('written inside')\n"
        "print(open('inside.txt').read(), os.getcwd())\n"),
    # PARENT_PID: the test process's pid.
    "read_environ": (
        "import os\n"
        "print(dict(os.environ))\n"
        "pids = {PARENT_PID, os.getppid(), 1, os.getpid()}\n"
        "pids |= {int(p) for p in os.listdir('/proc') if p.isdigit()}\n"
        "for pid in sorted(pids):\n"
        "  for name in ('environ', 'cmdline'):\n"
        "    try:\n"
        "      print(pid, name, open('/proc/%d/%s' % (pid, name), 'rb').read())\n"
        "    except OSError as e:\n"
        "      print(pid, name, 'refused', e)\n"),
    # PORT: a TCP port the test listens on at 127.0.0.1.
    "socket": (
        "import socket\n"
        "for host, port in (('127.0.0.1', PORT), ('8.8.8.8', 53)):\n"
        "  try:\n"
        "    socket.create_connection((host, port), timeout=1).close()\n"
        "    print('connected', host)\n"
        "  except OSError as e:\n"
        "    print('failed', host, e)\n"),
    "segfault": "import ctypes\nctypes.string_at(0)\n",
}


def with_names(program: str, **names) -> str:
  """The program with a prefix that defines `names`."""
  return "".join(f"{k} = {v!r}\n" for k, v in names.items()) + program


def process_names() -> list[tuple[int, int, str]]:
  """(pid, uid, comm) of every process on the machine."""
  procs = []
  for p in os.listdir("/proc"):
    if p.isdigit():
      try:
        with open(f"/proc/{p}/comm") as f:
          procs.append((int(p), os.stat(f"/proc/{p}").st_uid, f.read().strip()))
      except OSError:
        pass  # gone meanwhile
  return procs


def rss_mb() -> tuple[float, float]:
  """This process's current and peak resident memory, MiB."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def test_ok_stdout():
  result = run_python("print(6*7)")
  assert result.status == "ok"
  assert result.stdout == "42\n"
  assert result.stderr == ""
  assert result.returncode == 0
  assert not result.truncated
  assert 0 < result.seconds < 0.5


@pytest.mark.parametrize("code, message", [
    ("def f(x):\n  return 1 / x\nf(0)\n", "ZeroDivisionError: division by zero"),
    ("def f(:\n", "SyntaxError"),
    ("raise SystemExit('bye')\n", "bye"),
    ("x = '\ud800'\n", "Error"),  # a lone surrogate: not valid utf-8
    ("x = 1\0\n", "null bytes"),
])
def test_errors(code, message):
  result = run_python(code)
  assert result.status == "error"
  assert result.returncode == 1
  assert message in result.stderr


def test_traceback_is_the_codes_own():
  result = run_python("print('before')\n1 / 0\n")
  assert result.stdout == "before\n"
  assert result.stderr.startswith("Traceback (most recent call last):\n")
  assert 'File "<tool>", line 2, in <module>' in result.stderr
  assert "1 / 0" in result.stderr  # the source line is shown
  assert result.stderr.count("File ") == 1  # no frames of the wrapper


def test_imports_and_subprocess_work_for_the_sandbox_user():
  code = ("import json, subprocess, sys\nimport numpy\n"
          "print(json.dumps(int(numpy.arange(4).sum())))\n"
          "print(subprocess.run([sys.executable, '-c', 'print(7)'], capture_output=True).stdout)\n")
  result = run_python(code)
  assert result.status == "ok", result.stderr
  assert result.stdout == "6\nb'7\\n'\n"


def test_infinite_loop_times_out_and_keeps_what_it_printed():
  result = run_python(HOSTILE_PROGRAMS["infinite_loop"], timeout_s=1)
  assert result.status == "timeout"
  assert result.stdout == "started\n"  # line-buffered: printed before the kill
  assert 1 <= result.seconds < 3


@pytest.mark.parametrize("name", ["fork_bomb", "fork_bomb_setsid"])
def test_fork_bomb_is_contained_and_leaves_nothing(name):
  nobody_before = sum(uid == sandbox.NOBODY for _, uid, _ in process_names())
  marker = "bomb" + uuid.uuid4().hex[:8]
  result = run_python(with_names(HOSTILE_PROGRAMS[name], MARKER=marker), timeout_s=1)
  assert result.status in ("error", "timeout")
  assert result.seconds < 3
  deadline = time.monotonic() + 2
  while True:
    survivors = [p for p in process_names() if p[2] == marker]
    nobody = sum(uid == sandbox.NOBODY for _, uid, _ in process_names())
    if (not survivors and nobody <= nobody_before) or time.monotonic() > deadline:
      break
    time.sleep(0.05)
  assert survivors == []
  assert nobody <= nobody_before


@pytest.mark.parametrize("name", ["memory_hog", "memory_hog_list"])
def test_memory_hog(name):
  result = run_python(HOSTILE_PROGRAMS[name], memory_mb=256, timeout_s=5)
  assert result.status == "memory"
  assert "MemoryError" in result.stderr
  assert result.seconds < 3


@pytest.mark.parametrize("name, status", [("big_output", "ok"), ("endless_output", "timeout")])
def test_output_is_capped_without_buffering_it(name, status):
  rss_before, peak_before = rss_mb()
  result = run_python(HOSTILE_PROGRAMS[name], timeout_s=1, max_output_bytes=1000)
  rss_after, peak_after = rss_mb()
  assert result.status == status
  assert result.truncated
  assert len(result.stdout) == 1000
  assert set(result.stdout) <= set("xspam\n")
  assert rss_after - rss_before < 50
  assert peak_after - peak_before < 50


def test_writes_outside_its_directory_are_refused(tmp_path):
  sentinel = tmp_path / "sentinel"
  sentinel.mkdir(mode=0o755)
  (sentinel / "keep.txt").write_text("original")
  tmp_target = f"/tmp/grpo_sandbox_test_{uuid.uuid4().hex}"
  repo_target = os.path.join(os.path.dirname(__file__), f"pwned_{uuid.uuid4().hex}")
  code = with_names(HOSTILE_PROGRAMS["write_outside"], SENTINEL_DIR=str(sentinel),
                    SENTINEL_FILE=str(sentinel / "keep.txt"), TMP_TARGET=tmp_target,
                    REPO_TARGET=repo_target)
  try:
    result = run_python(code)
    assert result.status == "ok", result.stderr
    assert "written inside" in result.stdout
    for path in (sentinel / "planted", sentinel / "keep.txt", repo_target):
      assert f"refused {path}" in result.stdout
    assert "removed" not in result.stdout
    if isolation()["landlock"]:  # only its own directory is writable
      assert f"refused {tmp_target}" in result.stdout
    else:  # into the run's own fresh /tmp, not ours
      assert f"wrote {tmp_target}" in result.stdout
    assert sorted(os.listdir(sentinel)) == ["keep.txt"]
    assert (sentinel / "keep.txt").read_text() == "original"
    assert not os.path.exists(tmp_target)
    assert not os.path.exists(repo_target)
    workdir = result.stdout.split()[-1]
    assert workdir.startswith(os.path.join(os.path.realpath("/tmp"), "grpo_tool_"))
    assert not os.path.exists(workdir)  # the run's directory is removed
  finally:
    for path in (tmp_target, repo_target):
      if os.path.exists(path):
        os.remove(path)


def test_parent_environment_is_not_readable(monkeypatch):
  monkeypatch.setenv("GRPO_SECRET_TEST", "s3cret")
  result = run_python(with_names(HOSTILE_PROGRAMS["read_environ"], PARENT_PID=os.getpid()))
  assert result.status == "ok", result.stderr
  assert "PATH" in result.stdout  # it did print its own environment
  assert "s3cret" not in result.stdout + result.stderr
  assert "GRPO_SECRET_TEST" not in result.stdout


def test_no_network():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    result = run_python(with_names(HOSTILE_PROGRAMS["socket"], PORT=port))
    assert result.status == "ok", result.stderr
    assert "connected" not in result.stdout
    assert "failed 127.0.0.1" in result.stdout and "failed 8.8.8.8" in result.stdout
    listener.settimeout(0.2)
    with pytest.raises(socket.timeout):
      listener.accept()


def test_segfault_is_killed():
  result = run_python(HOSTILE_PROGRAMS["segfault"])
  assert result.status == "killed"
  assert result.returncode == -signal.SIGSEGV


def test_limits_on_files_and_processes():
  result = run_python("open('big', 'wb').write(b'x' * (3 << 20))\n", max_file_mb=2)
  assert result.status == "error"
  assert "File too large" in result.stderr
  result = run_python("import os\nfor _ in range(8):\n  if os.fork() == 0:\n"
                      "    import time; time.sleep(2)\n", max_processes=4)
  assert result.status == "error"
  assert "Resource temporarily unavailable" in result.stderr


@pytest.mark.parametrize("returncode, stderr, timed_out, status", [
    (0, "", False, "ok"),
    (1, "ValueError", False, "error"),
    (1, "MemoryError", False, "memory"),
    (-signal.SIGXCPU, "", False, "timeout"),
    (-signal.SIGKILL, "", True, "timeout"),
    (-signal.SIGKILL, "", False, "killed"),
    (-signal.SIGSEGV, "", False, "killed"),
])
def test_classify(returncode, stderr, timed_out, status):
  assert sandbox.classify(returncode, stderr, timed_out) == status


@pytest.mark.parametrize("kwargs", [
    {"code": b"print(1)"}, {"code": None}, {"timeout_s": 0}, {"timeout_s": -1.0},
    {"timeout_s": float("nan")}, {"timeout_s": float("inf")}, {"timeout_s": True},
    {"memory_mb": 0}, {"memory_mb": 1.5}, {"max_output_bytes": -1}, {"max_processes": 0},
    {"max_file_mb": 0},
])
def test_bad_arguments_raise_value_error(kwargs):
  kwargs = {"code": "print(1)", **kwargs}
  with pytest.raises(ValueError):
    run_python(kwargs.pop("code"), **kwargs)


def test_batch_runs_concurrently_in_order():
  codes = [f"import time\ntime.sleep(0.5)\nprint({i})\n" for i in range(4)]
  start = time.monotonic()
  results = run_python_batch(codes, max_workers=4, timeout_s=2)
  assert time.monotonic() - start < 1.5
  assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
  assert all(isinstance(r, ToolResult) and r.status == "ok" for r in results)
  start = time.monotonic()
  results = run_python_batch(codes, max_workers=2, timeout_s=2)
  assert time.monotonic() - start >= 1.0  # two waves of two
  assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
  with pytest.raises(ValueError):
    run_python_batch(["print(1)", 7])
  with pytest.raises(ValueError):
    run_python_batch(["print(1)"], max_workers=0)
  assert run_python_batch([]) == []


def test_isolation_on_this_machine():
  report = isolation()
  root = os.geteuid() == 0
  assert report["user"] == ("nobody" if root else "same")  # not root: own uid, no capabilities
  assert report["user_namespace"] == (not root)
  assert report["confined"] and report["landlock"] > 0 and report["seccomp"]
  assert report["network"] == "namespace"
  assert report["pid_namespace"] and report["mount_namespace"]
  assert report["private_tmp"] and report["private_proc"]
  assert report["no_new_privs"] and report["no_capabilities"]
  assert set(report["rlimits"]) >= {"RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NPROC"}
  assert report["not_blocked"]  # it says what it does not stop
  assert isolation() is report  # probed once


def test_trainer_survives_everything():
  """Last: after all of the above, this process still runs code."""
  for program in HOSTILE_PROGRAMS.values():
    assert isinstance(run_python(program, timeout_s=0.5, memory_mb=128), ToolResult)
  result = run_python("print('alive')")
  assert result.status == "ok" and result.stdout == "alive\n"
