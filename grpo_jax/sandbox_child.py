"""The sandbox's child: confines itself in layers, then runs the tool code it reads on stdin.

`sandbox.run_python` starts it as `python -I sandbox_child.py ARGS_JSON` (isolated mode: no
PYTHON* variables, no user site, not even this file's directory on sys.path) in its own
session. Standard library only, and nothing heavy: every import here is paid on every tool call
(importing the `landlock` and `pyseccomp` packages cost more than the rest of a call). So the
seccomp filter arrives compiled: the parent builds it once with libseccomp (`pyseccomp`) and
passes the BPF program, which this process loads with one prctl; Landlock is three syscalls
(`landlock_confine`, its constants checked against the `landlock` package in the tests).
The order matters: read the code, unshare, mask paths, fork the PID namespace's init, then (in
the code's process) drop rights, Landlock, seccomp, rlimits, say "ready" on the parent's pipe,
run the code. `sandbox.py`'s docstring says what each layer blocks; `LAYERS` records what held,
for `sandbox_isolation.isolation()`.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import types

NOBODY = 65534
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
CLONE_FLAGS = {"user": 0x10000000, "net": 0x40000000, "ipc": 0x08000000, "mnt": 0x00020000,
               "pid": 0x20000000}
# Read-only (and executable) for the code besides the interpreter's own directories: what
# the dynamic loader and subprocesses of the standard tools need, nothing that holds data.
SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
               "/etc/ld.so.cache", "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero")
DEVICES_RW = ("/dev/null", "/dev/full")
# Private temp dirs and their size in units of max_file_mb (run/lock: 1 MiB flat).
TMP_DIRS = (("/tmp", 4), ("/var/tmp", 1), ("/dev/shm", 1), ("/run/lock", 0))
# Landlock (include/uapi/linux/landlock.h): syscalls, filesystem rights and what each ABI adds.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # ABI 6
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_char_p)
LAYERS = {}


def prctl(option, value):
  return LIBC.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0


def mount(source, target, fstype, flags, data=None):
  enc = lambda s: None if s is None else s.encode()
  return LIBC.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


def under(path, root):
  return path == root or path.startswith(root.rstrip("/") + "/")


def outermost(paths):
  real = set(paths)
  return sorted(p for p in real if not any(p != q and under(p, q) for q in real))


def python_dirs(hidden):
  """The interpreter's directories (realpaths, outermost only), less any sys.path entry that is
  a hidden path or holds one (an editable install's repository root, say): hidden wins."""
  paths = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
           os.path.dirname(os.path.realpath(sys.executable)), *sys.path}
  real = {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
  return outermost(p for p in real if not any(under(h, p) for h in hidden))


def enters(path, bits):
  """Whether uid/gid 65534 without supplementary groups has `bits` (1: x, 5: r+x) on path."""
  st = os.stat(path)
  shift = 6 if st.st_uid == NOBODY else 3 if st.st_gid == NOBODY else 0
  return (st.st_mode >> shift) & bits == bits


def first_blocked(path):
  """The outermost directory on `path` that nobody cannot enter (or read, for path), or None."""
  parts = path.rstrip("/").split("/")
  for i in range(1, len(parts) + 1):
    d = "/".join(parts[:i]) or "/"
    if not enters(d, 5 if i == len(parts) else 1):
      return d
  return None


def bind_read_only(fd, path):
  """Binds the directory open as `fd` at `path`, read-only where the kernel lets us add that
  flag (in a user namespace the source's locked flags must be kept, hence statvfs)."""
  if not mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC):
    return False
  kept = os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
  return mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def mask(target, keep_fds, options):
  """Replaces `target` by a fresh tmpfs (a file by /dev/null) and binds back, read-only, the
  kept directories inside it. Returns whether the target is masked."""
  if os.path.islink(target) or not os.path.exists(target):
    return False
  if not os.path.isdir(target):
    return mount("/dev/null", target, None, MS_BIND)
  if not mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options):
    return False
  for path, fd in keep_fds.items():
    if under(path, target):
      os.makedirs(path, exist_ok=True)
      if not bind_read_only(fd, path):
        LAYERS["read_only_binds"] = False
  return True


