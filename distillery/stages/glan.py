"""Taxonomy-driven generation (GLAN, Li et al. 2024, "Synthetic Data (Almost) from Scratch"):
a taxonomy (field -> disciplines -> subjects -> key concepts) is expanded by the model into a
syllabus per subject (class sessions), and each session into homework problems.

Plain functions around whatever generates text:

- ``ingest_taxonomy``: the taxonomy YAML -> one row per subject (stage ``ingest``); a bad file is
  an error that names the node.
- ``syllabus``: stage ``syllabus``, fan-out ``sessions`` per subject. The model lists sessions
  (``glan/syllabus.j2``); the first ``sessions`` distinct lines are kept, and the sessions it did
  not list are dropped as ``short_syllabus`` (all of them as ``generation_error`` if it failed).
- ``questions``: stage ``questions``, fan-out ``per_session``. One problem per request
  (``glan/question.j2``); dropped: ``generation_error``, ``empty``, ``too_short``, ``too_long``,
  ``duplicate`` (the same text as a problem kept before it).
- ``coverage``: per taxonomy node (discipline, subject), the sessions, problems and published
  samples that came from it, for the manifest and the data card.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from distillery.accounting import StageCount, StageResult, rows_to_rejects
from distillery.prompts import load_template
from distillery.stages.self_instruct import parse_task, text_problem
from distillery.stages.synthesize import derived_seed
from schemas.recipe import GlanConfig, YamlRefused, load_yaml

_ITEM = re.compile(r"^\s*(?:[-*•]|\(?\d+[.):])\s*")


class TaxonomyError(ValueError):
    """A taxonomy file that cannot be used; the message names the node."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _name(node: Any, where: str) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("name"), str) or not node["name"].strip():
        raise TaxonomyError(f"{where}: expected a mapping with a non-empty 'name'")
    return node["name"].strip()


