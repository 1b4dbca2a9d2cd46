"""The sandbox holds for every trainer: a non-root user, a Python under /tmp, PID 1 of a container.

Each test runs `tests/sandbox_driver.py` (a trainer in miniature) in a process of its own: as a
non-root user created here when the suite runs as root (CI does), with an interpreter whose
venv lives under /tmp, and as PID 1 of a fresh PID namespace where the tool gets none. The
secrets are planted in that user's home and in a fake run directory; the hostile program tries
to read, write, list and plant files there and must achieve nothing.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid

import landlock
import pytest
import pyseccomp

from grpo_jax import python_tool, sandbox, sandbox_child, sandbox_isolation


pytestmark = pytest.mark.usefixtures("sandbox_lock")  # one sandbox test at a time (conftest)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = "grpo_sbx_test"

# READ, WRITE, LIST: paths; prints {path: what happened} as JSON, then imports the marker
# module that lives in the interpreter's own site-packages (under /tmp in these tests).
SNOOP = r"""
import json, os
out = {}
for p in READ:
  try:
    out["read " + p] = open(p).read()
  except OSError as e:
    out["read " + p] = "refused"
for p in WRITE:
  try:
    with open(p, "a") as f:
      f.write("pwned")
    out["write " + p] = "wrote"
  except OSError as e:
    out["write " + p] = "refused"
for d in LIST:
  try:
    out["list " + d] = os.listdir(d)
  except OSError as e:
    out["list " + d] = "refused"
import grpo_marker_module
out["marker"] = grpo_marker_module.VALUE
print(json.dumps(out))
"""


def _lib_dir(root: str) -> str:
  """Copies of the sandbox modules and of pyseccomp, readable by anyone."""
  lib = os.path.join(root, "lib")
  os.makedirs(os.path.join(lib, "grpo_jax"))
  open(os.path.join(lib, "grpo_jax", "__init__.py"), "w").close()
  for name in ("sandbox.py", "sandbox_child.py", "sandbox_isolation.py", "sandbox_probe.py",
               "sandbox_process.py"):
    shutil.copy(os.path.join(REPO, "grpo_jax", name), os.path.join(lib, "grpo_jax", name))
  shutil.copy(os.path.join(REPO, "tests", "sandbox_driver.py"), lib)
  shutil.copy(pyseccomp.__file__, lib)
  return lib


def _venv(root: str, python: str) -> str:
  """A venv under `root` (under /tmp) holding a marker module in its site-packages."""
  venv = os.path.join(root, "venv")
  subprocess.run([python, "-m", "venv", "--without-pip", venv], check=True)
  exe = os.path.join(venv, "bin", "python")
  site = subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  assert site.startswith("/tmp/"), site
  with open(os.path.join(site, "grpo_marker_module.py"), "w") as f:
    f.write("VALUE = 'from the venv under /tmp'\n")
  return exe


def _user() -> pwd.struct_passwd:
  """A non-root user with a home of its own: created when running as root, else ourselves."""
  if os.geteuid() != 0:
    return pwd.getpwuid(os.geteuid())
  try:
    return pwd.getpwnam(USER)
  except KeyError:
    subprocess.run(["useradd", "--create-home", "--shell", "/usr/sbin/nologin", USER],
                   check=True)
    return pwd.getpwnam(USER)


def _plant(home: str, uid: int, gid: int, tag: str) -> dict[str, str]:
  """Secrets and files the user owns: {path: content}."""
  files = {
      os.path.join(home, ".cache", "huggingface", "token"): f"hf_secret_{tag}",
      os.path.join(home, ".ssh", "id_ed25519"): f"ssh_secret_{tag}",
      os.path.join(home, ".netrc"): f"machine x login y password netrc_{tag}",
      os.path.join(home, ".bashrc"): "# the user's shell\n",
      os.path.join(home, f"run_{tag}", "checkpoints", "state"): f"weights_{tag}",
  }
  for path, text in files.items():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
    mode = 0o644 if path.endswith(("state", ".bashrc")) else 0o600
    os.chmod(path, mode)
  for path in files:
    d = path
    while d != home:
      d = os.path.dirname(d)
      if os.geteuid() == 0:
        os.chown(d, uid, gid)
    if os.geteuid() == 0:
      os.chown(path, uid, gid)
  return files


def _tree(root: str, files: dict[str, str]) -> dict[str, bytes]:
  """The planted files' bytes and the names in their directories below `root` (the home itself
  may gain files meanwhile when it is the one running the suite)."""
  out = {}
  for path in files:
    with open(path, "rb") as f:
      out[path] = f.read()
    d = os.path.dirname(path)
    if d != root:
      out[d] = "\n".join(sorted(os.listdir(d))).encode()
  return out


def _drive(python: str, lib: str, spec: dict, *, user=None, cwd=None, env=None,
           prefix=()) -> dict:
  kwargs = {}
  if user is not None and os.geteuid() == 0 and user.pw_uid != 0:
    kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
  proc = subprocess.run([*prefix, python, os.path.join(lib, "sandbox_driver.py"), lib,
                         json.dumps(spec)], capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=120, **kwargs)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.fixture
def scratch():
  root = f"/tmp/grpo_sbx_{uuid.uuid4().hex[:8]}"
  os.makedirs(root)
  os.chmod(root, 0o755)
  yield root
  shutil.rmtree(root, ignore_errors=True)


def _system_python() -> str:
  """An interpreter any user may run: the system's where ours sits under /root (0700)."""
  for exe in ("/usr/bin/python3", sys.executable):
    if os.path.exists(exe) and not os.path.realpath(exe).startswith("/root/"):
      return exe
  pytest.fail("no Python outside /root for the non-root user: install python3 (apt-get "
              "install python3) or a Python under /usr/local")


