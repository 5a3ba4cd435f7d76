"""Distillery: synthesize, verify, curate and publish LLM post-training data."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

__version__ = "0.1.0"


@cache
def code_version() -> str:
    """``0.1.0+g<commit>`` (``.dirty`` if the checkout has uncommitted changes to tracked files),
    or the bare package version outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


def run_id() -> str:
    """The id a flow's lineage and manifest carry: the Prefect flow run's id, or
    ``local-<nanoseconds>`` when the flow's function runs outside a flow run."""
    import time

    from prefect.runtime import flow_run

    return str(flow_run.get_id() or f"local-{time.time_ns()}")


# Settings every run needs, whoever starts it (`distillery ...`, `make`, plain `pytest`, a
# deployment's worker); a value the user set wins. The embedded Prefect server starts in a
# subprocess: on a busy 2-core machine Prefect's default 20 s start-up timeout is not enough.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",  # models come from files; nothing is fetched from a hub at run time
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls out
}


def apply_run_env() -> None:
    """Set :data:`RUN_ENV`'s defaults in this process's environment (``setdefault``)."""
    import os

    for key, value in RUN_ENV.items():
        os.environ.setdefault(key, value)
