"""Prefect task for the decontaminate stage: benchmark files are loaded once per run."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.decontaminate import decontaminate as decontaminate_rows
from distillery.stages.decontaminate import load_benchmark
from schemas.recipe import DecontaminationConfig


@task(name="decontaminate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def decontaminate(rows: pl.DataFrame, cfg: DecontaminationConfig) -> StageResult:
    return decontaminate_rows(rows, [load_benchmark(b) for b in cfg.benchmarks], cfg)
