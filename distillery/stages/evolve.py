"""Evolve (Evol-Instruct, Xu et al. 2023, "WizardLM"): rewrite seed instructions into harder ones
(in depth: add constraints, deepen, concretize, more reasoning steps) or into new ones of the
same domain (in breadth), round after round, and eliminate the evolutions that failed.

Plain functions around whatever generates text, like the synthesize stage:
``evolution_requests`` renders one rewrite request per instruction (the operation picked by a
seeded hash, so a rerun picks the same), and ``evolve_round`` turns the engine's results into the
next generation of instructions, each with its evolution chain, and the eliminated ones into
rejects with the reason:

- ``generation_error`` / ``empty``: the engine failed or wrote nothing;
- ``copied_prompt``: the rewrite repeats the template's own words ("#Rewritten Prompt#", "given prompt");
- ``unanswerable``: the rewrite is a refusal ("Sorry, I cannot ...");
- ``no_change``: the rewrite is the instruction again (word sequence similarity >= ``max_similarity``);
- ``too_long``: longer than ``max_chars``.

The templates are Jinja2 files in ``distillery/prompts/evol_instruct/``; each has a version (the
sha256 of its full text, parents included) that goes into every row's chain and into lineage.

The flow (``flows/synthesize.py``) runs ``evolve.rounds`` rounds on the generation engines
before sampling, one stage ``evolve-<round>`` per round in the manifest.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from distillery.prompts import load_template
from distillery.stages.synthesize import derived_seed
from schemas.recipe import EvolveConfig

DEPTH = ("add_constraints", "deepen", "concretize", "more_reasoning")
OPERATIONS = (*DEPTH, "breadth")
# Words of the templates themselves: a rewrite that contains them copied its instructions.
_COPIED = ("given prompt", "rewritten prompt", "created prompt", "#the given", "#rewritten", "#created")
_REFUSAL = re.compile(r"^\s*(i'?m sorry|sorry|i cannot|i can'?t|as an ai\b|i am unable|i'?m unable)", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(#*\s*(rewritten|created|new)\s+prompt\s*#*\s*:?)\s*", re.IGNORECASE)


def pick_operation(run_seed: int, seed_id: str, round_no: int, operations: tuple[str, ...] = OPERATIONS) -> str:
    """The operation for one instruction in one round: a seeded hash, the same on every rerun."""
    digest = hashlib.sha256(f"{run_seed}:{seed_id}:evolve:{round_no}".encode()).digest()
    return operations[int.from_bytes(digest[:4], "big") % len(operations)]


def evolution_requests(rows: pl.DataFrame, cfg: EvolveConfig, *, round_no: int, run_seed: int) -> list[dict[str, Any]]:
    """One rewrite request per instruction (``seed_id``, ``question``), in row order; the
    operation of each is picked among ``cfg.operations``."""
    operations = tuple(cfg.operations)
    requests = []
    for row in rows.iter_rows(named=True):
        operation = pick_operation(run_seed, row["seed_id"], round_no, operations)
        template = load_template("evol_instruct", operation)
        requests.append(
            {
                "seed_id": row["seed_id"],
                "operation": operation,
                "template": template.id,
                "messages": [{"role": "user", "content": template.render(question=row["question"])}],
                "sampling_seed": derived_seed(run_seed, row["seed_id"], "evolve-sample", round_no),
            }
        )
    return requests


def clean_evolved(text: str | None) -> str:
    """The rewrite without a leading label ("#Rewritten Prompt#:") or wrapping quotes."""
    text = (text or "").strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def similarity(a: str, b: str) -> float:
    """Word-sequence similarity in [0, 1] (difflib's ratio over lower-cased words)."""
    return difflib.SequenceMatcher(None, a.lower().split(), b.lower().split(), autojunk=False).ratio()


def elimination_reason(parent: str, child: str, *, max_chars: int, max_similarity: float) -> str | None:
    """Why an evolution failed, or None if it stands. ``child`` is already cleaned."""
    if not child:
        return "empty"
    lowered = child.lower()
    if any(marker in lowered for marker in _COPIED):
        return "copied_prompt"
    if _REFUSAL.match(child):
        return "unanswerable"
    if similarity(parent, child) >= max_similarity:
        return "no_change"
    if len(child) > max_chars:
        return "too_long"
    return None


def evolved_id(seed_id: str, round_no: int) -> str:
    return f"{seed_id}.e{round_no}"


def evolve_round(
    parents: pl.DataFrame, requests: list[dict[str, Any]], results: list[dict[str, Any]], cfg: EvolveConfig, *, round_no: int
) -> StageResult:
    """The next generation of instructions from one round's results (one per parent, in order);
    rewrites are eliminated by ``cfg.max_chars`` and ``cfg.max_similarity``.

    A kept row is a new instruction: ``seed_id`` ``<parent>.e<round>``, ``question`` the rewrite,
    no reference answer (a rewritten problem has a new answer), ``parent_id``, ``root_id``,
    ``evol_round``, ``evol_operation``, ``evol_template`` and ``evol_chain`` (the parent's chain
    plus this step: round, operation, template, the instruction it started from).
    """
    if len(requests) != parents.height or len(results) != parents.height:
        msg = f"evolve round {round_no}: {parents.height} instructions, {len(requests)} requests, {len(results)} results"
        raise RuntimeError(msg)
    rows, reasons, details = [], [], []
    for parent, request, result in zip(parents.iter_rows(named=True), requests, results, strict=True):
        child = clean_evolved(result.get("completion"))
        reason = "generation_error" if result.get("error") else elimination_reason(
            parent["question"], child, max_chars=cfg.max_chars, max_similarity=cfg.max_similarity
        )
        step = {"round": round_no, "operation": request["operation"], "template": request["template"], "from": parent["question"]}
        rows.append(
            {
                "seed_id": evolved_id(parent["seed_id"], round_no),
                "question": child,
                "reference_answer": None,
                "source": parent.get("source"),
                "parent_id": parent["seed_id"],
                "root_id": parent.get("root_id") or parent["seed_id"],
                "evol_round": round_no,
                "evol_operation": request["operation"],
                "evol_template": request["template"],
                "evol_chain": [*(parent.get("evol_chain") or []), step],
            }
        )
        reasons.append(reason)
        details.append(result.get("error") or (f"similarity {similarity(parent['question'], child):.2f}" if reason == "no_change" else None))
    frame = pl.DataFrame(rows, schema_overrides={"reference_answer": pl.Utf8, "source": pl.Utf8, "evol_round": pl.Int64})
    return StageResult.from_reasons(f"evolve-{round_no}", frame, reasons, details, rows_in=parents.height)  # one stage per round
