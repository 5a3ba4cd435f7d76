"""Prefect task for the dedup stage (exact + MinHash near-duplicates within the run)."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.dedup import dedup_samples
from schemas.recipe import DedupConfig


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(samples: pl.DataFrame, cfg: DedupConfig) -> StageResult:
    return dedup_samples(samples, cfg)
