"""Difficulty-targeted generation: from each problem's pass rate over N samples, a harder variant
of a problem the model always solves and a simpler one of a problem it never solves; every
published sample is labelled with its problem's difficulty.

Plain functions around whatever generates text (the flow samples and verifies in between):

- ``probe``: stage ``probe`` (problems in, problems out, nothing dropped): each problem's pass
  rate over its N verified samples (``probe_pass_rate``); the flow draws them with the
  recipe's own sampling, so the final sampling of the same problems comes from the cache.
- ``retarget``: stage ``retarget``, fan-out 2: slot 0 is the problem itself (always kept), slot 1
  its variant: ``harder`` (``difficulty/harder.j2``) for a pass rate of 1, ``simpler``
  (``difficulty/simpler.j2``) for 0. Dropped: ``not_targeted`` (a pass rate in between, or none:
  no reference answer), and the failed rewrites as in Evol-Instruct (``generation_error``,
  ``empty``, ``copied_prompt``, ``unanswerable``, ``no_change``, ``too_long``).
- A variant has no computed answer: the ensemble's ``agreement`` stage
  (``distillery/stages/self_instruct.py``) gives it one, or drops it; originals pass through.
- ``label``: ``pass_rate`` and ``difficulty`` (``easy`` at ``easy_at`` or more, ``hard`` at
  ``hard_at`` or less, else ``medium``; null without a reference) on every sample.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import polars as pl

from distillery.accounting import StageCount, StageResult, rows_to_rejects
from distillery.prompts import load_template
from distillery.stages.evolve import elimination_reason
from distillery.stages.self_instruct import parse_task
from distillery.stages.synthesize import derived_seed
from schemas.recipe import DifficultyConfig


def probe(problems: pl.DataFrame, verified: pl.DataFrame) -> StageResult:
    """Stage ``probe``: ``probe_pass_rate`` (correct / samples with a verdict) and
    ``probe_samples`` per problem; null where no sample could be verified."""
    if verified.height:
        rates = (
            verified.filter(pl.col("correct").is_not_null())
            .group_by("seed_id")
            .agg(pl.col("correct").cast(pl.Float64).mean().alias("probe_pass_rate"), pl.len().cast(pl.Int64).alias("probe_samples"))
        )
    else:
        rates = pl.DataFrame(schema={"seed_id": pl.Utf8, "probe_pass_rate": pl.Float64, "probe_samples": pl.Int64})
    kept = problems.join(rates, on="seed_id", how="left")
    return StageResult("probe", kept, rows_to_rejects("probe", kept.clear(), []), StageCount("probe", problems.height, kept.height))


def direction(pass_rate: float | None) -> str | None:
    """``harder`` for a problem always solved, ``simpler`` for one never solved, else None."""
    if pass_rate is None:
        return None
    return "harder" if pass_rate >= 1.0 else "simpler" if pass_rate <= 0.0 else None


def variant_requests(problems: pl.DataFrame, *, run_seed: int) -> list[dict[str, Any]]:
    """One rewrite request per targeted problem (pass rate 1 or 0), in row order."""
    requests = []
    for row in problems.iter_rows(named=True):
        way = direction(row["probe_pass_rate"])
        if way is None:
            continue
        template = load_template("difficulty", way)
        requests.append(
            {
                "seed_id": row["seed_id"],
                "direction": way,
                "template": template.id,
                "messages": [{"role": "user", "content": template.render(question=row["question"])}],
                "sampling_seed": derived_seed(run_seed, row["seed_id"], way),
            }
        )
    return requests


def retarget(problems: pl.DataFrame, requests: list[dict[str, Any]], results: list[dict[str, Any]], cfg: DifficultyConfig) -> StageResult:
    """Stage ``retarget``: each problem, then its variant (kept, or dropped with the reason;
    ``cfg.max_chars`` and ``cfg.max_similarity`` as in Evol-Instruct)."""
    answered = {r["seed_id"]: (r, res) for r, res in zip(requests, results, strict=True)}
    originals = problems.with_columns(pl.lit(None, dtype=pl.Utf8).alias("variant_of"), pl.lit(None, dtype=pl.Utf8).alias("variant_direction"), pl.lit(None, dtype=pl.Utf8).alias("variant_template"))
    variants, reasons, details = [], [], []
    for row in problems.iter_rows(named=True):
        request, result = answered.get(row["seed_id"], (None, None))
        text = parse_task(result.get("completion")) if result else ""
        variant = {
            **row,
            "seed_id": f"{row['seed_id']}.{request['direction']}" if request else f"{row['seed_id']}.variant",
            "question": text,
            "reference_answer": None,  # a new problem: the ensemble's agreement gives it an answer
            "probe_pass_rate": None,
            "probe_samples": None,
            "variant_of": row["seed_id"],
            "variant_direction": request["direction"] if request else None,
            "variant_template": request["template"] if request else None,
        }
        if request is None:
            reason, detail = "not_targeted", f"probe pass rate {row['probe_pass_rate']}"
        elif result.get("error"):
            reason, detail = "generation_error", result["error"]
        else:
            reason, detail = elimination_reason(row["question"], text, max_chars=cfg.max_chars, max_similarity=cfg.max_similarity), None
        variants.append(variant)
        reasons.append(reason)
        details.append(detail)
    frame = pl.DataFrame(variants, schema=originals.schema) if variants else originals.clear()
    failed = pl.Series([r is not None for r in reasons], dtype=pl.Boolean)
    dropped = [(r, d) for r, d in zip(reasons, details, strict=True) if r is not None]
    rejects = rows_to_rejects("retarget", frame.filter(failed), [r for r, _ in dropped], [d for _, d in dropped])
    kept = pl.concat([originals, frame.filter(~failed)])
    count = StageCount("retarget", problems.height, kept.height, 2, dict(Counter(r for r, _ in dropped))).check()
    return StageResult("retarget", kept, rejects, count)


def label(samples: pl.DataFrame, cfg: DifficultyConfig, *, verdicts: pl.DataFrame | None = None) -> pl.DataFrame:
    """``pass_rate`` and ``difficulty`` (``easy`` at ``cfg.easy_at`` or more, ``hard`` at
    ``cfg.hard_at`` or less) on every sample. The pass rate is over the problem's
    ``verdicts`` (``seed_id``, ``correct``: every verified sample, also those verify dropped),
    or over ``samples`` themselves when none are given."""
    if samples.height == 0:
        return samples
    verdicts = samples if verdicts is None else verdicts
    rates = verdicts.filter(pl.col("correct").is_not_null()).group_by("seed_id").agg(pl.col("correct").cast(pl.Float64).mean().alias("pass_rate"))
    labelled = samples.join(rates, on="seed_id", how="left")
    return labelled.with_columns(
        pl.when(pl.col("pass_rate").is_null())
        .then(pl.lit(None, dtype=pl.Utf8))
        .when(pl.col("pass_rate") >= cfg.easy_at)
        .then(pl.lit("easy"))
        .when(pl.col("pass_rate") <= cfg.hard_at)
        .then(pl.lit("hard"))
        .otherwise(pl.lit("medium"))
        .alias("difficulty")
    )
