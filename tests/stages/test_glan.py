"""GLAN's stage functions: the taxonomy (and its errors, naming the node), syllabi and problems
with their accounting (planted short syllabi, duplicates and failures), and coverage per node."""

import json

import polars as pl
import pytest

from distillery.prompts import load_template
from distillery.stages.glan import (
    TaxonomyError,
    coverage,
    ingest_taxonomy,
    parse_syllabus,
    question_requests,
    questions,
    syllabus,
    syllabus_requests,
)
from schemas.recipe import GlanConfig

TAXONOMY = b"""
field: Mathematics
disciplines:
  - name: Arithmetic
    subjects:
      - {name: Fractions, concepts: [adding fractions, comparing fractions]}
      - {name: Percentages, concepts: [percent of a number]}
  - name: Geometry
    subjects:
      - {name: Area, concepts: [rectangles, triangles]}
"""


def _r(text, error=None):
    return {"completion": text, "finish_reason": "stop", "num_tokens": 10, "error": error}


def test_taxonomy_rows_and_errors_that_name_the_node():
    subjects = ingest_taxonomy("tax.yaml", TAXONOMY)
    assert subjects.kept["seed_id"].to_list() == ["mathematics/arithmetic/fractions", "mathematics/arithmetic/percentages", "mathematics/geometry/area"]
    assert subjects.kept["concepts"][0].to_list() == ["adding fractions", "comparing fractions"]
    assert subjects.count.rows_in == 3 and subjects.meta["parent"]["rows"] == 3
    with pytest.raises(TaxonomyError, match=r"disciplines\[1\]\.subjects\[0\] \(Area\): 'concepts' must be a non-empty list"):
        ingest_taxonomy("tax.yaml", TAXONOMY.replace(b"[rectangles, triangles]", b"[]"))
    with pytest.raises(TaxonomyError, match=r"disciplines\[0\]: expected a mapping with a non-empty 'name'"):
        ingest_taxonomy("tax.yaml", TAXONOMY.replace(b"- name: Arithmetic", b"- title: Arithmetic"))
    with pytest.raises(TaxonomyError, match="'disciplines' must be a non-empty list"):
        ingest_taxonomy("tax.yaml", b"field: Mathematics\n")


def test_syllabus_keeps_listed_sessions_and_drops_the_rest_with_a_reason():
    assert parse_syllabus("Syllabus:\n1. Halves and quarters\n2) Adding fractions\n- Adding fractions\n* Review", 3) == ["Halves and quarters", "Adding fractions", "Review"]
    subjects = ingest_taxonomy("tax.yaml", TAXONOMY).kept
    requests = syllabus_requests(subjects, GlanConfig(sessions=3), run_seed=0)
    assert "adding fractions, comparing fractions" in requests[0]["messages"][0]["content"]
    assert requests[0]["template"] == load_template("glan", "syllabus").id
    results = [_r("1. Halves\n2. Adding fractions\n3. Comparing fractions\n4. Extra"), _r("1. Percent basics"), _r(None, error="EngineDeadError: x")]
    out = syllabus(subjects, requests, results, GlanConfig(sessions=3))
    assert out.count.as_dict() == {"stage": "syllabus", "rows_in": 3, "rows_out": 4, "fanout": 3, "dropped": {"generation_error": 3, "short_syllabus": 2}}
    assert out.kept["session"].to_list() == ["Halves", "Adding fractions", "Comparing fractions", "Percent basics"]
    short = out.rejects.filter(pl.col("reason") == "short_syllabus")
    assert short["detail"].to_list() == ["the syllabus listed 1 of 3 sessions"] * 2


def test_questions_and_coverage():
    subjects = ingest_taxonomy("tax.yaml", TAXONOMY).kept
    cfg = GlanConfig(sessions=1, per_session=2)
    sessions = syllabus(subjects, syllabus_requests(subjects, cfg, run_seed=0), [_r("1. Halves"), _r("1. Percent basics"), _r("")], cfg)
    requests = question_requests(sessions.kept, cfg, run_seed=0)
    assert len(requests) == 4 and "Halves" in requests[0]["messages"][0]["content"]
    problem = "Mia cuts a pizza into 8 slices and eats half of them. How many slices does she eat?"
    results = [_r(f"Problem: {problem}"), _r(problem), _r("A shirt costs 40 dollars and is 25% off. What is the price now?"), _r("ok")]
    out = questions(sessions.kept, requests, results, cfg)
    assert out.count.as_dict() == {"stage": "questions", "rows_in": 2, "rows_out": 2, "fanout": 2, "dropped": {"duplicate": 1, "too_short": 1}}
    dup = out.rejects.filter(pl.col("reason") == "duplicate")
    assert dup["detail"][0] == f"the same as {out.kept['seed_id'][0]}"
    assert json.loads(dup["record"][0])["subject"] == "Fractions"
    published = pl.DataFrame({"subject_id": [out.kept["subject_id"][0]] * 3})
    nodes = coverage(subjects, sessions.kept, out.kept, published)
    assert nodes["Arithmetic/Fractions"] == {"level": "subject", "sessions": 1, "problems": 1, "published_samples": 3, "concepts": 2, "covered": True}
    assert nodes["Arithmetic"]["problems"] == 2 and nodes["Arithmetic"]["subjects"] == 2 and nodes["Arithmetic"]["covered"]
    assert nodes["Geometry/Area"]["sessions"] == 0 and not nodes["Geometry"]["covered"]
