"""Taxonomy-driven generation (GLAN) end to end with the real CPU vLLM engine:
``distillery run recipes/glan.yaml``.

Planted cases: before the run, the test stores the engine's answers to some requests in the
generation cache (under the keys the run computes): a full syllabus for the first subject, a
one-session syllabus for the second (one session short), a problem for the first session and the
same problem for the second (a duplicate). The run must drop the missing session as
``short_syllabus`` and the copy as ``duplicate``, sample the problem, and report coverage per
taxonomy node in the manifest and the card. Every other request comes from the real engine. Slow.
"""

import json

import polars as pl
import pytest

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.glan import ingest_taxonomy, question_requests, syllabus, syllabus_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, Planter, check_stages, run_recipe

pytestmark = pytest.mark.slow
SETS = [
    "glan.sessions=2",
    "glan.per_session=1",
    "glan.syllabus_max_tokens=128",
    "glan.question_max_tokens=96",
    "generation.samples_per_problem=2",
    "generation.max_tokens=96",
    "quality.drop_truncated=false",
]
PROBLEM = "A class of 28 students splits into teams of 4. How many teams are there?"


def test_glan_recipe_end_to_end(tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / "recipes/glan.yaml", overrides=SETS)
    cfg, seed = recipe.glan, recipe.generation.seed
    plant = Planter(store, recipe).plant

    subjects = ingest_taxonomy(str(ROOT / cfg.taxonomy)).kept
    first, second = subjects["seed_id"][0], subjects["seed_id"][1]
    syllabi = syllabus_requests(subjects, sessions=cfg.sessions, run_seed=seed)
    outline = SamplingSettings(cfg.temperature, cfg.top_p, cfg.syllabus_max_tokens)
    plant(syllabi[0], outline, "1. Sharing equally: division\n2. Mixed operations: order of operations")
    plant(syllabi[1], outline, "1. Halves and quarters")
    planned = syllabus(subjects[:1], syllabi[:1], [{"completion": "1. Sharing equally: division\n2. Mixed operations: order of operations"}], sessions=cfg.sessions)
    ask = SamplingSettings(cfg.temperature, cfg.top_p, cfg.question_max_tokens)
    for request in question_requests(planned.kept, per_session=cfg.per_session, run_seed=seed):
        plant(request, ask, f"Problem: {PROBLEM}")  # both sessions: the second is a duplicate

    uri, manifest = run_recipe(tmp_path, "recipes/glan.yaml", store, SETS)

    stages = check_stages(manifest, ["ingest", "syllabus", "questions", "synthesize"])
    assert (stages[1]["rows_in"], stages[1]["fanout"]) == (subjects.height, 2) and stages[1]["dropped"]["short_syllabus"] >= 1

    rejects = pl.read_parquet(uri / "rejects")
    by_id = {r["seed_id"]: r for r in rejects.iter_rows(named=True)}
    assert by_id[f"{second}/s1"]["reason"] == "short_syllabus" and by_id[f"{second}/s1"]["stage"] == "syllabus"
    assert by_id[f"{first}/s1/q0"]["reason"] == "duplicate" and by_id[f"{first}/s1/q0"]["detail"] == f"the same as {first}/s0/q0"

    later = rejects.filter(~pl.col("stage").is_in(["ingest", "syllabus", "questions", "synthesize"]))
    data = pl.read_parquet(uri / "data")
    mine = data.filter(pl.col("seed_id") == f"{first}/s0/q0").to_dicts() + [r for r in map(json.loads, later["record"]) if r["seed_id"] == f"{first}/s0/q0"]
    assert len(mine) == 2
    for row in mine:
        assert row["question"] == PROBLEM and row["subject_id"] == first and row["discipline"] == "Arithmetic"
        assert row["session"] == "Sharing equally: division" and row["parent_id"] == f"{first}/s0"
        assert row["question_template"] == load_template("glan", "question").id

    nodes = manifest["stats"]["taxonomy_coverage"]
    subject_node = nodes["Arithmetic/Whole-number operations"]
    assert subject_node["sessions"] == 2 and subject_node["problems"] == 1
    assert subject_node["published_samples"] == data.filter(pl.col("subject_id") == first).height
    assert set(nodes) >= {"Arithmetic", "Applied arithmetic", "Applied arithmetic/Money and shopping"}
    assert nodes["Arithmetic"]["subjects"] == 2
    assert manifest["generator"]["glan"]["prompt_templates"] == {n: load_template("glan", n).id for n in ("syllabus", "question")}
    card = (uri / "card.md").read_text()
    assert "## Coverage per taxonomy node" in card and "| Arithmetic/Whole-number operations | subject | 2 | 1 |" in card
