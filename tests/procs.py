"""Waiting on a subprocess's output without outliving the subprocess."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable


def wait_for_event_or_exit(proc: subprocess.Popen, event: threading.Event, timeout: float, what: str, output: Callable[[], str]) -> None:
    """Return once ``event`` is set (a reader thread saw the line it waits for). Fail at once,
    with the process's output, if the process exits first; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not event.wait(0.5):
        code = proc.poll()
        if code is not None and not event.is_set():
            time.sleep(0.5)  # let the reader take the last lines
            raise AssertionError(f"{what}: the process exited ({code}) first:\n{output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g}s:\n{output()}")
