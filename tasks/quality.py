"""Prefect task for the quality stage (``distillery.stages.quality``): named heuristic filters."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.quality import quality_filter
from schemas.recipe import QualityConfig


@task(name="quality", cache_policy=NO_CACHE)
def quality(rows: pl.DataFrame, cfg: QualityConfig) -> StageResult:
    return quality_filter(rows, cfg)
