"""Run model-written Python in a child process with limits, and say why a run failed.

:func:`run_python` runs a program the way a program-of-thought completion expects (``print`` the
answer) and returns its output and, when it did not finish cleanly, a ``reason``: ``"timeout"``,
``"memory_limit"``, ``"forbidden"``, ``"error"`` or ``"no_output"``.

The layers, from the outside in:

1. **A process-isolation layer** (:func:`isolation_layer`; probed once per process, recorded in
   ``SandboxResult.isolation`` and, through the execute stage, in the manifest as
   ``sandbox.isolation``):

   - ``bwrap`` (Debian's ``bubblewrap``): new mount, PID, network, IPC, UTS and (where the kernel
     allows) user namespaces. The program sees a fresh root that is read-only: ``/usr`` and the
     ``/bin``, ``/lib*`` links, the interpreter's prefix and the readable roots (site-packages),
     ``/etc/ld.so.cache`` and ``/etc/localtime``, all read-only; a private 64 MiB ``/tmp``; its own
     ``/proc`` and a minimal ``/dev``; and its scratch directory, the only writable place. There
     is no ``/home``, ``/root``, project, other ``/etc`` file or parent's temporary files, no
     network (only a loopback of its own), no other process (``/proc`` and ``kill`` see only the
     sandbox's), no capabilities, uid 65534 and no further user namespaces where a user namespace
     can be had, a new session (no terminal injection), and it dies with its parent. The command
     is :func:`_bwrap_command`.
   - ``unshare`` (util-linux), where bwrap is missing but namespaces work (root, or unprivileged
     user namespaces): the same namespaces and the same file system, built by a small ``sh``
     script (PID 1 of the namespace) that mounts the new root, ``pivot_root``-s into it and runs
     the program under ``setpriv`` with every capability dropped and ``no_new_privs``.
   - ``none``: neither works (no binary, or a container that forbids namespaces). A warning is
     logged once and the manifest says ``sandbox.isolation: none`` with why; the layers below
     still apply. The setting ``required`` (recipe ``score.program.isolation`` or
     ``$DISTILLERY_SANDBOX_ISOLATION``) makes that an error instead.

2. **A separate process** (``python -I -S -B``: no environment variables, user site or bytecode
   writes) in a fresh temporary scratch directory as its working directory, with an empty
   environment (``PATH``, ``HOME`` and ``TMPDIR`` pointing at the scratch directory, and one
   thread for the BLAS/OpenMP pools): nothing of the parent's environment (tokens, keys) reaches
   it. The scratch directory is deleted afterwards.
3. **Resource limits** (``resource.setrlimit`` in ``preexec_fn``): address space (``memory_mb``),
   CPU seconds (about the timeout), open files, the size of a written file, no core dumps, and,
   when not running as root, ``RLIMIT_NPROC = 0`` (no fork, no new thread; set by the child
   itself, after the layer started it). The kernel does not apply ``RLIMIT_NPROC`` to root
   (``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN``), so it is left alone there; the audit hook refuses
   forks instead, and the PID namespace takes every process down with the program.
4. **A wall-clock timeout**: the child (or the layer's launcher) leads its own process group, and
   the whole group is killed when the time is up (and after every run, for stragglers); a layer's
   namespace dies with it. The child is also killed when the process that started it dies
   (``PR_SET_PDEATHSIG``; bwrap's ``--die-with-parent``, unshare's ``--kill-child``).
5. **An audit hook** (:func:`sys.addaudithook`, which cannot be removed once installed), set up
   before the program runs: it raises :class:`PermissionError` for opening a path outside the
   scratch directory (reads of the standard library and site-packages are allowed, so ``import
   math``, ``fractions`` or ``sympy`` work; writes are never allowed outside scratch), changing
   files outside scratch (remove, rename, link, chmod, rmtree, ...), ``sqlite3.connect`` outside
   scratch or by URI, every ``socket.*`` event and the network clients, ``subprocess.Popen``,
   ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.spawn*``, ``os.fork``, ``os.kill``,
   raising resource limits, and ``ctypes`` (importing it from the program, or calling into it
   from the program). Every refusal is recorded; a run with a refusal is ``"forbidden"`` even if
   the program caught the ``PermissionError``. The hook gives the clear reject reasons (the
   refused event and its path); the layer is what holds when the hook does not.

What the hook alone does not stop (tests/test_sandbox.py's escape suite lists them, and checks
that the isolation layer does): it runs in the same interpreter as the program, so code that sets
out to defeat it can (replace its ``refuse`` closure cell found through :mod:`gc`, then do
anything the process may), and it sees Python-level events, not what C code does (``ATTACH
DATABASE`` in sqlite3 opens files itself; a ``dir_fd`` argument is not in the ``open`` event, so
``os.open('../../x', dir_fd=fd)`` after a ``chdir`` inside scratch lands outside; a symlink can be
raced between the check and the open). Without a layer, the sandbox is a guard against
model-written code that reads or writes what it should not by mistake or habit, not a security
boundary. With one, a program that defeats the hook still finds only a read-only system, its
scratch directory, no network and no other process; what remains is the kernel itself (run the
pipeline as an unprivileged user, or in gVisor/Firecracker, against kernel exploits). A program
can always lie about its own result (its status record, its output), which only affects its row.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import selectors
import shlex
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
# Inside an isolation layer, the only files of /etc there are (the dynamic loader's cache, the time zone).
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
TMPFS_BYTES = 64 * 1024 * 1024  # the layer's private /tmp
ISOLATION_ENV = "DISTILLERY_SANDBOX_ISOLATION"
ISOLATION_SETTINGS = ("auto", "required", "bwrap", "unshare", "none")


@dataclass(frozen=True)
class SandboxResult:
    ok: bool
    stdout: str
    stderr: str
    reason: str | None  # None | "timeout" | "memory_limit" | "forbidden" | "error" | "no_output"
    detail: str | None
    seconds: float
    isolation: str = "none"  # the process-isolation layer it ran in: "bwrap", "unshare" or "none"


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
    import builtins, importlib, traceback, types, linecache, resource  # what the end needs, loaded before the hook
    if cfg["nproc"] is not None:  # here, not in the parent: an isolation layer must still fork the child
        resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))

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
        elif event == "sqlite3.connect" and isinstance(args[0], (str, bytes, os.PathLike)):
            name = os.fsdecode(args[0])
            if name.startswith("file:"):
                refuse(event, args[:1], "opens a database by URI (not allowed)")
            if name not in ("", ":memory:") and not under(resolve(name), scratch):
                refuse(event, args[:1], "outside the scratch directory")
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
def _prctl():
    """libc's prctl, loaded here (not in the forked child, where importing could deadlock); None without one."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


