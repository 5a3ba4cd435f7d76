"""Rationalization (STaR): solutions for the problems the model never solved, written with the
reference answer as a hint, kept only if they stand without it.

For each problem with a reference and no correct sample, ``rationalize.samples`` requests: the
problem's own user turn (``generation.prompt_template``) followed by the hint
(``distillery/prompts/rationalize/hint.j2``, versioned like the strategies' templates). A
rationale is kept only if it reaches the reference by itself (verified like any sample) and
does not mention the hint (``mentions_hint``: the words of the hint or a reference to a given
answer); the flow then curates the survivors (quality, decontamination, dedup). A kept row is an
SFT row like any other, trained on *without* the hint: its ``messages`` are the problem's own
system and user turns and the rationale, while ``prompt`` is what the model was sent (the hint
included), and ``origin`` (``rationalization``) and ``hint`` say where it came from.
"""

from __future__ import annotations

import re
from typing import Any

import polars as pl

from distillery.accounting import StageCount, StageResult, empty_rejects
from distillery.prompts import load_template
from distillery.stages.synthesize import build_messages, derived_seed, samples_from_results
from schemas.recipe import GenerationConfig, RationalizeConfig

STAGE = "rationalize"
HINT_CHECK = "hint_check"
ORIGIN = "rationalization"
_MENTIONS = re.compile(
    r"\bhints?\b|\b(?:given|provided|stated|suggested|expected) (?:final |correct )?answer\b|\bthe answer (?:is )?(?:given|provided)\b"
    r"|\b(?:we are|I am|I was|we were) told\b",
    re.IGNORECASE,
)


def hint_template():
    return load_template("rationalize", "hint")


def unsolved(problems: pl.DataFrame, solved: set[str]) -> pl.DataFrame:
    """The problems with a reference answer and no correct sample."""
    if not problems.height:
        return problems
    return problems.filter(pl.col("reference_answer").is_not_null() & ~pl.col("seed_id").is_in(list(solved)))


def hinted_messages(question: str, answer: str, gen: GenerationConfig) -> list[dict[str, str]]:
    messages = build_messages(question, gen)
    messages[-1] = {"role": "user", "content": hint_template().render(prompt=messages[-1]["content"], answer=answer).strip()}
    return messages


def rationale_requests(problems: pl.DataFrame, cfg: RationalizeConfig, gen: GenerationConfig) -> list[dict[str, Any]]:
    requests = []
    for p in problems.iter_rows(named=True):
        messages = hinted_messages(p["question"], p["reference_answer"], gen)
        for k in range(cfg.samples):
            requests.append({"seed_id": p["seed_id"], "sample_index": k, "sample_id": f"{p['seed_id']}-r{k:03d}", "messages": messages, "sampling_seed": derived_seed(gen.seed, p["seed_id"], "rationale", k)})
    return requests


def rationales_from_results(problems: pl.DataFrame, requests: list[dict], results: list[dict], cfg: RationalizeConfig, lineage: dict[str, str]) -> StageResult:
    """The rationales as sample rows (``<seed_id>-r<k>``, never a sample's id), with their origin and hint;
    generation errors and empty ones are rejects."""
    made = samples_from_results(problems, requests, results, samples_per_problem=cfg.samples, lineage=lineage)
    kept = made.kept.with_columns(
        pl.lit(ORIGIN).alias("origin"),
        pl.lit(hint_template().id).alias("hint_template"),
        (pl.lit("the correct final answer is ") + pl.col("reference_answer")).alias("hint"),
    )
    rejects = made.rejects.with_columns(pl.lit(STAGE).alias("stage")) if made.rejects.height else made.rejects
    count = StageCount(STAGE, made.count.rows_in, made.count.rows_out, made.count.fanout, made.count.dropped).check()
    return StageResult(STAGE, kept, rejects, count)


def mentions_hint(text: str | None) -> bool:
    return bool(text) and _MENTIONS.search(text) is not None


def drop_hint_mentions(rows: pl.DataFrame) -> StageResult:
    """Drop a rationale that names the hint (it would teach a model to expect one)."""
    if not rows.height:
        return StageResult(HINT_CHECK, rows, empty_rejects(), StageCount(HINT_CHECK, 0, 0))
    flags = [mentions_hint(t) for t in rows["completion"].to_list()]
    details = [f"the rationale mentions the hint: {_MENTIONS.search(t).group(0)!r}" if f else None for t, f in zip(rows["completion"].to_list(), flags, strict=True)]
    return StageResult.from_reasons(HINT_CHECK, rows, ["mentions_hint" if f else None for f in flags], details, rows_in=rows.height)

