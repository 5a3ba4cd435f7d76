"""Prefect task for the synthesize stage: one shard of problems through a vLLM Ray actor."""

import time

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.engine import EnginePool, SamplingSettings
from distillery.faults import failpoint
from distillery.stages.synthesize import build_requests, samples_from_results
from schemas.recipe import GenerationConfig


@task(name="synthesize-shard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, task_run_name="synthesize-shard-{shard_index}")
def synthesize_shard(
    pool: EnginePool, shard_index: int, seeds: pl.DataFrame, cfg: GenerationConfig, lineage: dict[str, str], first_index: int = 0, count: int | None = None
) -> StageResult:
    started = time.perf_counter()
    count = cfg.samples_per_problem if count is None else count
    requests = build_requests(seeds, cfg, first_index=first_index, count=count)
    results = pool.generate(shard_index, requests, SamplingSettings.from_config(cfg))
    result = samples_from_results(seeds, requests, results, samples_per_problem=count, lineage=lineage)
    failpoint("synthesize-shard")  # chaos tests: crash with this shard generated and cached
    seconds = time.perf_counter() - started
    tokens = sum(r["num_tokens"] for r in results)
    # An engine serves its shards one after another, so the time includes waiting for earlier ones;
    # the run's throughput is in the manifest's stats.
    get_run_logger().info(
        "shard %d: %d problems -> %d samples, %d tokens, done %.1fs after submission",
        shard_index, seeds.height, len(results), tokens, seconds,
    )
    return result