_PR_SET_PDEATHSIG = 1


def _limits(memory_mb: int, timeout_s: float):
    memory = int(memory_mb) * 1024 * 1024
    cpu = max(1, math.ceil(timeout_s)) + 1
    prctl = _prctl()

    def apply() -> None:
        if prctl is not None:  # killed with its parent (a layer's launcher also takes its namespace down)
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES_LIMIT, OPEN_FILES_LIMIT))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# --- The process-isolation layer -----------------------------------------------------------------
# A mount is (kind, source, destination): "ro"/"rw" bind a directory or a file, "symlink" makes a
# link (source is its target), "tmpfs" a private in-memory folder, "proc" and "dev" their kind.
Mount = tuple[str, str, str]


class IsolationUnavailable(RuntimeError):
    """The setting asks for a process-isolation layer that cannot be had here."""


def _setting(isolation: str | None) -> str:
    """The effective setting: an explicit one, else the environment's (``auto`` defers to it)."""
    setting = isolation if isolation not in (None, "auto") else os.environ.get(ISOLATION_ENV, "").strip().lower() or "auto"
    if setting not in ISOLATION_SETTINGS:
        msg = f"sandbox isolation {setting!r} is none of {', '.join(ISOLATION_SETTINGS)}"
        raise ValueError(msg)
    return setting


