"""The math-verify check itself, and the worker process that runs it under a time bound.

:func:`unbounded_match` is math-verify with its own timeouts off (they use ``signal.alarm``,
which works only in a process's main thread, and cannot interrupt one long C call such as a
big integer power anyway). :mod:`distillery.stages.verify` runs it in process only for plain
numbers, and otherwise in a worker process started with ``python -c "...; main()"`` that it
kills and replaces when one check runs past its time bound.

Protocol (one JSON array per line): the parent writes ``[n, predicted, reference]``; the
worker answers ``[n, code]`` with code ``1`` (equal), ``0`` (not equal) or ``-1`` (the check
raised past math-verify's own error handling, e.g. MemoryError). Before the first request it
writes ``["ready", pid]``. It exits when its standard input closes.

This module imports nothing heavy of the project: the worker starts in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from functools import cache

_MEMORY_HEADROOM = 1 << 30  # the worker may grow 1 GiB past its size after start-up


@cache
def _math_verify():
    """math-verify and its extraction settings, imported on first use: it loads sympy (about 4 s
    here), which a process that only passes this module's names on (the driver) never needs."""
    import math_verify

    return math_verify, [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]


def parsed(value: str):
    # math-verify reads LaTeX inside delimiters and plain expressions; give it both chances.
    mv, config = _math_verify()
    found = mv.parse(f"${value}$", extraction_config=config, parsing_timeout=None)
    return found or mv.parse(value, extraction_config=config, parsing_timeout=None)


def unbounded_match(predicted: str, reference: str) -> bool:
    """math-verify equivalence with no time bound (the caller bounds it); string equality first."""
    if predicted == reference:
        return True
    gold, pred = parsed(reference), parsed(predicted)
    if not gold or not pred:
        return False
    try:
        return bool(_math_verify()[0].verify(gold, pred, timeout_seconds=None))
    except Exception:  # math-verify raises on exotic sympy objects; treat as not equal
        return False


def _limit_memory() -> None:
    """A runaway computation fails with MemoryError instead of taking the machine's memory."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + _MEMORY_HEADROOM, resource.RLIM_INFINITY))
    except (OSError, ValueError, ImportError):  # not Linux, or a limit already lower: keep it
        pass


def main() -> None:
    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are off: we know
    unbounded_match("1/2", "0.5")  # warm up the parsers before the clock starts
    _limit_memory()
    out = sys.stdout
    out.write(json.dumps(["ready", os.getpid()]) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        number, predicted, reference = json.loads(line)
        try:
            code = 1 if unbounded_match(predicted, reference) else 0
        except Exception:  # MemoryError, RecursionError: report it and stay alive
            code = -1
        out.write(f"[{number}, {code}]\n")
        out.flush()


if __name__ == "__main__":
    main()
