"""Score: a reward per sample, from a reward model or an LLM judge, kept as columns.

- Reward model (``distillery.engine.PoolingRewardModel``): vLLM's pooling runner scores the
  rendered (question, completion) chat; ``reward`` is the probability of the "good" label.
- LLM-as-judge: a rubric prompt (Jinja2, ``JUDGE_TEMPLATE``) through the generation engine;
  the judge's whole output is kept in ``judge_output``, the parsed 1-10 score in
  ``judge_score``, and ``reward = judge_score / 10``. An output with no parsable score is a
  reject (``judge_unparseable``), never a silent zero.

Every score and the scorer that made it are columns (``reward``, ``reward_source``), so nothing
about why a row was later kept or dropped is lost.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from distillery.stages.synthesize import sampling_seed
from schemas.recipe import sandboxed_environment

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