def mask_paths(a, keep):
  """In the mount namespace: private temp dirs, hidden paths and (as root) the directories
  nobody could not enter, each a fresh tmpfs holding read-only binds of the interpreter."""
  keep_fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in keep}
  targets = {}
  mb = a["max_file_mb"]
  for d, scale in TMP_DIRS:
    if os.path.isdir(d) and not os.path.islink(d):
      targets[d] = "size=%dm,nr_inodes=4096,mode=1777" % (scale * mb or 1)
  for h in a["hidden"]:
    targets.setdefault(h, "size=1m,nr_inodes=1024,mode=755")
  if os.geteuid() == 0:
    for p in keep:
      b = first_blocked(p)
      if b not in (None, "/", p):
        targets.setdefault(b, "size=1m,nr_inodes=1024,mode=755")
  LAYERS["read_only_binds"] = True
  masked = []
  for target in sorted(targets, key=lambda t: t.count("/")):  # outer first
    if mask(target, keep_fds, targets[target]):
      masked.append(target)
  for fd in keep_fds.values():
    os.close(fd)
  LAYERS["private_tmp"] = [d for d, _ in TMP_DIRS if d in masked]
  LAYERS["masked"] = [h for h in a["hidden"] if h in masked]


def relay(child, r, w):
  """The outer process: waits for the init and dies the way the code's process died."""
  os.close(w)
  _, status = os.waitpid(child, 0)
  data = os.read(r, 32)
  status = int(data) if data else status
  if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    prctl(PR_SET_DUMPABLE, 0)  # no core file of ours
    try:
      signal.signal(sig, signal.SIG_DFL)
    except (OSError, ValueError):
      pass
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is to be ignored
  os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def init(user_pid, w):
  """pid 1 of the namespace: reaps everything; when the code's process ends, reports and exits
  (the kernel then kills whatever the code left behind)."""
  while True:
    try:
      pid, status = os.wait()
    except ChildProcessError:
      os._exit(1)
    if pid == user_pid:
      os.write(w, b"%d" % status)
      os._exit(0)


def limit(res, soft, hard=None):
  hard = soft if hard is None else hard
  cur = resource.getrlimit(res)[1]
  if cur != resource.RLIM_INFINITY:
    soft, hard = min(soft, cur), min(hard, cur)
  resource.setrlimit(res, (soft, hard))


def drop_capabilities():
  class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
  LIBC.capset(ctypes.byref(Header(0x20080522, 0)), (ctypes.c_uint32 * 6)())


class RulesetAttr(ctypes.Structure):
  _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
              ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
  _pack_ = 1
  _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
  LIBC.syscall.restype = ctypes.c_long
  abi = LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                     ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
  return max(int(abi), 0)


def handled_fs(abi):
  """Every filesystem right this ABI knows: all of them are denied unless a rule grants them."""
  rights = (1 << 13) - 1  # ABI 1: EXECUTE ... MAKE_SYM
  for since, right in ((2, FS_REFER), (3, FS_TRUNCATE), (5, FS_IOCTL_DEV)):
    if abi >= since:
      rights |= right
  return rights


def landlock_confine(read_roots, write_roots):
  """Restricts this process (and what it starts) to: read + execute under `read_roots`,
  everything under `write_roots`, read + write on /dev/null and /dev/full; with ABI >= 4 no
  TCP bind or connect, with ABI >= 6 no signals to, and no abstract unix sockets of, processes
  outside. Returns the ABI used, 0 where the kernel has no Landlock. Needs no_new_privs."""
  abi = landlock_abi()
  if abi < 1:
    return 0
  fs = handled_fs(abi)
  attr = RulesetAttr(fs, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                     (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
  size = ctypes.sizeof(RulesetAttr) if abi >= 6 else 16 if abi >= 4 else 8
  ruleset = LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                         ctypes.c_size_t(size), ctypes.c_uint32(0))
  if ruleset < 0:
    return 0
  read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
  rw_file = FS_READ_FILE | FS_WRITE_FILE | (fs & FS_TRUNCATE)
  try:
    for paths, rights in ((read_roots, read), (write_roots, fs), (DEVICES_RW, rw_file)):
      for p in paths:
        try:
          fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
        except OSError:
          continue  # absent on this machine
        try:
          allowed = rights if os.path.isdir(p) else rights & fs & FS_FILE_RIGHTS
          rule = PathBeneathAttr(allowed, fd)
          if LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                          ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                          ctypes.c_uint32(0)) != 0:
            return 0
        finally:
          os.close(fd)
    if LIBC.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                    ctypes.c_uint32(0)) != 0:
      return 0
  finally:
    os.close(ruleset)
  return abi


def seccomp_load(bpf):
  """Loads a compiled seccomp filter (struct sock_filter[], 8 bytes each). Needs
  no_new_privs."""
  if not bpf:
    return False

  class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

  program = ctypes.create_string_buffer(bpf, len(bpf))
  fprog = SockFprog(len(bpf) // 8, ctypes.cast(program, ctypes.c_void_p))
  return LIBC.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                    0, 0) == 0


