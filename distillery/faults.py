"""Fail points for the chaos tests: ``DISTILLERY_KILL_AT=NAME[:N]`` SIGKILLs this process the
N-th time (default: the first) the code passes ``failpoint(NAME)``.

A SIGKILL is what a lost machine, an out-of-memory kill or ``kill -9`` does: no ``finally``,
no ``atexit``, no flush. Putting it at named points (between generation shards, inside dedup,
between the data shards and the manifest) lets a test crash a real run at the same place every
time and prove that a rerun publishes the same rows. Unset (always, outside tests), a fail point
costs one dictionary lookup.

Points: ``synthesize-shard`` (after a shard's samples are generated and cached), ``dedup``
(dedup computed, not yet returned), ``publish`` (data and reject shards written, manifest not).
"""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter

_passes: Counter[str] = Counter()
_lock = threading.Lock()


def failpoint(name: str) -> None:
    spec = os.environ.get("DISTILLERY_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _lock:
        _passes[name] += 1
        if _passes[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)