def _python() -> str:
    return _real(sys.executable)


@functools.cache
def _system_mounts() -> tuple[Mount, ...]:
    """What every program sees read-only: /usr, the top-level links or folders of libraries and
    binaries, the interpreter (its prefix) and the readable roots (site-packages), a few /etc files
    the dynamic loader and ``time`` read. Nothing else of the machine: no /home, /root, /work, /etc."""
    mounts: list[Mount] = [("ro", "/usr", "/usr")]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            mounts.append(("symlink", os.readlink(top), top))
        elif os.path.isdir(top):
            mounts.append(("ro", top, top))
    covered = ["/usr", *(m[2] for m in mounts if m[0] == "ro")]
    python_dirs = [_real(sys.base_prefix), _real(sys.base_exec_prefix), os.path.dirname(_python()), *_read_roots()]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.isdir(libdir):
        python_dirs.append(_real(libdir))
    for path in sorted(set(python_dirs), key=len):
        if os.path.isdir(path) and not any(_under(path, c) for c in covered):
            mounts.append(("ro", path, path))
            covered.append(path)
    for name in _ETC_FILES:
        if os.path.exists(name):
            mounts.append(("ro", _real(name), name))
    return tuple(mounts)


def _mounts(scratch: str, files: tuple[str, ...]) -> list[Mount]:
    """The program's file system: the system read-only, a private /tmp, /proc, /dev, the bootstrap's
    files, and the scratch directory, the only place on the machine it can write to."""
    return [
        ("tmpfs", "", "/tmp"),  # first: an interpreter or a virtual environment under /tmp is bound over it
        ("proc", "", "/proc"),
        ("dev", "", "/dev"),
        *_system_mounts(),
        *(("rw" if f.endswith(".json") else "ro", f, f) for f in files),  # the status record, the program
        ("rw", scratch, scratch),
    ]


def _bwrap_command(mounts: list[Mount], scratch: str, variant: str) -> list[str]:
    command = ["bwrap"]
    for kind, source, dest in mounts:
        if kind == "tmpfs":
            command += ["--size", str(TMPFS_BYTES), "--perms", "1777", "--tmpfs", dest]
        elif kind in ("proc", "dev"):
            command += [f"--{kind}", dest]
        else:
            command += [{"ro": "--ro-bind", "rw": "--bind", "symlink": "--symlink"}[kind], source, dest]
    command += ["--remount-ro", "/", "--chdir", scratch, "--unshare-all", "--hostname", "sandbox"]
    if variant == "userns":  # an unprivileged uid inside; no further user namespaces (kernel attack surface)
        command += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns"]
    command += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--"]
    return command


# Run by `unshare` as PID 1 of the new namespaces: mount a new root, pivot into it, drop every
# capability and run the program as a child (PID 1 ignores signals it has no handler for).
_UNSHARE_SCRIPT = r"""
set -eu
R=$1; S=$2; PIVOT_ROOT=$3; shift 3
mount -t tmpfs -o mode=0755,nosuid,nodev distillery-root "$R"
{mounts}
mkdir -p "$R/.old"
mount -o remount,ro,bind "$R"
cd "$R"
"$PIVOT_ROOT" . .old
umount -l /.old
cd "$S"
unset OLDPWD
set +e
setpriv --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"
exit $?
"""


