"""Run model-written Python in a child process with limits, and say why a run failed.

:func:`run_python` runs a program the way a program-of-thought completion expects (``print`` the
answer) and returns its output and, when it did not finish cleanly, a ``reason``: ``"timeout"``,
``"memory_limit"``, ``"forbidden"``, ``"error"`` or ``"no_output"``.

The layers, from the outside in:

1. **A separate process** (``python -I -S -B``: no environment variables, user site or bytecode
   writes) in a fresh temporary scratch directory as its working directory, with an empty
   environment (``PATH``, ``HOME`` and ``TMPDIR`` pointing at the scratch directory, and one
   thread for the BLAS/OpenMP pools). The scratch directory is deleted afterwards.
2. **Resource limits** (``resource.setrlimit`` in ``preexec_fn``): address space (``memory_mb``),
   CPU seconds (about the timeout), open files, the size of a written file, no core dumps, and,
   when not running as root, ``RLIMIT_NPROC = 0`` (no fork, no new thread). The kernel does not
   apply ``RLIMIT_NPROC`` to root (``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN``), so it is left alone
   there; the audit hook refuses forks instead.
3. **A wall-clock timeout**: the child leads its own process group, and the whole group is
   killed when the time is up (and after every run, for stragglers).
4. **A network namespace**: when the ``unshare`` binary exists and ``unshare --net true`` works
   (root, or a kernel that lets this user create one; probed once per process), the child runs
   under ``unshare --net`` and has no network at all, only a loopback interface that is down.
5. **An audit hook** (:func:`sys.addaudithook`, which cannot be removed once installed), set up
   before the program runs: it raises :class:`PermissionError` for opening a path outside the
   scratch directory (reads of the standard library and site-packages are allowed, so ``import
   math``, ``fractions`` or ``sympy`` work; writes are never allowed outside scratch), changing
   files outside scratch (remove, rename, link, chmod, rmtree, ...), every ``socket.*`` event and
   the network clients, ``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``,
   ``os.spawn*``, ``os.fork``, ``os.kill``, raising resource limits, and ``ctypes`` (importing it
   from the program, or calling into it from the program). The hook is the portable layer: it
   works wherever Python does, with or without root or namespaces. Every refusal is recorded; a
   run with a refusal is ``"forbidden"`` even if the program caught the ``PermissionError``.

What this protects against: model-written code that, by mistake or by habit, reads or writes
files it should not (``/etc/passwd``, the project, ``/tmp``), fetches things from the network,
starts processes, loops forever, allocates without bound or prints without end (output is kept
up to 64 KiB: the first and last 32 KiB).

What it does not protect against: a determined attacker. The audit hook runs in the same
interpreter as the program, so code that sets out to defeat it can (edit the hook's closure
found through :mod:`gc`, call ``_posixsubprocess.fork_exec`` through the ``subprocess`` module a
library already imported, race a symlink between the check and the open, use ``dir_fd``
arguments after ``chdir``-ing inside scratch, exploit the kernel, ...). It is a guard against
model-written code, not a security boundary against malicious humans: for that, rely on the
network namespace and run the whole pipeline in a container or VM (gVisor, Firecracker, nsjail
with seccomp) as an unprivileged user. As root the child can still see the file system through
C extensions, which the audit hook does not see (it sees Python-level ``open``, not ``fopen``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024  # bytes kept of stdout and of stderr: the first and the last half
FILE_SIZE_LIMIT = 16 * 1024 * 1024  # RLIMIT_FSIZE: the largest file the program may write
OPEN_FILES_LIMIT = 64  # RLIMIT_NOFILE
PROGRAM_FILENAME = "<program>"

# Files outside the scratch directory that a program may open for reading (and /dev/null for writing).
_READABLE_FILES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
_EXTRA_READ_ROOTS = ("/usr/share/zoneinfo",)


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    stdout: str
    stderr: str
    reason: str | None  # None | "timeout" | "memory_limit" | "forbidden" | "error" | "no_output"
    detail: str | None
    seconds: float


# The child's entry point: read the program, install the audit hook, run the program, write a status
# record (outcome, exception, refusals) to a file the program cannot open, and leave with os._exit.
_BOOTSTRAP = r"""
import sys, os, json

