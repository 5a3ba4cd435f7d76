"""Prefect tasks for Self-Instruct (new tasks from the seed pool) and Ensemble-Instruct's
agreement, on the generation engines through the generation cache
(``distillery/stages/self_instruct.py``)."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.engine import SamplingSettings, in_shards
from distillery.stages.self_instruct import agreement, new_tasks, solve_requests, task_requests
from schemas.recipe import DifficultyConfig, SelfInstructConfig


@task(name="self-instruct", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def self_instruct(generator, pool: pl.DataFrame, cfg: SelfInstructConfig, run_seed: int, shard_size: int) -> StageResult:
    requests = task_requests(pool, cfg, run_seed=run_seed)
    results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens), shard_size)
    return new_tasks(pool, requests, results, cfg)


@task(name="agreement", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ensemble_agreement(generator, tasks: pl.DataFrame, cfg: SelfInstructConfig | DifficultyConfig, run_seed: int, shard_size: int) -> StageResult:
    per_member = solve_requests(tasks, cfg, run_seed=run_seed)
    results = [
        in_shards(generator, requests, SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens), shard_size)
        for member, requests in zip(cfg.members, per_member, strict=True)
    ]
    return agreement(tasks, results, cfg)