def _unshare_command(mounts: list[Mount], newroot: str, scratch: str) -> list[str]:
    q = shlex.quote
    lines = []
    for kind, source, dest in mounts:
        target = '"$R"' + q(dest)
        if kind == "symlink":
            lines.append(f"mkdir -p \"$(dirname {target})\" && ln -s {q(source)} {target}")
        elif kind == "tmpfs":
            lines.append(f"mkdir -p {target} && mount -t tmpfs -o mode=1777,nosuid,nodev,size={TMPFS_BYTES} tmpfs {target}")
        elif kind == "proc":
            lines.append(f"mkdir -p {target} && mount -t proc -o nosuid,nodev,noexec proc {target}")
        elif kind == "dev":
            lines.append(f"mkdir -p {target}")
            for name in ("null", "zero", "full", "random", "urandom"):
                lines.append(f"touch {target}/{name} && mount --bind /dev/{name} {target}/{name}")
        else:
            make = f"mkdir -p {target}" if os.path.isdir(source) else f"mkdir -p \"$(dirname {target})\" && touch {target}"
            lines.append(f"{make} && mount --bind {q(source)} {target}")
            if kind == "ro":
                lines.append(f"mount -o remount,ro,bind {target}")
    script = _UNSHARE_SCRIPT.replace("{mounts}", "\n".join(lines))
    command = ["unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork", "--kill-child", "--propagation", "private"]
    if os.geteuid() != 0:
        command.append("--map-root-user")
    pivot_root = shutil.which("pivot_root", path="/usr/sbin:/sbin:/usr/bin:/bin") or "pivot_root"
    return [*command, "--", "/bin/sh", "-c", script, "distillery-sandbox", newroot, scratch, pivot_root]


def _layer_command(layer: str, variant: str, root: Path, scratch: str, files: tuple[str, ...]) -> list[str]:
    if layer == "bwrap":
        return _bwrap_command(_mounts(scratch, files), scratch, variant)
    newroot = root / "newroot"
    newroot.mkdir(mode=0o700)
    return _unshare_command(_mounts(scratch, files), str(newroot), scratch)


# The probe's program: its namespaces (which must not be this process's) and whether it sees a file
# next to its scratch directory (it must not).
_NAMESPACES = ("mnt", "net", "pid")
_PROBE = "import os\nprint(*(os.readlink('/proc/self/ns/' + n) for n in {1!r}), os.path.exists({0!r}))"


@functools.cache
def _probe(layer: str) -> tuple[str | None, str]:
    """Whether ``layer`` works here (probed once): (the variant that works or None, why not)."""
    if shutil.which(layer) is None:
        return None, f"no {layer!r} binary"
    why = ""
    for variant in ("userns", "plain") if layer == "bwrap" else ("plain",):
        try:
            result = _run("print(1)", timeout_s=10.0, memory_mb=512, stdin="", layer=layer, variant=variant, probe=True)
        except OSError as exc:
            why = f"{layer} does not start: {exc}"
            continue
        mine = [os.readlink(f"/proc/self/ns/{n}") for n in _NAMESPACES]
        seen = result.stdout.split()
        if result.ok and seen[:-1] and all(a != b for a, b in zip(seen[:-1], mine, strict=True)) and seen[-1] == "False":
            return variant, ""
        said = result.detail or _last_line(result.stderr) or result.stdout.strip()[:200]
        why = f"{layer} ({variant}) does not work here: {said}"
    return None, why


def isolation_layer(isolation: str | None = None) -> str:
    """The process-isolation layer a run gets: ``"bwrap"``, ``"unshare"`` or ``"none"``.

    ``isolation`` (else ``$DISTILLERY_SANDBOX_ISOLATION``, else ``auto``): ``auto`` takes the first
    layer that works (bwrap, then unshare) and falls back to ``none`` with a warning; ``required``
    is the same but raises :class:`IsolationUnavailable` instead of falling back; ``bwrap`` or
    ``unshare`` insists on that one; ``none`` runs with the audit hook and limits alone.
    """
    setting = _setting(isolation)
    if setting == "none":
        return "none"
    wanted = ("bwrap", "unshare") if setting in ("auto", "required") else (setting,)
    reasons = []
    for layer in wanted:
        variant, why = _probe(layer)
        if variant is not None:
            return layer
        reasons.append(why)
    message = "no process-isolation layer: " + "; ".join(reasons)
    if setting != "auto":
        raise IsolationUnavailable(message + f" (sandbox isolation {setting!r})")
    _warn_once(message + "; programs run with the audit hook and resource limits only (install bubblewrap)")
    return "none"


