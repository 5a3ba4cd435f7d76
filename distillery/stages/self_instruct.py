"""Self-Instruct (Wang et al. 2023) and Ensemble-Instruct (Lee et al. 2023): new tasks from a
small seed pool, kept only if they are new enough, and (optionally) only if several sampling
configurations agree on their answer.

Two steps, plain functions around whatever generates text:

1. ``self-instruct``: each seed asks for ``per_seed`` new tasks; each request shows the model
   ``examples`` tasks of the pool (that seed first, the others drawn by a seeded hash) through the
   versioned template ``self_instruct/new_task.j2``. A new task is dropped with its reason:
   ``generation_error``, ``empty``, ``too_short``, ``too_long``, or ``too_similar`` (ROUGE-L F1,
   Google's ``rouge-score``, of ``max_similarity`` or more against a pool task or a new task
   kept before it; Self-Instruct used 0.7). Rows: ``seed_id`` ``<seed>.si<k>``, ``parent_id`` the
   seed, ``si_examples`` (the pool tasks shown), ``si_template``, ``nearest_id`` and ``rouge_l``.
2. ``agreement`` (Ensemble-Instruct's consensus, with ``members`` sampling configurations): each
   member solves each new task (``self_instruct/solve.j2``); a task is kept only if at least
   ``min_agreement`` members' final answers are equal (math-verify), and that answer becomes its
   ``reference_answer`` (and ``member_agreement`` the share that agreed), so verify can check the samples later. Dropped: ``no_answer`` (no member
   gave one with a number in it), ``no_agreement``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import polars as pl

from distillery.accounting import StageResult
from distillery.prompts import load_template
from distillery.stages.synthesize import derived_seed
from distillery.stages.verify import answers_match, extract_answer, normalize_answer
from schemas.recipe import DifficultyConfig, SelfInstructConfig

NEW_TASK = ("self_instruct", "new_task")
SOLVE = ("self_instruct", "solve")
_LABELS = ("problem", "task", "question", "new problem", "harder problem", "simpler problem")


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (rouge-score's tokenizer: lower-cased words)."""
    return _scorer().score(a, b)["rougeL"].fmeasure


def task_requests(pool: pl.DataFrame, cfg: SelfInstructConfig, *, run_seed: int) -> list[dict[str, Any]]:
    """``cfg.per_seed`` requests per pool row, in pool order; each shows ``cfg.examples`` pool
    tasks: the row's own first, then others picked by a seeded hash (the same on a rerun)."""
    per_seed, examples = cfg.per_seed, cfg.examples
    template = load_template(*NEW_TASK)
    ids, texts = pool["seed_id"].to_list(), pool["question"].to_list()
    requests = []
    for i, seed_id in enumerate(ids):
        for k in range(per_seed):
            others = sorted((j for j in range(len(ids)) if j != i), key=lambda j: derived_seed(run_seed, seed_id, k, ids[j]))
            shown = [i, *others[: max(0, examples - 1)]]
            requests.append(
                {
                    "seed_id": seed_id,
                    "task_index": k,
                    "examples": [ids[j] for j in shown],
                    "template": template.id,
                    "messages": [{"role": "user", "content": template.render(tasks=[texts[j] for j in shown])}],
                    "sampling_seed": derived_seed(run_seed, seed_id, "self-instruct", k),
                }
            )
    return requests


def parse_task(text: str | None) -> str:
    """The new task: the first paragraph, without a leading "Problem 4:" label."""
    text = (text or "").strip()
    head, sep, rest = text.partition(":")
    if sep and head.strip().lower().rstrip("0123456789 ").strip() in _LABELS:
        text = rest.strip()
    return text.split("\n\n", 1)[0].strip()


def text_problem(result: dict[str, Any], text: str, *, min_chars: int, max_chars: int) -> str | None:
    """Why a model's new text cannot be used at all (``generation_error``, ``empty``,
    ``too_short``, ``too_long``), or None."""
    if result.get("error"):
        return "generation_error"
    if not text:
        return "empty"
    if len(text) < min_chars:
        return "too_short"
    return "too_long" if len(text) > max_chars else None