def report(exc, module, code):
  """Prints the traceback from the code's first frame on, like `python file.py` would."""
  module.__dict__.clear()  # frees what the code built, so a MemoryError can still be printed
  tb = exc.__traceback__
  while tb is not None and tb.tb_frame.f_code.co_filename != "<tool>":
    tb = tb.tb_next
  try:
    import linecache, traceback  # pylint: disable=import-outside-toplevel,multiple-imports
    lines = code.decode("utf-8", "replace").splitlines(True)
    linecache.cache["<tool>"] = (len(code), None, lines, "<tool>")
    traceback.print_exception(type(exc), exc, tb)
  except BaseException:
    os.write(2, ("%s: %s\n" % (type(exc).__name__, exc)).encode("utf-8", "replace"))
  raise SystemExit(1)


def enter_namespaces(wanted, root):
  """Enters the `wanted` namespaces the kernel allows (user: not as root); returns their names."""
  uid, gid = os.getuid(), os.getgid()
  namespaces = []
  if not root and "user" in wanted and LIBC.unshare(CLONE_FLAGS["user"]) == 0:
    namespaces.append("user")
    try:
      for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                         ("gid_map", "%d %d 1" % (gid, gid))):
        with open("/proc/self/" + name, "w") as f:
          f.write(text)
    except OSError:
      pass
  for name in ("net", "ipc", "mnt", "pid"):
    if name in wanted and LIBC.unshare(CLONE_FLAGS[name]) == 0:
      namespaces.append(name)
  LAYERS["namespaces"] = namespaces
  return namespaces


def fork_pid_namespace(namespaces):
  """Forks the PID namespace's init and, under it, the code's process: the one that returns."""
  r, w = os.pipe()
  child = os.fork()
  if child:
    relay(child, r, w)
  os.close(r)
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if "mnt" in namespaces:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
  child = os.fork()
  if child:
    init(child, w)
  os.close(w)


def confine(a, keep, namespaces, drop, bpf):
  """In the code's process: its directory, rights dropped, Landlock, seccomp, rlimits."""
  cwd = a["workdir"]
  os.chdir(cwd)
  writable = [cwd]  # not the private temp dirs: a hidden path may lie under them (TMPDIR = cwd)
  LAYERS["interpreter"] = keep
  readable = list(SYSTEM_READ) + keep + (["/proc"] if "pid" in namespaces else [])
  if drop:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
  elif "user" in namespaces:
    drop_capabilities()
  LAYERS["uid"] = os.getuid()
  prctl(PR_SET_NO_NEW_PRIVS, 1)
  prctl(PR_SET_DUMPABLE, 0)
  LAYERS["landlock"] = landlock_confine(readable, writable)
  LAYERS["seccomp"] = seccomp_load(bpf)
  limit(resource.RLIMIT_CPU, a["cpu_s"], a["cpu_s"] + 1)
  limit(resource.RLIMIT_AS, a["memory_mb"] << 20)
  limit(resource.RLIMIT_FSIZE, a["max_file_mb"] << 20)
  limit(resource.RLIMIT_NPROC, a["max_processes"])
  limit(resource.RLIMIT_NOFILE, 64)
  limit(resource.RLIMIT_CORE, 0)


def main():
  a = json.loads(sys.argv[1])
  code = sys.stdin.buffer.read()
  fd = os.open("/dev/null", os.O_RDWR)
  os.dup2(fd, 0)
  os.close(fd)
  os.umask(0o022)
  root = os.geteuid() == 0
  keep = python_dirs(a["hidden"])  # realpaths already (sandbox.hidden_realpaths)
  bpf = bytes.fromhex(a["seccomp_bpf"])
  prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != a["ppid"]:
    os._exit(137)  # the trainer is already gone

  namespaces = enter_namespaces(a["namespaces"], root)
  cwd = a["workdir"]
  if "mnt" in namespaces and mount(None, "/", None, MS_REC | MS_PRIVATE):
    mask_paths(a, keep)
  if not os.path.isdir(cwd):  # the parent's directory sits in a tmpfs we just mounted
    os.makedirs(cwd, mode=0o700)
    if root:
      os.chown(cwd, NOBODY, NOBODY)
  drop = root and all(first_blocked(p) is None for p in keep) and first_blocked(cwd) is None
  if "pid" in namespaces:
    fork_pid_namespace(namespaces)

  # The code's process.
  confine(a, keep, namespaces, drop, bpf)
  main_module = types.ModuleType("__main__")
  sys.modules["__main__"] = main_module
  sys.argv = ["<tool>"]
  sys.stdout.reconfigure(line_buffering=True)  # what was printed survives a kill
  os.write(a["ready_fd"], json.dumps(LAYERS).encode())
  os.close(a["ready_fd"])
  del a, bpf
  try:
    exec(compile(code, "<tool>", "exec"), main_module.__dict__)  # pylint: disable=exec-used
  except SystemExit:
    raise
  except BaseException as exc:  # pylint: disable=broad-except
    report(exc, main_module, code)


if __name__ == "__main__":
  main()
