"""Prefect tasks for taxonomy-driven generation (GLAN): syllabi per subject, then problems per
session, on the generation engines through the generation cache (``distillery/stages/glan.py``)."""

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.engine import SamplingSettings, in_shards
from distillery.stages.glan import question_requests, questions, syllabus, syllabus_constraint, syllabus_requests
from schemas.recipe import GlanConfig


@task(name="syllabus", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_syllabi(generator, subjects: pl.DataFrame, cfg: GlanConfig, run_seed: int, shard_size: int) -> StageResult:
    requests = syllabus_requests(subjects, cfg, run_seed=run_seed)
    structured = syllabus_constraint(cfg.sessions) if cfg.constrained else None
    results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.syllabus_max_tokens, structured), shard_size)
    return syllabus(subjects, requests, results, cfg)


@task(name="questions", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def write_questions(generator, sessions: pl.DataFrame, cfg: GlanConfig, run_seed: int, shard_size: int) -> StageResult:
    requests = question_requests(sessions, cfg, run_seed=run_seed)
    results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.question_max_tokens), shard_size)
    return questions(sessions, requests, results, cfg)
