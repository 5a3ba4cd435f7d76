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
    requests = task_requests(pool, per_seed=cfg.per_seed, examples=cfg.examples, run_seed=run_seed)
    results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens), shard_size)
    return new_tasks(pool, requests, results, per_seed=cfg.per_seed, min_chars=cfg.min_chars, max_chars=cfg.max_chars, max_similarity=cfg.max_similarity)


@task(name="agreement", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ensemble_agreement(generator, tasks: pl.DataFrame, cfg: SelfInstructConfig | DifficultyConfig, run_seed: int, shard_size: int) -> StageResult:
    per_member = solve_requests(tasks, [m.model_dump() for m in cfg.members], run_seed=run_seed)
    results = [
        in_shards(generator, requests, SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens), shard_size)
        for member, requests in zip(cfg.members, per_member, strict=True)
    ]
    return agreement(tasks, results, min_agreement=cfg.min_agreement)
