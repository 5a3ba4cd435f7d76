"""Evol-Instruct end to end with the real CPU vLLM engine: ``distillery run
recipes/evol-instruct.yaml`` for two rounds, then sampling, majority-vote labels and publish.

Planted cases: before the run, the test stores the engine's answer to four of the first
round's rewrite requests in the generation cache (the same keys the run computes: model, rendered
prompt, sampling, seed), so that those rewrites are known: one good, one that copies the
template's words, one refusal, one that is the problem again. The run must eliminate the three
with their reasons and evolve the good one (a planted second round keeps it alive to sampling).
Every other request, and every solution sampled, comes from the real engine. Slow (~2 minutes).
"""

import json
from pathlib import Path

import polars as pl
import pytest

from distillery.engine import SamplingSettings
from distillery.stages.evolve import evolution_requests, load_template
from distillery.stages.ingest import ingest_seeds
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, Planter, check_stages, run_recipe

pytestmark = pytest.mark.slow
SETS = ["seeds.builtin.count=5", "evolve.max_tokens=96", "generation.samples_per_problem=2", "generation.max_tokens=96", "quality.drop_truncated=false"]


def _plant(store: Path, recipe, requests: list[dict], answers: dict[str, str]) -> None:
    """Put ``answers`` (seed_id -> the rewrite) in the cache under the keys of ``requests``."""
    planter = Planter(store, recipe)
    sampling = SamplingSettings(recipe.evolve.temperature, recipe.evolve.top_p, recipe.evolve.max_tokens)
    for request in requests:
        if request["seed_id"] in answers:
            planter.plant(request, sampling, answers[request["seed_id"]])


def test_evol_instruct_recipe_end_to_end(tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / "recipes/evol-instruct.yaml", overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    a, b, c, d, _e = seeds["seed_id"].to_list()
    ops = tuple(recipe.evolve.operations)
    first = evolution_requests(seeds, round_no=1, run_seed=recipe.generation.seed, operations=ops)
    good = "A shop sells pencils in boxes of 12. Lena buys 7 boxes and gives away 19 pencils. How many pencils does she keep?"
    _plant(store, recipe, first, {
        a: f"#Rewritten Prompt#: {good}",
        b: "Here is the rewritten prompt: the given prompt with one more constraint.",
        c: "I'm sorry, but I cannot rewrite this problem.",
        d: seeds["question"][3],
    })
    child = pl.DataFrame({"seed_id": [f"{a}.e1"], "question": [good]})
    second = evolution_requests(child, round_no=2, run_seed=recipe.generation.seed, operations=ops)
    harder = "A shop sells pencils in boxes of 12. Lena buys 7 boxes, gives away 19 pencils and then buys 5 more. How many pencils does she have?"
    _plant(store, recipe, second, {f"{a}.e1": harder})

    uri, manifest = run_recipe(tmp_path, "recipes/evol-instruct.yaml", store, SETS)

    # row accounting: ingest -> evolve-1 -> evolve-2 -> synthesize (fanout 2) -> ...
    stages = check_stages(manifest, ["ingest", "evolve-1", "evolve-2", "synthesize"])
    round1, round2 = stages[1], stages[2]
    assert round1["rows_in"] == 5 and round1["rows_out"] <= 2
    assert round2["rows_in"] == round1["rows_out"] and round2["rows_out"] >= 1  # the planted good rewrite
    for reason in ("copied_prompt", "unanswerable", "no_change"):
        assert round1["dropped"].get(reason, 0) >= 1, round1

    # the planted failures are rejects of evolve-1, each with its reason
    rejects = pl.read_parquet(uri / "rejects").filter(pl.col("stage") == "evolve-1")
    reasons = dict(zip(rejects["seed_id"], rejects["reason"], strict=True))
    assert {reasons[f"{b}.e1"], reasons[f"{c}.e1"], reasons[f"{d}.e1"]} == {"copied_prompt", "unanswerable", "no_change"}
    assert reasons[f"{b}.e1"] == "copied_prompt" and reasons[f"{c}.e1"] == "unanswerable" and reasons[f"{d}.e1"] == "no_change"
    assert f"{a}.e1" not in reasons

    # samples of the twice-evolved problem carry its chain: the seed, both rewrites, their templates
    # (published, or rejected by a later stage: the weak model's samples may not survive quality)
    rows = pl.read_parquet(uri / "data")
    later = pl.read_parquet(uri / "rejects").filter(~pl.col("stage").is_in(["ingest", "evolve-1", "evolve-2", "synthesize"]))
    mine = rows.filter(pl.col("seed_id") == f"{a}.e1.e2").to_dicts() + [
        record for record in map(json.loads, later["record"]) if record["seed_id"] == f"{a}.e1.e2"
    ]
    assert len(mine) == 2  # both samples of it, each exactly once
    for row in mine:
        assert row["question"] == harder and row["root_id"] == a and row["parent_id"] == f"{a}.e1" and row["evol_round"] == 2
        chain = row["evol_chain"]
        assert [step["round"] for step in chain] == [1, 2]
        assert chain[0]["from"] == seeds["question"][0] and chain[1]["from"] == good
        assert chain[1]["template"] == load_template("evol_instruct", chain[1]["operation"]).id
    assert rows.height == 0 or rows["evol_chain"].null_count() == 0

    # lineage: the templates by version; the data card's counts per round
    templates = manifest["generator"]["evolve"]["prompt_templates"]
    assert templates == {op: load_template("evol_instruct", op).id for op in ops}
    per_round = manifest["stats"]["evolve"]["rounds"]
    assert per_round["1"]["instructions"] == 5 and per_round["1"]["eliminated"] == round1["dropped"]
    assert per_round["2"]["instructions"] == round1["rows_out"]
    card = (uri / "card.md").read_text()
    assert "evolve-1" in card and "evolve-2" in card
    # and in the OpenLineage events: the run facet names the templates, by version
    events = [json.loads(p.read_text()) for p in (store / "_lineage").rglob("*.json")]
    complete = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == "synthesize"]
    assert complete and complete[0]["run"]["facets"]["distillery_run"]["promptTemplates"] == sorted(templates.values())