def _main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    status_fd = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    sys.path[:] = cfg["sys_path"]
    sys.argv[:] = [cfg["program_name"]]
    sys.dont_write_bytecode = True
    import builtins, importlib, traceback, types, linecache  # what the end needs, loaded before the hook

    PROGRAM = cfg["program_name"]
    SEP = os.sep
    scratch = cfg["scratch"]
    read_roots = tuple(cfg["read_roots"])
    readable_files = frozenset(cfg["readable_files"])
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess"))
    import_frames = ("<frozen importlib", os.path.dirname(importlib.__file__) + SEP)
    ctypes_frames = import_frames + (os.path.join(os.path.dirname(os.__file__), "ctypes") + SEP,)
    network_prefixes = ("socket.", "http.client.", "urllib.", "ftplib.", "smtplib.", "imaplib.",
                        "poplib.", "nntplib.", "telnetlib.", "webbrowser.")
    process_events = frozenset(("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                                "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.startfile",
                                "signal.pthread_kill", "resource.setrlimit"))
    # event -> ((index of a path argument, index of its dir_fd argument or None, follow symlinks), ...)
    change_events = {
        "os.remove": ((0, 1, False),), "os.rmdir": ((0, 1, False),), "os.mkdir": ((0, 2, False),),
        "os.rename": ((0, 2, False), (1, 3, False)), "os.link": ((0, 2, True), (1, 3, False)),
        "os.symlink": ((1, 2, False),), "os.chmod": ((0, 2, True),), "os.chown": ((0, 3, True),),
        "os.chflags": ((0, None, True),), "os.utime": ((0, 3, True),), "os.truncate": ((0, None, True),),
        "os.setxattr": ((0, None, True),), "os.removexattr": ((0, None, True),), "os.chdir": ((0, None, True),),
        "shutil.rmtree": ((0, 1, False),), "shutil.move": ((0, None, False), (1, None, False)),
        "shutil.copytree": ((1, None, False),), "shutil.chown": ((0, None, True),),
        "shutil.copyfile": ((1, None, True),), "shutil.copymode": ((1, None, True),),
        "shutil.copystat": ((1, None, True),),
    }
    violations = []
    realpath, isabs, isdir, join, split = os.path.realpath, os.path.isabs, os.path.isdir, os.path.join, os.path.split

    def under(path, root):
        return path == root or path.startswith(root if root.endswith(SEP) else root + SEP)

    def shown(value):
        if isinstance(value, (str, bytes, int, float, bool, type(None))):
            text = repr(value)
        elif isinstance(value, list) and len(value) < 8:
            text = "[" + ", ".join(shown(v) for v in value) + "]"
        elif isinstance(value, tuple) and len(value) < 8:
            text = "(" + ", ".join(shown(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        else:
            text = "<" + type(value).__name__ + ">"
        return text if len(text) <= 200 else text[:197] + "..."

    def refuse(event, args, why):
        message = event + "(" + ", ".join(shown(a) for a in args) + ") " + why
        violations.append(message)
        raise PermissionError(message)

    def resolve(path, dir_fd=None, follow=True):
        path = os.fsdecode(path)
        if not isabs(path) and isinstance(dir_fd, int) and dir_fd >= 0:
            path = join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        if follow:
            return realpath(path)
        head, tail = split(os.path.abspath(path))
        return join(realpath(head), tail)

    def from_program(skip):
        # The nearest frame, skipping the import machinery (and ctypes itself), is the program's own.
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name == PROGRAM:
                return True
            if not name.startswith(skip):
                return False
            frame = frame.f_back
        return False

    def check_open(path, mode, flags):
        if isinstance(path, int):
            return  # a file descriptor that is already open
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(isinstance(flags, int) and flags & write_flags)
        raw = os.path.abspath(os.fsdecode(path))
        if raw in readable_files:
            if writes and raw != "/dev/null":
                refuse("open", (path, mode or "w"), "writes to a device")
            return
        real = resolve(path)
        if under(real, scratch):
            return
        where = "" if real == raw else " (resolves to " + repr(real) + ")"
        if writes:
            refuse("open", (path, mode or "w"), "writes outside the scratch directory" + where)
        if isdir(real):
            refuse("open", (path,), "opens a directory outside the scratch directory" + where)
        if not any(under(real, root) for root in read_roots):
            refuse("open", (path,), "outside the scratch directory" + where)

    def hook(event, args):
        if event == "open":
            check_open(*args[:3])
        elif event in change_events:
            for index, fd_index, follow in change_events[event]:
                if index >= len(args) or isinstance(args[index], int):
                    continue
                dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
                if not under(resolve(args[index], dir_fd, follow), scratch):
                    refuse(event, (args[index],), "outside the scratch directory")
        elif event.startswith(network_prefixes):
            refuse(event, tuple(a for a in args if type(a).__name__ not in ("socket", "SSLSocket")), "uses the network")
        elif event in process_events or event.startswith(("os.exec", "os.spawn")):
            refuse(event, args[:2], "is not allowed (no processes, signals or limits)")
        elif event == "resource.prlimit" and len(args) > 2 and args[2] is not None:
            refuse(event, args[:2], "is not allowed (no processes, signals or limits)")
        elif event.startswith("ctypes.") and from_program(ctypes_frames):
            refuse(event, args[:1], "is not allowed (foreign function interface)")
        elif event == "import" and args[0].partition(".")[0] in blocked_imports and from_program(import_frames):
            refuse(event, args[:1], "is not allowed in the program")

    real_import = builtins.__import__

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        # The audit event "import" only fires for a module not loaded yet; sympy loads ctypes itself.
        if level == 0 and name.partition(".")[0] in blocked_imports and sys._getframe(1).f_code.co_filename == PROGRAM:
            refuse("import", (name,), "is not allowed in the program")
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded_import
    sys.addaudithook(hook)

    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    status = {"outcome": "ok"}
    try:
        exec(compile(source, PROGRAM, "exec"), module.__dict__)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            status = {"outcome": "exit", "type": "SystemExit", "detail": "SystemExit: " + str(exc.code)[:500]}
    except BaseException as exc:
        status = {"outcome": "exception", "type": type(exc).__name__}
        try:
            status["detail"] = traceback.format_exception_only(type(exc), exc)[-1].strip()[:1000]
            report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
            report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<string>"])
            sys.stderr.write("".join(report.format()))  # the program's frames, not the bootstrap's
        except BaseException:
            status["detail"] = type(exc).__name__
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    status["violations"] = violations[:10]
    os.write(status_fd, json.dumps(status).encode())
    os._exit(0)

_main()
"""


def _real(path: str | Path) -> str:
    return os.path.realpath(path)


@functools.cache
def _read_roots() -> tuple[str, ...]:
    """Directories a program may read: the standard library and site-packages (resolved)."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if paths.get(k)}
    roots.update(p for p in _EXTRA_READ_ROOTS if os.path.isdir(p))
    return tuple(sorted({_real(r) for r in roots if os.path.isdir(r)}))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@functools.cache
def _child_sys_path() -> tuple[str, ...]:
    """This interpreter's import path, less what lies outside the readable roots (the project, '')."""
    roots = _read_roots()
    keep = []
    for entry in sys.path:
        if entry and os.path.isdir(entry) and any(_under(_real(entry), r) for r in roots) and entry not in keep:
            keep.append(entry)
    return tuple(keep)


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare --net`` works here (probed once): then every child runs without a network."""
    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _limits(memory_mb: int, timeout_s: float):
    memory = int(memory_mb) * 1024 * 1024
    cpu = max(1, math.ceil(timeout_s)) + 1
    # RLIMIT_NPROC counts every task of the user and does not bind root; 0 forbids fork (and threads) otherwise.
    nproc = 0 if os.geteuid() != 0 else None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

    return apply


class _Capture:
    """The first and the last ``limit // 2`` bytes of a stream, and how many bytes it had."""

    def __init__(self, limit: int = OUTPUT_LIMIT):
        self.half = limit // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.half - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.half:
                del self.tail[: len(self.tail) - self.half]

    def text(self) -> str:
        cut = self.total - len(self.head) - len(self.tail)
        middle = f"\n[... {cut} bytes cut ...]\n".encode() if cut > 0 else b""
        return bytes(self.head + middle + self.tail).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _exited(pid: int) -> bool:
    """Whether the child has exited, leaving it unreaped (so its process group id stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _communicate(proc: subprocess.Popen, deadline: float) -> tuple[_Capture, _Capture, bool]:
    """Read stdout and stderr until both close and the child exits, or until the deadline."""
    out, err = _Capture(), _Capture()
    timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)

        def pump(wait: float) -> None:
            for key, _ in sel.select(wait):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data.add(chunk)
                else:
                    sel.unregister(key.fileobj)

        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            pump(remaining)
        while not timed_out and not _exited(proc.pid):
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.005)
        _kill_group(proc.pid)  # stragglers (or the program itself, on a timeout)
        stop = time.monotonic() + 0.5  # what a killed program had written is still worth keeping
        while sel.get_map() and time.monotonic() < stop:
            pump(0.05)
    proc.wait()
    return out, err, timed_out


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _classify(
    rc: int, status: dict | None, stderr: str, *, timed_out: bool, timeout_s: float, memory_mb: int
) -> tuple[str | None, str | None]:
    if timed_out:
        return "timeout", f"still running after {timeout_s:g} s (wall clock), killed"
    if rc == -signal.SIGXCPU:
        return "timeout", f"CPU time limit ({max(1, math.ceil(timeout_s)) + 1} s) exceeded"
    if status is not None:
        if status.get("violations"):
            return "forbidden", status["violations"][0]
        if status.get("type") == "MemoryError":
            return "memory_limit", f"MemoryError (memory limit {memory_mb} MiB)"
        if status.get("outcome") in ("exception", "exit"):
            return "error", status.get("detail") or status.get("type")
        return None, None
    # No status record: the interpreter died or the program left through os._exit.
    if rc == 0:
        return None, None
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory_limit", f"out of memory (memory limit {memory_mb} MiB): {_last_line(stderr)}"
    if rc == -signal.SIGKILL:
        return "memory_limit", "killed by SIGKILL (out of memory?)"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return "error", f"killed by {name}" + (f": {_last_line(stderr)}" if stderr.strip() else "")
    return "error", f"exited with status {rc}" + (f": {_last_line(stderr)}" if stderr.strip() else "")


def _remove_tree(root: Path) -> None:
    def retry(func, path, _exc):  # a program may have left a directory without permissions
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, 0o700)
            func(path)

    shutil.rmtree(root, onerror=retry)
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "") -> SandboxResult:
    """Run ``code`` in a sandboxed child interpreter (see the module docstring) and report how it went.

    ``ok`` is True when the program finished without an exception, a refusal or a limit, and
    printed something; otherwise ``reason`` says why not and ``detail`` says more (the refused
    event and its argument, the last line of the traceback, ...).
    """
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="distillery-sandbox-"))
    try:
        scratch = root / "scratch"
        scratch.mkdir(mode=0o700)
        scratch_real = _real(scratch)
        program = root / "program.py"
        program.write_bytes(code.encode("utf-8", errors="replace"))
        status_path = root / "status.json"
        config = {
            "program": str(program),
            "program_name": PROGRAM_FILENAME,
            "status": str(status_path),
            "scratch": scratch_real,
            "read_roots": list(_read_roots()),
            "readable_files": list(_READABLE_FILES),
            "sys_path": list(_child_sys_path()),
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": scratch_real,
            "TMPDIR": scratch_real,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        command = [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(config)]
        if network_namespace_available():
            command = ["unshare", "--net", "--", *command]
        stdin_file = None
        if stdin:
            stdin_path = root / "stdin.txt"
            stdin_path.write_text(stdin, encoding="utf-8")
            stdin_file = stdin_path.open("rb")
        try:
            proc = subprocess.Popen(
                command,
                stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=scratch_real,
                env=env,
                start_new_session=True,
                preexec_fn=_limits(memory_mb, timeout_s),  # noqa: PLW1509 (it only calls setrlimit)
            )
        finally:
            if stdin_file is not None:
                stdin_file.close()
        try:
            out, err, timed_out = _communicate(proc, start + timeout_s)
        finally:
            if proc.returncode is None:  # an exception while reading: leave nothing behind
                _kill_group(proc.pid)
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        stdout, stderr = out.text(), err.text()
        status = None
        with contextlib.suppress(OSError, ValueError):
            raw = status_path.read_text(encoding="utf-8")
            status = json.loads(raw) if raw else None
        reason, detail = _classify(proc.returncode, status, stderr, timed_out=timed_out, timeout_s=timeout_s, memory_mb=memory_mb)
        if reason is None and not stdout.strip():
            reason = "no_output"
            detail = "the program printed nothing" + (f" (stderr: {_last_line(stderr)})" if stderr.strip() else "")
        return SandboxResult(reason is None, stdout, stderr, reason, detail, time.monotonic() - start)
    finally:
        _remove_tree(root)