def test_non_root_user_with_python_under_tmp_reaches_none_of_its_files(scratch):
  user = _user()
  tag = uuid.uuid4().hex[:8]
  files = _plant(user.pw_dir, user.pw_uid, user.pw_gid, tag)
  run_dir = os.path.join(user.pw_dir, f"run_{tag}")
  lib = _lib_dir(scratch)
  python = _venv(scratch, _system_python())
  before = _tree(user.pw_dir, files)
  program = "".join(f"{k} = {v!r}\n" for k, v in {
      "READ": sorted(files),
      "WRITE": sorted(files) + [os.path.join(user.pw_dir, "planted"),
                                os.path.join(run_dir, "planted"), os.path.join(REPO, "planted")],
      "LIST": [user.pw_dir, run_dir, os.path.join(user.pw_dir, ".ssh")],
  }.items()) + SNOOP
  env = {"HOME": user.pw_dir, "PATH": "/usr/bin:/bin", "GRPO_SECRET": f"env_{tag}"}
  try:
    out = _drive(python, lib, {"programs": {"snoop": program}}, user=user, cwd=run_dir, env=env)
  finally:
    planted = [p for p in (os.path.join(user.pw_dir, "planted"), os.path.join(run_dir, "planted"))
               if os.path.exists(p)]
    for p in planted:
      os.remove(p)
  result = out["snoop"]
  assert result["status"] == "ok", result["stderr"]
  seen = json.loads(result["stdout"])
  assert seen.pop("marker") == "from the venv under /tmp"  # the interpreter under /tmp works
  assert all(v == "refused" or v == [] for v in seen.values()), seen
  for secret in ("secret_", "netrc_", "weights_", "env_"):
    assert secret + tag not in result["stdout"] + result["stderr"]
  assert _tree(user.pw_dir, files) == before  # nothing written, nothing planted
  assert planted == []
  assert not os.path.exists(os.path.join(REPO, "planted"))
  report = out["isolation"]
  assert report["confined"] and report["landlock"] > 0 and report["seccomp"]
  assert user.pw_dir in report["hidden"] and run_dir in report["hidden"]
  if os.geteuid() == 0:
    assert report["user_namespace"]  # it ran as the non-root user: unprivileged namespaces


def test_root_trainer_hides_world_readable_files_and_runs_a_python_under_tmp(scratch):
  if os.geteuid() != 0:
    pytest.skip("a root trainer's case (CI runs as root); the non-root user's is the test above")
  tag = uuid.uuid4().hex[:8]
  hidden_dir = f"/grpo_sbx_hidden_{tag}"  # outside /tmp: masked or denied, not just private
  open_dir = f"/grpo_sbx_open_{tag}"  # neither hidden nor allowed: Landlock denies it
  try:
    for d in (hidden_dir, open_dir):
      os.makedirs(d)
      os.chmod(d, 0o755)
      with open(os.path.join(d, "data"), "w") as f:
        f.write(f"world_readable_{tag}")
      os.chmod(os.path.join(d, "data"), 0o666)
    lib = _lib_dir(scratch)
    python = _venv(scratch, sys.executable)
    data = [os.path.join(d, "data") for d in (hidden_dir, open_dir)]
    program = "".join(f"{k} = {v!r}\n" for k, v in {
        "READ": data, "WRITE": data, "LIST": [hidden_dir, open_dir]}.items()) + SNOOP
    out = _drive(python, lib, {"programs": {"snoop": program}, "hidden_paths": [hidden_dir]},
                 cwd=scratch, env={"PATH": "/usr/bin:/bin", "HOME": "/root"})
    result = out["snoop"]
    assert result["status"] == "ok", result["stderr"]
    seen = json.loads(result["stdout"])
    assert seen.pop("marker") == "from the venv under /tmp"
    assert all(v == "refused" or v == [] for v in seen.values()), seen
    for p in data:
      with open(p) as f:
        assert f.read() == f"world_readable_{tag}"
    assert hidden_dir in out["isolation"]["hidden"]
  finally:
    for d in (hidden_dir, open_dir):
      shutil.rmtree(d, ignore_errors=True)


