"""Prefect tasks for selection: which samples are published, and the preference pairs."""

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.select import pair_stage, select_samples
from schemas.recipe import SelectConfig


@task(name="select", cache_policy=NO_CACHE)
def select(rows: pl.DataFrame, cfg: SelectConfig, label: str) -> StageResult:
    result = select_samples(rows, cfg, label)
    get_run_logger().info("select (%s, label %s, difficulty %s): kept %d of %d %s", cfg.policy, label, cfg.difficulty, result.kept.height, rows.height, result.count.dropped or "")
    return result


@task(name="pairs", cache_policy=NO_CACHE)
def pairs(rows: pl.DataFrame, cfg: SelectConfig, label: str) -> StageResult:
    result = pair_stage(rows, cfg.pairs, label)
    get_run_logger().info("pairs: %d pairs from %d problems %s", result.kept.height, result.count.rows_in, result.count.dropped or "")
    return result