def load_taxonomy(data: bytes, uri: str) -> list[dict[str, Any]]:
    """One dict per subject: field, discipline, subject, concepts (a list of strings)."""
    try:
        tree = load_yaml(data, max_values=1_000_000)  # bounded like a recipe: no alias bomb, no endless nesting
    except YamlRefused as err:
        raise TaxonomyError(f"{uri}: refused: {err}") from None
    except yaml.YAMLError as err:
        raise TaxonomyError(f"{uri}: not valid YAML: {err}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("field"), str):
        raise TaxonomyError(f"{uri}: expected a mapping with 'field' (a name) and 'disciplines' (a list)")
    if not isinstance(tree.get("disciplines"), list) or not tree["disciplines"]:
        raise TaxonomyError(f"{uri}: 'disciplines' must be a non-empty list")
    subjects = []
    for i, discipline in enumerate(tree["disciplines"]):
        d_name = _name(discipline, f"{uri}: disciplines[{i}]")
        if not isinstance(discipline.get("subjects"), list) or not discipline["subjects"]:
            raise TaxonomyError(f"{uri}: disciplines[{i}] ({d_name}): 'subjects' must be a non-empty list")
        for j, subject in enumerate(discipline["subjects"]):
            where = f"{uri}: disciplines[{i}].subjects[{j}]"
            s_name = _name(subject, where)
            concepts = subject.get("concepts")
            if not isinstance(concepts, list) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
                raise TaxonomyError(f"{where} ({s_name}): 'concepts' must be a non-empty list of strings")
            subjects.append({"field": tree["field"].strip(), "discipline": d_name, "subject": s_name, "concepts": [c.strip() for c in concepts]})
    return subjects


def ingest_taxonomy(path: str, data: bytes | None = None) -> StageResult:
    """The taxonomy's subjects as rows (``seed_id`` ``field/discipline/subject``, slugged)."""
    from distillery.uri_io import read_bytes

    data = read_bytes(path) if data is None else data
    subjects = load_taxonomy(data, path)
    rows = [
        {
            "seed_id": "/".join(_slug(s[k]) for k in ("field", "discipline", "subject")),
            "question": s["subject"],
            "reference_answer": None,
            "source": f"taxonomy:{Path(path).name}",
            **s,
        }
        for s in subjects
    ]
    ids = Counter(r["seed_id"] for r in rows)
    if repeats := [i for i, n in ids.items() if n > 1]:
        raise TaxonomyError(f"{path}: subjects repeat: {', '.join(repeats)}")
    frame = pl.DataFrame(rows, schema_overrides={"reference_answer": pl.Utf8, "concepts": pl.List(pl.Utf8)})
    parent = {"uri": path, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    return StageResult("ingest", frame, rows_to_rejects("ingest", frame.clear(), []), StageCount("ingest", len(rows), len(rows)), meta={"parent": parent})


def syllabus_requests(subjects: pl.DataFrame, cfg: GlanConfig, *, run_seed: int) -> list[dict[str, Any]]:
    """One request per subject for a syllabus of ``cfg.sessions`` sessions."""
    template = load_template("glan", "syllabus")
    return [
        {
            "seed_id": row["seed_id"],
            "template": template.id,
            "messages": [{"role": "user", "content": template.render(sessions=cfg.sessions, **{k: row[k] for k in ("field", "discipline", "subject", "concepts")})}],
            "sampling_seed": derived_seed(run_seed, row["seed_id"], "syllabus"),
        }
        for row in subjects.iter_rows(named=True)
    ]


def syllabus_constraint(sessions: int) -> str:
    """The structured-output spec that holds a syllabus to ``sessions`` numbered lines ("1. ...",
    each at least 3 characters). Unbounded line lengths: bounded ones ({3,200}) made xgrammar's
    compile time explode past vLLM's 5 s limit."""
    return json.dumps({"regex": "".join(rf"{k}\. [^\n]{{3}}[^\n]*\n" for k in range(1, sessions)) + rf"{sessions}\. [^\n]{{3}}[^\n]*\n?"})


def parse_syllabus(text: str | None, limit: int) -> list[str]:
    """The first ``limit`` distinct list items (numbered or bulleted lines) of a syllabus."""
    sessions: list[str] = []
    for line in (text or "").splitlines():
        if not _ITEM.match(line):
            continue
        item = _ITEM.sub("", line).strip().strip("*").strip()
        if item and item.lower() not in {s.lower() for s in sessions}:
            sessions.append(item)
        if len(sessions) == limit:
            break
    return sessions


def syllabus(subjects: pl.DataFrame, requests: list[dict[str, Any]], results: list[dict[str, Any]], cfg: GlanConfig) -> StageResult:
    """Stage ``syllabus``: ``cfg.sessions`` rows per subject, the unlisted ones dropped."""
    sessions = cfg.sessions
    kept_rows, dropped_rows, reasons, details = [], [], [], []
    for subject, request, result in zip(subjects.iter_rows(named=True), requests, results, strict=True):
        listed = [] if result.get("error") else parse_syllabus(result.get("completion"), sessions)
        base = {k: subject[k] for k in ("field", "discipline", "subject", "concepts", "source")}
        for k in range(sessions):
            row = {"seed_id": f"{subject['seed_id']}/s{k}", "session": listed[k] if k < len(listed) else None, "subject_id": subject["seed_id"], "syllabus_template": request["template"], **base}
            if k < len(listed):
                kept_rows.append(row)
                continue
            dropped_rows.append(row)
            reasons.append("generation_error" if result.get("error") else "short_syllabus")
            details.append(result.get("error") or f"the syllabus listed {len(listed)} of {sessions} sessions")
    schema = {"session": pl.Utf8, "concepts": pl.List(pl.Utf8)}
    kept = pl.DataFrame(kept_rows, schema_overrides=schema) if kept_rows else pl.DataFrame()
    dropped = pl.DataFrame(dropped_rows, schema_overrides=schema) if dropped_rows else pl.DataFrame()
    rejects = rows_to_rejects("syllabus", dropped, reasons, details)
    count = StageCount("syllabus", subjects.height, len(kept_rows), sessions, dict(Counter(reasons))).check()
    return StageResult("syllabus", kept, rejects, count)


def question_requests(sessions: pl.DataFrame, cfg: GlanConfig, *, run_seed: int) -> list[dict[str, Any]]:
    """``cfg.per_session`` requests per session, one problem each."""
    template = load_template("glan", "question")
    return [
        {
            "seed_id": row["seed_id"],
            "question_index": k,
            "template": template.id,
            "messages": [{"role": "user", "content": template.render(**{c: row[c] for c in ("field", "discipline", "subject", "session")})}],
            "sampling_seed": derived_seed(run_seed, row["seed_id"], "question", k),
        }
        for row in sessions.iter_rows(named=True)
        for k in range(cfg.per_session)
    ]


def questions(sessions: pl.DataFrame, requests: list[dict[str, Any]], results: list[dict[str, Any]], cfg: GlanConfig) -> StageResult:
    """Stage ``questions``: ``cfg.per_session`` problems per session, each kept or dropped with its
    reason (``cfg.min_chars`` and ``cfg.max_chars`` bound a problem's length)."""
    by_id = {row["seed_id"]: row for row in sessions.iter_rows(named=True)}
    rows, reasons, details, seen = [], [], [], {}
    for request, result in zip(requests, results, strict=True):
        session = by_id[request["seed_id"]]
        text = parse_task(result.get("completion"))
        key = " ".join(text.lower().split())
        row_id = f"{session['seed_id']}/q{request['question_index']}"
        reason = text_problem(result, text, min_chars=cfg.min_chars, max_chars=cfg.max_chars) or ("duplicate" if key in seen else None)
        if reason is None:
            seen[key] = row_id
        rows.append(
            {
                "seed_id": row_id,
                "question": text,
                "reference_answer": None,
                "source": session["source"],
                "parent_id": session["seed_id"],
                **{c: session[c] for c in ("field", "discipline", "subject", "session", "subject_id", "syllabus_template")},
                "question_template": request["template"],
            }
        )
        reasons.append(reason)
        details.append(result.get("error") or (f"the same as {seen[key]}" if reason == "duplicate" else None))
    frame = pl.DataFrame(rows, schema_overrides={"reference_answer": pl.Utf8})
    return StageResult.from_reasons("questions", frame, reasons, details, rows_in=sessions.height, fanout=cfg.per_session)


def coverage(subjects: pl.DataFrame, sessions: pl.DataFrame, problems: pl.DataFrame, published: pl.DataFrame | Counter) -> dict[str, dict[str, Any]]:
    """Per taxonomy node (``discipline`` and ``discipline/subject``): sessions in the syllabus,
    problems kept, and published samples (``published`` rows have ``subject_id``; or their
    count per ``subject_id``)."""

    def counts(frame: pl.DataFrame, column: str = "subject_id") -> Counter:
        return Counter(frame[column].to_list()) if frame.height and column in frame.columns else Counter()

    n_sessions, n_problems = counts(sessions), counts(problems)
    n_published = published if isinstance(published, Counter) else counts(published)
    nodes: dict[str, dict[str, Any]] = {}
    for row in subjects.iter_rows(named=True):
        subject_id = row["seed_id"]
        entry = {"sessions": n_sessions[subject_id], "problems": n_problems[subject_id], "published_samples": n_published[subject_id]}
        nodes[f"{row['discipline']}/{row['subject']}"] = {"level": "subject", **entry, "concepts": len(row["concepts"])}
        parent = nodes.setdefault(row["discipline"], {"level": "discipline", "sessions": 0, "problems": 0, "published_samples": 0, "subjects": 0})
        for k, v in entry.items():
            parent[k] += v
        parent["subjects"] += 1
    for node in nodes.values():
        node["covered"] = node["published_samples"] > 0
    return dict(sorted(nodes.items()))