# RLIMIT_NPROC counts every process of uid nobody on the machine: a fork bomb in a parallel
# test worker may hold the budget for a moment, so a refused fork is tried again.
FORKER = ("import os, time\n"
          "for _ in range(3):\n"
          "  for attempt in range(200):\n"
          "    try:\n"
          "      pid = os.fork()\n"
          "      break\n"
          "    except BlockingIOError:\n"
          "      time.sleep(0.02)\n"
          "  if pid == 0:\n"
          "    time.sleep(0.3)\n"
          "    os._exit(0)\n"
          "print('parent done')\n")


@pytest.mark.parametrize("where", ["pid_1", "subreaper"])
def test_orphans_of_a_tool_without_a_pid_namespace_are_reaped(scratch, where):
  """PID 1 of a container (root: a fresh PID namespace here) or a subreaper (anyone)."""
  lib = _lib_dir(scratch)
  spec = {"programs": {f"fork{i}": FORKER for i in range(3)},
          "namespaces": ["user", "net", "ipc", "mnt"], "zombie_wait_s": 0.5,
          "subreaper": where == "subreaper"}
  if where == "pid_1" and os.geteuid() != 0:
    pytest.skip("a PID namespace of our own needs root (CI runs as root); the subreaper case "
                "runs the same reaping")
  prefix = ("unshare", "--pid", "--fork", "--mount-proc") if where == "pid_1" else ()
  out = _drive(sys.executable, lib, spec, cwd=scratch, prefix=prefix)
  assert all(out[f"fork{i}"]["stdout"] == "parent done\n" for i in range(3)), out
  assert not out["isolation"]["pid_namespace"]  # the tool really had none
  assert out["zombies"] == []


def test_a_tool_that_cannot_start_stops_the_run(monkeypatch, tmp_path):
  broken = tmp_path / "child.py"
  broken.write_text("import sys\nsys.stderr.write('ModuleNotFoundError: No module named x')\n"
                    "sys.exit(1)\n")
  monkeypatch.setattr(sandbox, "CHILD", str(broken))
  with pytest.raises(sandbox.SandboxError, match="could not start the program"):
    sandbox.run_python("print(1)")
  tool = python_tool.PythonTool(cache=False)
  with pytest.raises(sandbox.SandboxError):  # raised to the trainer, not shown to the policy
    tool.step((), "```python\nprint(1)\n```\n```output")


def test_require_isolation_refuses_unless_allowed(monkeypatch, caplog):
  report = dict(sandbox_isolation.isolation())
  assert report["confined"]  # this machine: nobody + Landlock
  assert sandbox_isolation.require_isolation()["confined"]
  weak = {**report, "confined": False, "landlock": 0, "missing": ["Landlock: ..."]}
  monkeypatch.setattr(sandbox_isolation, "isolation", lambda hidden=(): weak)
  with pytest.raises(sandbox.SandboxError, match="allow_unisolated"):
    sandbox_isolation.require_isolation()
  with caplog.at_level("WARNING"):
    assert sandbox_isolation.require_isolation(allow_unisolated=True) is weak
  assert "UNCONFINED" in caplog.text