def new_tasks(pool: pl.DataFrame, requests: list[dict[str, Any]], results: list[dict[str, Any]], cfg: SelfInstructConfig) -> StageResult:
    """Stage ``self-instruct``: the pool fans out ``cfg.per_seed`` requests per row; each new task
    is kept or dropped with its reason (``cfg.min_chars``, ``cfg.max_chars``,
    ``cfg.max_similarity``), in request order (so "kept before it" is well defined)."""
    per_seed, min_chars, max_chars, max_similarity = cfg.per_seed, cfg.min_chars, cfg.max_chars, cfg.max_similarity
    if len(requests) != len(results) or len(requests) != pool.height * per_seed:
        msg = f"self-instruct: {pool.height} seeds x {per_seed}, {len(requests)} requests, {len(results)} results"
        raise RuntimeError(msg)
    compared = list(zip(pool["seed_id"].to_list(), pool["question"].to_list(), strict=True))  # the pool, then kept tasks
    rows, reasons, details = [], [], []
    for request, result in zip(requests, results, strict=True):
        task = parse_task(result.get("completion"))
        nearest, score = max(((sid, rouge_l(text, task)) for sid, text in compared), key=lambda p: p[1], default=(None, 0.0)) if task else (None, 0.0)
        reason = text_problem(result, task, min_chars=min_chars, max_chars=max_chars) or ("too_similar" if score >= max_similarity else None)
        row_id = f"{request['seed_id']}.si{request['task_index']}"
        rows.append(
            {
                "seed_id": row_id,
                "question": task,
                "reference_answer": None,
                "source": "self-instruct",  # a new task: the model wrote it
                "parent_id": request["seed_id"],
                "si_examples": request["examples"],
                "si_template": request["template"],
                "nearest_id": nearest,
                "rouge_l": round(score, 4),
            }
        )
        reasons.append(reason)
        details.append(result.get("error") or (f"ROUGE-L {score:.2f} with {nearest}" if reason == "too_similar" else None))
        if reason is None:
            compared.append((row_id, task))
    frame = pl.DataFrame(rows, schema_overrides={"reference_answer": pl.Utf8, "nearest_id": pl.Utf8, "rouge_l": pl.Float64})
    return StageResult.from_reasons("self-instruct", frame, reasons, details, rows_in=pool.height, fanout=per_seed)


def solve_requests(tasks: pl.DataFrame, cfg: SelfInstructConfig | DifficultyConfig, *, run_seed: int) -> list[list[dict[str, Any]]]:
    """Per member of ``cfg.members``, one request per task (the member's sampling settings go
    with its batch)."""
    template = load_template(*SOLVE)
    return [
        [
            {
                "seed_id": row["seed_id"],
                "template": template.id,
                "messages": [{"role": "user", "content": template.render(question=row["question"])}],
                "sampling_seed": derived_seed(run_seed, row["seed_id"], "agreement", m),
            }
            for row in tasks.iter_rows(named=True)
        ]
        for m in range(len(cfg.members))
    ]


def consensus(answers: list[str | None]) -> tuple[str | None, int]:
    """The answer most members gave (math-verify equivalence) and how many gave it."""
    groups: list[list[str]] = []
    for answer in (a for a in answers if a):
        for group in groups:
            if answers_match(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None, 0
    best = max(groups, key=len)  # ties: the first answer given
    return best[0], len(best)


def agreement(tasks: pl.DataFrame, results_by_member: list[list[dict[str, Any]]], cfg: SelfInstructConfig | DifficultyConfig) -> StageResult:
    """Stage ``agreement``: keep a task when ``cfg.min_agreement`` members agree on its answer
    (the members are those of ``results_by_member``, one list of results per member)."""
    min_agreement = cfg.min_agreement
    members = len(results_by_member)
    rows, reasons, details = [], [], []
    for i, row in enumerate(tasks.iter_rows(named=True)):
        answers = []
        for results in results_by_member:
            extracted = extract_answer(results[i].get("completion") or "").text
            # an answer with no digit is the template echoed ("The answer is N"), not an answer
            answers.append(normalize_answer(extracted) if extracted and any(ch.isdigit() for ch in extracted) else None)
        answer, votes = consensus(answers)
        reason = "no_answer" if answer is None else ("no_agreement" if votes < min_agreement else None)
        rows.append({**row, "reference_answer": answer, "member_answers": answers, "member_agreement": round(votes / members, 4)})
        reasons.append(reason)
        details.append(f"{votes} of {members} members agree on {answer!r}; answers {answers}" if reason else None)
    frame = pl.DataFrame(rows, schema_overrides={"reference_answer": pl.Utf8, "member_answers": pl.List(pl.Utf8), "member_agreement": pl.Float64})
    return StageResult.from_reasons("agreement", frame, reasons, details, rows_in=tasks.height)
