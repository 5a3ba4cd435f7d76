"""Revision traces (self-correction data): a wrong sample, the verifier's feedback, and a revised
answer that verifies.

For each wrong sample (verified against a reference and found wrong, or without a final answer),
``revise.samples`` requests continue the conversation: the problem's system and user turns, the
wrong answer as the assistant's turn, and the feedback as a new user turn
(``distillery/prompts/revise/feedback.j2``: the wrong final answer, and the judge's reply
when the run has one). A revision is kept only if it verifies. Kept revisions are published twice:
as multi-turn SFT rows (``messages``: system, user, the first answer, the feedback, the revision;
``revises`` names the wrong sample) and as preference pairs of the revision over the first answer
(``reason: revision``).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from distillery.accounting import StageCount, StageResult
from distillery.formats import MESSAGES
from distillery.prompts import load_template
from distillery.stages.select import PAIR_SCHEMA
from distillery.stages.synthesize import build_messages, derived_seed, samples_from_results
from schemas.recipe import GenerationConfig, ReviseConfig

STAGE = "revise"
PAIR_STAGE = "revision_pair"
# request fields copied onto each revision's row; its ``messages`` (the turns sent) become the
# row's ``__turns`` until revision_messages appends the revision to them
_CARRIED = ("revises", "feedback", "first_completion", "messages")


def feedback_template():
    return load_template("revise", "feedback")


def wrong_samples(rows: pl.DataFrame) -> pl.DataFrame:
    """The samples verify found wrong (a reference to check against, and not correct)."""
    if not rows.height or "correct" not in rows.columns:
        return rows.clear() if rows.width else rows
    return rows.filter(pl.col("reference_answer").is_not_null() & (pl.col("correct") == False))  # noqa: E712


def feedback(row: dict) -> str:
    return feedback_template().render(predicted=row.get("predicted_answer"), judge=row.get("judge_output")).strip()


def revision_requests(wrong: pl.DataFrame, cfg: ReviseConfig, gen: GenerationConfig) -> list[dict[str, Any]]:
    requests = []
    for row in wrong.iter_rows(named=True):
        said = feedback(row)
        messages = [*build_messages(row["question"], gen), {"role": "assistant", "content": row["completion"]}, {"role": "user", "content": said}]
        for k in range(cfg.samples):
            requests.append({
                "seed_id": row["seed_id"], "sample_index": k, "sample_id": f"{row['sample_id']}-v{k:03d}", "messages": messages,
                "revises": row["sample_id"],
                "feedback": said, "first_completion": row["completion"],
                "sampling_seed": derived_seed(gen.seed, row["sample_id"], "revise", k),
            })  # fmt: skip
    return requests


def revisions_from_results(wrong: pl.DataFrame, requests: list[dict], results: list[dict], cfg: ReviseConfig, lineage: dict[str, str]) -> StageResult:
    """The revisions as sample rows (``<wrong sample_id>-v<k>``) with what they revise."""
    problems = wrong.unique("seed_id", keep="first").select("seed_id", "question", "reference_answer", "source")
    made = samples_from_results(problems, requests, results, samples_per_problem=cfg.samples, lineage=lineage, rows_in=wrong.height, carry=_CARRIED)
    kept = made.kept.rename({"messages": "__turns"}, strict=False)
    if kept.height:
        kept = kept.with_columns(pl.col("__turns").cast(MESSAGES))
    rejects = made.rejects.with_columns(pl.lit(STAGE).alias("stage")) if made.rejects.height else made.rejects
    count = StageCount(STAGE, wrong.height, made.count.rows_out, cfg.samples, made.count.dropped).check()
    return StageResult(STAGE, kept, rejects, count)


def revision_messages(rows: pl.DataFrame) -> pl.DataFrame:
    """The multi-turn conversation: the turns the model was sent, then its revision."""
    if not rows.height:
        return rows.drop("__turns", strict=False)
    values = [[*turns, {"role": "assistant", "content": c}] for turns, c in zip(rows["__turns"].to_list(), rows["completion"].to_list(), strict=True)]
    return rows.drop("__turns").with_columns(pl.Series("messages", values, dtype=MESSAGES))


def revision_pairs(rows: pl.DataFrame, gen: GenerationConfig) -> StageResult:
    """One preference pair per kept revision: the revision chosen over the first answer."""
    out = {name: [] for name in PAIR_SCHEMA}
    for r in rows.iter_rows(named=True):
        out["pair_id"].append(f"{r['sample_id']}-pair")
        out["seed_id"].append(r["seed_id"])
        out["prompt"].append(r["question"])
        out["chosen"].append(r["completion"])
        out["rejected"].append(r["first_completion"])
        out["chosen_sample_id"].append(r["sample_id"])
        out["rejected_sample_id"].append(r["revises"])
        out["chosen_score"].append(1.0)
        out["rejected_score"].append(0.0)
        out["reason"].append("revision")
    pairs = pl.DataFrame(out, schema=PAIR_SCHEMA)
    from distillery.formats import with_prompt_messages

    pairs = with_prompt_messages(pairs, gen)
    return StageResult(PAIR_STAGE, pairs, pl.DataFrame(), StageCount(PAIR_STAGE, rows.height, pairs.height))
