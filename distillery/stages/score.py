"""Score: a reward per sample, from a reward model or an LLM judge, kept as columns.

- Reward model (``distillery.engine.PoolingRewardModel``): vLLM's pooling runner scores the
  rendered (question, completion) chat; ``reward`` is the probability of the "good" label.
- LLM-as-judge: a rubric prompt (Jinja2, ``JUDGE_TEMPLATE``) through the generation engine;
  the judge's whole output is kept in ``judge_output``, the parsed 1-10 score in
  ``judge_score``, and ``reward = judge_score / 10``. By default (``score.judge.constrained``)
  constrained decoding holds the reply to that form (``judge_constraint``); an output with no
  parsable score is a reject (``judge_unparseable``), never a silent zero.

Every score and the scorer that made it are columns (``reward``, ``reward_source``), so nothing
about why a row was later kept or dropped is lost.
"""

from __future__ import annotations

import json
import re
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from distillery.stages.synthesize import sampling_seed
from schemas.templates import sandboxed_environment

JUDGE_TEMPLATE = (
    "You are grading a student's solution to a math problem.\n\n"
    "Problem:\n{{ question }}\n\n"
    "Solution:\n{{ completion }}\n\n"
    "Is the solution correct and clearly reasoned? Reply with one line in the form 'Score: N', "
    "where N is from 1 (wrong) to 10 (correct and clear)."
)
_SCORE = re.compile(r"score\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)
_JINJA = sandboxed_environment()  # a judge template from a recipe is untrusted: Jinja2's sandbox


def parse_judge_score(text: str | None) -> float | None:
    """The last 'Score: N' (N in 1..10, '/10' allowed) in a judge's output, else None."""
    if not text:
        return None
    found = [float(m) for m in _SCORE.findall(text)]
    found = [v for v in found if 1 <= v <= 10]
    return found[-1] if found else None


def judge_constraint(response_prefix: str) -> str:
    """The structured-output spec (``SamplingSettings.structured``) that holds a judge's reply,
    after its ``response_prefix``, to the score's form: " 7" after "Score:", else "Score: 7"."""
    ends_with_label = response_prefix.rstrip().lower().endswith("score:")
    return json.dumps({"regex": (" ?" if ends_with_label else "Score: ?") + "(10|[1-9])"})


def judge_requests(rows: pl.DataFrame, *, template: str = JUDGE_TEMPLATE, seed: int = 0, response_prefix: str = "") -> list[dict[str, Any]]:
    """One judge request per row, for ``VLLMEngine.generate`` (same seeds on a rerun).

    ``response_prefix`` (e.g. ``"Score:"``) starts the judge's answer for it, so that even a small
    model answers in the form the parser reads; it is part of ``judge_output``.
    """
    prompt = _JINJA.from_string(template)
    return [
        {
            "messages": [{"role": "user", "content": prompt.render(question=r["question"], completion=r["completion"])}],
            "sampling_seed": sampling_seed(seed, r["sample_id"], 0),
            "response_prefix": response_prefix,
        }
        for r in rows.iter_rows(named=True)
    ]


def with_judge_scores(rows: pl.DataFrame, results: list[dict[str, Any]], *, response_prefix: str = "") -> StageResult:
    """Attach the judge's outputs and parsed scores; rows without a parsable score are rejects."""
    outputs = [None if r.get("completion") is None else response_prefix + r["completion"] for r in results]
    scores = [parse_judge_score(o) for o in outputs]
    scored = rows.with_columns(
        pl.Series("judge_output", outputs, dtype=pl.Utf8),
        pl.Series("judge_score", scores, dtype=pl.Float64),
        (pl.Series("reward", scores, dtype=pl.Float64) / 10).alias("reward"),
        pl.lit("judge").alias("reward_source"),
    )
    return StageResult.split(
        "score",
        scored,
        [("judge_unparseable", pl.col("judge_score").is_null())],
        detail=pl.format("judge said: {}", pl.col("judge_output").fill_null("").str.slice(0, 200)),
    )


def with_rewards(rows: pl.DataFrame, rewards: list[float], *, source: str) -> StageResult:
    """Attach reward-model scores (every row gets one; nothing is dropped)."""
    scored = rows.with_columns(pl.Series("reward", rewards, dtype=pl.Float64), pl.lit(source).alias("reward_source"))
    return StageResult.split("score", scored, [("unscored", pl.col("reward").is_null() | pl.col("reward").is_nan())])


# -- the scorers: which one runs is the recipe's ``score.method`` ---------------------------------

BATCH = 64  # rows per scoring call


def label_as_reward(rows: pl.DataFrame, label: str, source: str, stage: str = "score") -> StageResult:
    """A 0/1 reward from a boolean label (null stays null: nothing to rank by)."""
    scored = rows.with_columns(pl.col(label).cast(pl.Float64).alias("reward"), pl.lit(source).alias("reward_source"))
    return StageResult.split(stage, scored, [])


class Scorer:
    """``score.method`` applied to shards of samples: ``scorer(rows) -> StageResult``; every
    score is a column, a failure a reject.

    - ``judge`` runs on the generation engines the flow already started (``pool``);
    - ``reward_model`` starts one vLLM pooling engine as a Ray actor on the first shard, and
      stops it in ``close``;
    - ``majority_vote`` (per problem: a shard holds all of a problem's samples) and ``program``
      (in the sandbox, a child process per row) run here.
    """

    def __init__(self, cfg, engine, pool=None, *, seed: int = 0) -> None:
        if cfg.method == "judge" and pool is None:
            raise ValueError("score.method 'judge' needs the generation engines (a pool)")
        if cfg.method not in ("judge", "reward_model", "majority_vote", "program"):
            raise ValueError(f"score.method {cfg.method!r} has no scorer")
        self.cfg, self.engine, self.pool, self.seed = cfg, engine, pool, seed
        self.stage = "execute" if cfg.method == "program" else "score"
        self.meta: dict = {}  # what the scorer tells the manifest (program: the sandbox's isolation)
        self._actor = None
        self._batches = 0

    def __call__(self, rows: pl.DataFrame) -> StageResult:
        if rows.height == 0:
            return StageResult.empty(self.stage)
        method = self.cfg.method
        if method == "judge":
            return self._judge(rows)
        if method == "reward_model":
            return with_rewards(rows, self._rewards(rows), source=f"reward_model:{self.cfg.reward_model}")
        if method == "majority_vote":
            from distillery.stages.select import majority_vote

            return label_as_reward(majority_vote(rows), "pseudo_correct", "majority_vote")
        from distillery.stages.execute import execute_programs

        program = self.cfg.program
        executed = execute_programs(rows, timeout_s=program.timeout_s, memory_mb=program.memory_mb, isolation=program.isolation)
        relabeled = label_as_reward(executed.kept, "program_correct", "program", stage="execute")
        self.meta["sandbox"] = executed.meta["sandbox"]
        return StageResult("execute", relabeled.kept, executed.rejects, executed.count, meta=executed.meta)

    def _judge(self, rows: pl.DataFrame) -> StageResult:
        from distillery.engine import SamplingSettings

        judge = self.cfg.judge
        structured = judge_constraint(judge.response_prefix) if judge.constrained else None
        sampling = SamplingSettings(judge.temperature, 1.0, judge.max_tokens, structured)
        results: list[dict] = []
        for start in range(0, rows.height, BATCH):
            requests = judge_requests(rows.slice(start, BATCH), template=judge.template or JUDGE_TEMPLATE, seed=self.seed, response_prefix=judge.response_prefix)
            results += self.pool.generate(self._batches, requests, sampling)
            self._batches += 1
        return with_judge_scores(rows, results, response_prefix=judge.response_prefix)

    def _rewards(self, rows: pl.DataFrame) -> list[float]:
        import ray

        if self._actor is None:
            from distillery.engine import ENGINE_ENV, PoolingRewardModel, start_ray
            from distillery.model_setup import materialize_reward_model

            folder = materialize_reward_model(self.cfg.reward_model)
            start_ray()
            engine = self.engine
            self._actor = ray.remote(num_cpus=engine.cpus_per_replica, num_gpus=engine.gpus_per_replica, runtime_env={"env_vars": ENGINE_ENV})(
                PoolingRewardModel
            ).remote(str(folder), engine)
        rewards: list[float] = []
        for start in range(0, rows.height, BATCH):
            batch = rows.slice(start, BATCH)
            rewards += ray.get(self._actor.score.remote(batch["question"].to_list(), batch["completion"].to_list()))
        return rewards

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