def test_seccomp_refuses_kernel_surface():
  code = ("import ctypes, errno, os, socket\n"
          "libc = ctypes.CDLL(None, use_errno=True)\n"
          "def err(rc):\n"
          "  return errno.errorcode.get(ctypes.get_errno(), rc) if rc == -1 else 'allowed'\n"
          "print('ptrace', err(libc.ptrace(16, 1, 0, 0)))\n"  # PTRACE_ATTACH to pid 1
          "print('unshare', err(libc.unshare(0x10000000)))\n"
          "print('mount', err(libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)))\n"
          "print('keyctl', err(libc.syscall(250, 0, 0, 0, 0, 0)))\n"
          "try:\n"
          "  socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
          "  print('inet allowed')\n"
          "except OSError as e:\n"
          "  print('inet', errno.errorcode[e.errno])\n"
          "import subprocess, sys\n"  # fork + exec still work
          "print(subprocess.run([sys.executable, '-c', 'print(5)'], capture_output=True).stdout)\n")
  result = sandbox.run_python(code)
  assert result.status == "ok", result.stderr
  assert result.stdout.splitlines() == ["ptrace EPERM", "unshare EPERM", "mount EPERM",
                                        "keyctl EPERM", "inet EPERM", "b'5\\n'"]


def test_python_tool_caches_only_what_the_code_decides(monkeypatch):
  """A timeout or a kill under load is run again; an answer or an error is kept."""
  calls = []
  outcomes = iter([
      sandbox.ToolResult("timeout", "", "", -9, 5.0, False),
      sandbox.ToolResult("ok", "7\n", "", 0, 0.1, False),
      sandbox.ToolResult("killed", "", "", -9, 0.1, False),
      sandbox.ToolResult("error", "", "ZeroDivisionError: x", 1, 0.1, False),
  ])

  def fake_run(code, **kwargs):
    calls.append(code)
    return next(outcomes)

  monkeypatch.setattr(sandbox, "run_python", fake_run)
  tool = python_tool.PythonTool()
  turn = "```python\nprint(%s)\n```\n```output"
  code_a, code_b = f"# {uuid.uuid4().hex}\n", f"# {uuid.uuid4().hex}\n"
  assert tool.step((), turn % (code_a + "7"))[1].info["status"] == "timeout"
  assert tool.step((), turn % (code_a + "7"))[1].info["status"] == "ok"  # ran again
  assert tool.step((), turn % (code_a + "7"))[1].info["status"] == "ok"  # cached
  assert len(calls) == 2
  assert tool.step((), turn % (code_b + "1/0"))[1].info["status"] == "killed"
  assert tool.step((), turn % (code_b + "1/0"))[1].info["status"] == "error"
  assert tool.step((), turn % (code_b + "1/0"))[1].info["status"] == "error"
  assert len(calls) == 4


def test_landlock_constants_match_the_landlock_package():
  """The child's raw Landlock syscalls use the kernel's numbers, as the `landlock` package."""
  fs = landlock.FSAccess
  assert (sandbox_child.FS_EXECUTE, sandbox_child.FS_WRITE_FILE, sandbox_child.FS_READ_FILE,
          sandbox_child.FS_READ_DIR, sandbox_child.FS_REFER, sandbox_child.FS_TRUNCATE,
          sandbox_child.FS_IOCTL_DEV) == (fs.EXECUTE, fs.WRITE_FILE, fs.READ_FILE, fs.READ_DIR,
                                          fs.REFER, fs.TRUNCATE, fs.IOCTL_DEV)
  abi = sandbox_child.landlock_abi()
  assert abi == landlock.landlock_abi_version()
  assert sandbox_child.handled_fs(abi) == int(fs.all())
  from landlock import plumbing  # pylint: disable=import-outside-toplevel
  assert (sandbox_child.SYS_LANDLOCK_CREATE_RULESET, sandbox_child.SYS_LANDLOCK_ADD_RULE,
          sandbox_child.SYS_LANDLOCK_RESTRICT_SELF) == (
              plumbing.SYSCALL_CREATE_RULESET, plumbing.SYSCALL_ADD_RULE,
              plumbing.SYSCALL_RESTRICT_SELF)
  # The kernel's struct landlock_path_beneath_attr is packed: 12 bytes, the fd at offset 8.
  assert sandbox_child.PathBeneathAttr.parent_fd.offset == plumbing.PathBeneathAttr.parent_fd.offset
  assert ctypes.sizeof(sandbox_child.PathBeneathAttr) == 12


def test_a_hidden_path_holding_the_interpreter_shows_only_the_way_to_it():
  venv = ["/repo/.venv", "/home/u/.pyenv/versions/3.11"]
  assert sandbox_isolation._leaked({"/repo": [".venv"], "/home/u": [".pyenv"]}, venv) == []
  assert sandbox_isolation._leaked({"/repo": [".venv", "checkpoints"]}, venv) == ["/repo"]
  assert sandbox_isolation._leaked({"/data": ["x"]}, venv) == ["/data"]
