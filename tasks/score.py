"""Prefect task for the score stage: one shard of samples through the recipe's scorer
(``distillery.stages.score.Scorer``: judge, reward model, majority vote or program)."""

from __future__ import annotations

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.score import Scorer


@task(name="score", cache_policy=NO_CACHE)
def score(rows: pl.DataFrame, scorer: Scorer) -> StageResult:
    """Score ``rows`` (pass the scorer in ``quote``); every score is a column, a failure a reject."""
    logger = get_run_logger()
    result = scorer(rows)
    if result.count.rows_in:
        logger.info("score (%s): %d rows scored, %d rejected %s", scorer.cfg.method, result.kept.height, result.rejects.height, result.count.dropped or "")
    sandbox = result.meta.get("sandbox")
    if sandbox and sandbox["isolation"] == "none":
        logger.warning("sandbox: programs ran without a process-isolation layer (%s)", sandbox.get("warning") or f"setting {sandbox['setting']!r}")
    elif sandbox:
        logger.info("sandbox: programs ran in the %s isolation layer", sandbox["isolation"])
    return result
