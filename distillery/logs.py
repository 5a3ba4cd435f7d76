"""The run logger: Prefect's inside a flow or task run, a plain module logger outside one."""

from __future__ import annotations

import logging


def run_logger(name: str) -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (its records are the run's logs), else
    ``logging.getLogger(name)`` (tests, scripts, code called outside a run)."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a Prefect run
        return logging.getLogger(name)