def isolation_info(isolation: str | None = None) -> dict:
    """What the manifest records as ``sandbox``: the layer, the setting and, without a layer, why not."""
    setting = _setting(isolation)
    layer = isolation_layer(setting)
    info = {"isolation": layer, "setting": setting}
    if layer == "none" and setting == "auto":
        info["warning"] = "; ".join(why for why in (_probe("bwrap")[1], _probe("unshare")[1]) if why)
    return info


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning("sandbox: %s", message)


def network_namespace_available() -> bool:
    """Whether programs run without a network (in an isolation layer's namespaces)."""
    return isolation_layer() != "none"


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


def run_python(
    code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, stdin: str = "", isolation: str | None = None
) -> SandboxResult:
    """Run ``code`` in a sandboxed child interpreter (see the module docstring) and report how it went.

    ``ok`` is True when the program finished without an exception, a refusal or a limit, and
    printed something; otherwise ``reason`` says why not and ``detail`` says more (the refused
    event and its argument, the last line of the traceback, ...). ``isolation`` chooses the
    process-isolation layer (:func:`isolation_layer`); ``result.isolation`` says which one ran.
    """
    layer = isolation_layer(isolation)
    variant = _probe(layer)[0] if layer != "none" else ""
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin, layer=layer, variant=variant or "")


def _run(
    code: str, *, timeout_s: float, memory_mb: int, stdin: str, layer: str, variant: str, probe: bool = False
) -> SandboxResult:
    start = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="distillery-sandbox-"))
    try:
        scratch = root / "scratch"
        scratch.mkdir(mode=0o700)
        scratch_real = _real(scratch)
        if probe:  # a file next to scratch: the program must not see it
            marker = root / "marker"
            marker.touch()
            code = _PROBE.format(str(marker), _NAMESPACES)
        program = root / "program.py"
        program.write_bytes(code.encode("utf-8", errors="replace"))
        status_path = root / "status.json"
        status_path.touch(mode=0o600)
        config = {
            "program": str(program),
            "program_name": PROGRAM_FILENAME,
            "status": str(status_path),
            "scratch": scratch_real,
            "read_roots": list(_read_roots()),
            "readable_files": list(_READABLE_FILES),
            "sys_path": list(_child_sys_path()),
            # RLIMIT_NPROC counts every task of the user and does not bind root; 0 forbids fork (and threads) otherwise.
            "nproc": 0 if os.geteuid() != 0 else None,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": scratch_real,
            "TMPDIR": scratch_real,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        command = [_python(), "-I", "-S", "-B", "-c", _BOOTSTRAP, json.dumps(config)]
        if layer != "none":
            files = (_real(program), _real(status_path))
            command = [*_layer_command(layer, variant, root, scratch_real, files), *command]
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
        rc = proc.returncode
        if layer != "none" and status is None and 128 < rc < 128 + signal.NSIG:
            rc = 128 - rc  # bwrap and sh report a child killed by signal N as 128 + N
        reason, detail = _classify(rc, status, stderr, timed_out=timed_out, timeout_s=timeout_s, memory_mb=memory_mb)
        if reason is None and not stdout.strip():
            reason = "no_output"
            detail = "the program printed nothing" + (f" (stderr: {_last_line(stderr)})" if stderr.strip() else "")
        return SandboxResult(reason is None, stdout, stderr, reason, detail, time.monotonic() - start, layer)
    finally:
        _remove_tree(root)
