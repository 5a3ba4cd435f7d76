"""Prefect tasks for the decontaminate stage: the benchmarks are loaded and indexed once per
run, then every shard is checked against the index."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.decontaminate import BenchmarkIndex, load_benchmark
from distillery.stages.decontaminate import decontaminate as decontaminate_rows
from schemas.recipe import DecontaminationConfig


@task(name="benchmark-index", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def benchmark_index(cfg: DecontaminationConfig) -> BenchmarkIndex:
    """Load and index the recipe's benchmarks once, for ``decontaminate`` on every shard."""
    return BenchmarkIndex.build([load_benchmark(b) for b in cfg.benchmarks], cfg)


@task(name="decontaminate", cache_policy=NO_CACHE)
def decontaminate(rows: pl.DataFrame, cfg: DecontaminationConfig, index: BenchmarkIndex) -> StageResult:
    """One shard against the prebuilt index (pass it in ``prefect.utilities.annotations.quote``)."""
    return decontaminate_rows(rows, [], cfg, index=index)
