"""Prefect task for the evolve stage (Evol-Instruct): one shard of instructions rewritten once,
on the generation engines (through the generation cache), failed rewrites eliminated."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.engine import SamplingSettings
from distillery.stages.evolve import evolution_requests, evolve_round
from schemas.recipe import EvolveConfig


@task(name="evolve-shard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, task_run_name="evolve-{round_no}-shard-{shard_index}")
def evolve_shard(generator, shard_index: int, instructions: pl.DataFrame, round_no: int, cfg: EvolveConfig, run_seed: int) -> StageResult:
    requests = evolution_requests(instructions, cfg, round_no=round_no, run_seed=run_seed)
    results = generator.generate(shard_index, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens))
    return evolve_round(instructions, requests, results, cfg, round_no=round_no)
