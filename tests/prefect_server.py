"""A real ``prefect server start`` on 127.0.0.1 for the tests: started in its own process group,
waited on until its API answers, stopped with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A child in its own process group (so ``stop`` ends it and everything it started)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def serve(port: int, env: dict, log: Path, *args: str, timeout: float = 240) -> subprocess.Popen:
    """``prefect server start`` on ``port`` with ``env`` (its PREFECT_HOME among it) and ``args``;
    returns once ``/api/health`` answers 200 (it needs no auth string)."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = start(cmd, env, log)
    deadline = time.monotonic() + timeout  # a busy 2-core machine: migrations take a while
    try:
        while True:
            assert proc.poll() is None, f"prefect server exited ({proc.returncode}):\n{tail(log)}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"prefect server not healthy after {timeout:g} s:\n{tail(log)}"
            time.sleep(1)
    except BaseException:
        stop(proc)
        raise
