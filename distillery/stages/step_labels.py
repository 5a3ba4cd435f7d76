"""Step labels (process supervision): which steps of a solution still lead to the reference.

A solution is split into steps (paragraphs, else lines). From the prefix of its first ``i``
steps, ``rollouts`` continuations are sampled on the engines (the prefix starts the assistant's
turn, as the judge's "Score:" does, and the model goes on from it) and verified against the
reference: the step's soft label is the share of continuations that reach it (Math-Shepherd's
Monte-Carlo estimate), its hard label whether any does. The last step's label is the
solution's own verdict (nothing is left to continue).

Two methods (``process_supervision.method``):

- ``per_step``: every prefix but the last is rolled out: ``(steps - 1) * rollouts`` continuations.
- ``binary_search`` (OmegaPRM): the first wrong step of a wrong solution, assuming a step after
  a wrong one is wrong too: ``O(log steps)`` prefixes. A correct solution needs none (each of
  its prefixes leads to the reference: the solution itself continues it). Steps before the first
  wrong one are labelled true, it and those after false; soft labels are recorded for the
  prefixes that were rolled out, null for the others.

Rollouts go through the run's generator (the generation cache included). Rows that cannot be
labelled are rejects with their reason: ``no_reference``, ``too_many_steps``,
``rollout_error`` (every continuation of a prefix failed to generate).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from distillery.stages.synthesize import build_messages, derived_seed
from distillery.stages.verify import extract_answer, judge_many
from schemas.recipe import GenerationConfig, ProcessSupervisionConfig, VerifyConfig

STAGE = "step_label"
_DETAILS = {
    "no_reference": "no reference answer (or no verdict) to verify continuations against",
    "too_many_steps": "more steps than process_supervision.max_steps",
    "no_steps": "an empty solution",
    "rollout_error": "every continuation of a prefix failed to generate",
}
_PARAGRAPHS = re.compile(r"\n\s*\n")

SCHEMA = {
    "sample_id": pl.Utf8,
    "seed_id": pl.Utf8,
    "prompt": pl.Utf8,
    "completions": pl.List(pl.Utf8),
    "labels": pl.List(pl.Boolean),
    "soft_labels": pl.List(pl.Float64),
    "first_wrong_step": pl.Int64,
    "correct": pl.Boolean,
    "reference_answer": pl.Utf8,
    "method": pl.Utf8,
    "rollouts": pl.Int64,
}

# generate(requests) -> one result per request (completion, error, ...), in order
Rollout = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def split_steps(text: str) -> list[str]:
    """The steps of a solution: its paragraphs when it has several, else its non-empty lines."""
    paragraphs = [p.strip() for p in _PARAGRAPHS.split(text or "") if p.strip()]
    if len(paragraphs) > 1:
        return paragraphs
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def step_prefix(steps: list[str], i: int) -> str:
    """What the assistant's turn starts with to continue after step ``i`` (1-based)."""
    return "\n".join(steps[:i]) + "\n"


class _Solution:
    def __init__(self, row: dict, steps: list[str]) -> None:
        self.row, self.steps = row, steps
        self.soft: list[float | None] = [None] * len(steps)
        self.soft[-1] = 1.0 if row["correct"] else 0.0
        self.rollouts = 0
        self.failed = False
        self.lo, self.hi = 1, len(steps)  # binary search: the first wrong step is in [lo, hi]


