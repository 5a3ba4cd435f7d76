"""Prefect task for the score stage: a reward per sample from the scorer the recipe names.

- ``judge`` runs on the generation engines the flow already started (Ray actors);
- ``reward_model`` starts one vLLM pooling engine as a Ray actor, scores, and stops it;
- ``majority_vote`` and ``program`` run here (the program in the sandbox, a child process per row).

The stage functions are in ``distillery/stages/score.py``, ``select.py`` and ``execute.py``.
"""

from __future__ import annotations

import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.engine import EnginePool, SamplingSettings
from distillery.stages.execute import execute_programs
from distillery.stages.score import JUDGE_TEMPLATE, judge_requests, with_judge_scores, with_rewards
from distillery.stages.select import majority_vote
from schemas.recipe import EngineConfig, ScoreConfig

BATCH = 64  # rows per scoring call


def _label_as_reward(rows: pl.DataFrame, label: str, source: str, stage: str = "score") -> StageResult:
    """A 0/1 reward from a boolean label (null stays null: nothing to rank by)."""
    scored = rows.with_columns(pl.col(label).cast(pl.Float64).alias("reward"), pl.lit(source).alias("reward_source"))
    return StageResult.split(stage, scored, [])


def judge(rows: pl.DataFrame, cfg: ScoreConfig, pool: EnginePool, *, seed: int) -> StageResult:
    sampling = SamplingSettings(cfg.judge.temperature, 1.0, cfg.judge.max_tokens)
    template = cfg.judge.template or JUDGE_TEMPLATE
    results: list[dict] = []
    for i, start in enumerate(range(0, rows.height, BATCH)):
        batch = rows.slice(start, BATCH)
        requests = judge_requests(batch, template=template, seed=seed, response_prefix=cfg.judge.response_prefix)
        results += pool.generate(i, requests, sampling)
    return with_judge_scores(rows, results, response_prefix=cfg.judge.response_prefix)


def reward_model(rows: pl.DataFrame, cfg: ScoreConfig, engine: EngineConfig) -> StageResult:
    import ray

    from distillery.engine import ENGINE_ENV, PoolingRewardModel, start_ray
    from distillery.model_setup import materialize_reward_model

    folder = materialize_reward_model(cfg.reward_model)
    start_ray()
    actor = ray.remote(num_cpus=engine.cpus_per_replica, num_gpus=engine.gpus_per_replica, runtime_env={"env_vars": ENGINE_ENV})(
        PoolingRewardModel
    ).remote(str(folder), engine)
    try:
        rewards: list[float] = []
        for start in range(0, rows.height, BATCH):
            batch = rows.slice(start, BATCH)
            rewards += ray.get(actor.score.remote(batch["question"].to_list(), batch["completion"].to_list()))
    finally:
        ray.kill(actor)
    return with_rewards(rows, rewards, source=f"reward_model:{cfg.reward_model}")


@task(name="score", cache_policy=NO_CACHE)
def score(rows: pl.DataFrame, cfg: ScoreConfig, engine: EngineConfig, pool: EnginePool | None = None, seed: int = 0) -> StageResult:
    """Score ``rows`` by ``cfg.method`` (not ``"none"``); every score is a column, a failure a reject."""
    logger = get_run_logger()
    if rows.height == 0:
        return StageResult.empty("execute" if cfg.method == "program" else "score")
    if cfg.method == "judge":
        if pool is None:
            raise ValueError("score.method 'judge' needs the generation engines (a pool)")
        result = judge(rows, cfg, pool, seed=seed)
    elif cfg.method == "reward_model":
        result = reward_model(rows, cfg, engine)
    elif cfg.method == "majority_vote":
        result = _label_as_reward(majority_vote(rows), "pseudo_correct", "majority_vote")
    elif cfg.method == "program":
        program = cfg.program
        executed = execute_programs(rows, timeout_s=program.timeout_s, memory_mb=program.memory_mb, isolation=program.isolation)
        relabeled = _label_as_reward(executed.kept, "program_correct", "program", stage="execute")
        result = StageResult("execute", relabeled.kept, executed.rejects, executed.count, meta=executed.meta)
        sandbox = executed.meta["sandbox"]
        if sandbox["isolation"] == "none":
            why = sandbox.get("warning") or f"setting {sandbox['setting']!r}"
            logger.warning("sandbox: programs ran without a process-isolation layer (%s)", why)
        else:
            logger.info("sandbox: programs ran in the %s isolation layer", sandbox["isolation"])
    else:
        raise ValueError(f"score.method {cfg.method!r} has no scorer")
    logger.info("score (%s): %d rows scored, %d rejected %s", cfg.method, result.kept.height, result.rejects.height, result.count.dropped or "")
    return result
