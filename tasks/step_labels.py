"""Prefect task for step labels (process supervision): one shard of verified samples."""

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.step_labels import Rollout, label_steps
from schemas.recipe import Recipe


@task(name="step-label", cache_policy=NO_CACHE)
def step_label(rows: pl.DataFrame, recipe: Recipe, rollout: Rollout) -> StageResult:
    cfg = recipe.process_supervision
    result = label_steps(rows, cfg, recipe.generation, recipe.verify, rollout, seed=recipe.generation.seed)
    spent = int(result.kept["rollouts"].sum()) if result.kept.height else 0
    get_run_logger().info("step labels (%s): %d of %d solutions labelled, %d rollouts %s", cfg.method, result.kept.height, rows.height, spent, result.count.dropped or "")
    return result