def _probe(solutions: list[tuple[_Solution, int]], cfg: ProcessSupervisionConfig, gen: GenerationConfig, verify: VerifyConfig, rollout: Rollout, seed: int) -> None:
    """Roll out ``cfg.rollouts`` continuations of each (solution, prefix length) and record the
    share that reaches the reference as that step's soft label."""
    requests = []
    for solution, i in solutions:
        messages = build_messages(solution.row["question"], gen)
        prefix = step_prefix(solution.steps, i)
        for j in range(cfg.rollouts):
            requests.append({
                "seed_id": solution.row["seed_id"],
                "messages": messages,
                "response_prefix": prefix,
                "sampling_seed": derived_seed(seed, solution.row["sample_id"], "step", i, j),
            })
    results = rollout(requests) if requests else []
    if len(results) != len(requests):
        msg = f"{STAGE}: {len(results)} results for {len(requests)} rollouts"
        raise RuntimeError(msg)
    items, errors = [], []
    for request, result in zip(requests, results, strict=True):
        text = request["response_prefix"] + (result.get("completion") or "")
        errors.append(result.get("error") is not None)
        items.append((extract_answer(text, fallback_last_number=verify.fallback_last_number), None))
    k = cfg.rollouts
    for n, (solution, i) in enumerate(solutions):
        reference = solution.row["reference_answer"]
        block = slice(n * k, (n + 1) * k)
        verdicts = judge_many([(ex, reference) for ex, _ in items[block]], timeout_s=verify.timeout_s)
        ok = [v for (v, _), err in zip(verdicts, errors[block], strict=True) if not err]
        solution.rollouts += k
        if not ok:  # every continuation failed to generate: no label to give
            solution.failed = True
            continue
        solution.soft[i - 1] = sum(bool(v) for v in ok) / len(ok)


def label_steps(rows: pl.DataFrame, cfg: ProcessSupervisionConfig, gen: GenerationConfig, verify: VerifyConfig, rollout: Rollout, *, seed: int) -> StageResult:
    """Step-labelled solutions of verified samples (``question``, ``completion``,
    ``reference_answer``, ``correct``), by ``cfg.method``; see the module docstring."""
    solutions: list[_Solution] = []
    reasons: dict[str, str] = {}
    for row in rows.iter_rows(named=True):
        steps = split_steps(row["completion"])
        if row.get("reference_answer") is None or row.get("correct") is None:
            reasons[row["sample_id"]] = "no_reference"
        elif len(steps) > cfg.max_steps:
            reasons[row["sample_id"]] = "too_many_steps"
        elif not steps:
            reasons[row["sample_id"]] = "no_steps"
        else:
            solutions.append(_Solution(row, steps))

    if cfg.method == "per_step":
        _probe([(s, i) for s in solutions for i in range(1, len(s.steps))], cfg, gen, verify, rollout, seed)
    else:  # binary search, all wrong solutions' probes of a round in one batch
        while True:
            wanted = [s for s in solutions if not s.row["correct"] and not s.failed and s.lo < s.hi]
            if not wanted:
                break
            probes = [(s, (s.lo + s.hi) // 2) for s in wanted]
            _probe(probes, cfg, gen, verify, rollout, seed)
            for s, mid in probes:
                if s.failed:
                    continue
                if s.soft[mid - 1]:  # some continuation reached the reference: the wrong step is later
                    s.lo = mid + 1
                else:
                    s.hi = mid

    out: dict[str, list] = {name: [] for name in SCHEMA}
    for s in solutions:
        if s.failed:
            reasons[s.row["sample_id"]] = "rollout_error"
            continue
        n = len(s.steps)
        if cfg.method == "per_step":
            labels = [bool(v) for v in s.soft]
            first = next((i + 1 for i, ok in enumerate(labels) if not ok), None)
        else:
            first = None if s.row["correct"] else s.lo
            labels = [first is None or i + 1 < first for i in range(n)]
        out["sample_id"].append(s.row["sample_id"])
        out["seed_id"].append(s.row["seed_id"])
        out["prompt"].append(s.row["question"])
        out["completions"].append(s.steps)
        out["labels"].append(labels)
        out["soft_labels"].append(s.soft)
        out["first_wrong_step"].append(first)
        out["correct"].append(bool(s.row["correct"]))
        out["reference_answer"].append(s.row["reference_answer"])
        out["method"].append(cfg.method)
        out["rollouts"].append(s.rollouts)
    ids = rows["sample_id"].to_list() if rows.height else []
    why = [reasons.get(i) for i in ids]
    result = StageResult.from_reasons(STAGE, rows, why, [_DETAILS.get(r) if r else None for r in why], rows_in=rows.height)
    result.kept = pl.DataFrame(out, schema=SCHEMA)  # the labelled solutions, in the order of their samples
    return result
