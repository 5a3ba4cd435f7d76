"""Self-Instruct with Ensemble-Instruct's agreement, end to end with the real CPU vLLM engine:
``distillery run recipes/self-instruct.yaml``.

Planted cases: before the run, the test stores the engine's answers to some requests in the
generation cache (under the keys the run computes), so that they are known: a fresh new task, a
near-copy of a pool problem, a near-copy of that fresh task, a too-short one, and the three
ensemble members' answers to the fresh task (which agree). The run must drop the planted copies
as ``too_similar`` naming what they copy, keep the fresh task with the members' answer as its
reference, and sample and verify it. Every other request comes from the real engine. Slow.
"""

import json

import polars as pl
import pytest

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.ingest import ingest_seeds
from distillery.stages.self_instruct import solve_requests, task_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, Planter, check_stages, run_recipe

pytestmark = pytest.mark.slow
SETS = [
    "seeds.builtin.count=4",
    "self_instruct.solve_max_tokens=96",
    "generation.samples_per_problem=2",
    "generation.max_tokens=96",
    "verify.keep=all",
    "quality.drop_truncated=false",
]
FRESH = "A baker makes 24 muffins and packs them in bags of 3. How many bags does the baker fill?"


def test_self_instruct_recipe_end_to_end(tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / "recipes/self-instruct.yaml", overrides=SETS)
    cfg = recipe.self_instruct
    seeds = ingest_seeds(recipe.seeds).kept
    a, b = seeds["seed_id"][0], seeds["seed_id"][1]
    planter = Planter(store, recipe)
    requests = task_requests(seeds, per_seed=cfg.per_seed, examples=cfg.examples, run_seed=recipe.generation.seed)
    by_id = {(r["seed_id"], r["task_index"]): r for r in requests}
    new = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens)
    copy_of_pool = seeds["question"][1].replace("?", " now?")
    planter.plant(by_id[(a, 0)], new, f"Problem 4: {FRESH}")
    planter.plant(by_id[(a, 1)], new, copy_of_pool)
    planter.plant(by_id[(b, 0)], new, FRESH.replace("fill?", "fill up?"))
    planter.plant(by_id[(b, 1)], new, "Hi")
    fresh = pl.DataFrame({"seed_id": [f"{a}.si0"], "question": [FRESH]})
    members = [m.model_dump() for m in cfg.members]
    for member, member_requests in zip(cfg.members, solve_requests(fresh, members, run_seed=recipe.generation.seed), strict=True):
        planter.plant(member_requests[0], SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens), "24 / 3 = 8. The answer is 8")

    uri, manifest = run_recipe(tmp_path, "recipes/self-instruct.yaml", store, SETS)

    stages = check_stages(manifest, ["ingest", "self-instruct", "agreement", "synthesize"])
    made, agreed = stages[1], stages[2]
    assert (made["rows_in"], made["fanout"]) == (4, 2)
    assert made["dropped"]["too_similar"] >= 2 and made["dropped"]["too_short"] >= 1

    rejects = pl.read_parquet(uri / "rejects")
    si = {r["seed_id"]: (r["reason"], json.loads(r["record"])) for r in rejects.filter(pl.col("stage") == "self-instruct").iter_rows(named=True)}
    assert si[f"{a}.si1"][0] == "too_similar" and si[f"{a}.si1"][1]["nearest_id"] == b  # copies a pool problem
    assert si[f"{b}.si0"][0] == "too_similar" and si[f"{b}.si0"][1]["nearest_id"] == f"{a}.si0"  # copies a new task kept before it
    assert si[f"{b}.si1"][0] == "too_short"
    assert f"{a}.si0" not in si
    assert agreed["rows_in"] == made["rows_out"] and agreed["rows_out"] >= 1
    assert f"{a}.si0" not in set(rejects.filter(pl.col("stage") == "agreement")["seed_id"].to_list())

    # the fresh task was sampled and verified against the members' answer; its samples carry lineage
    later = rejects.filter(~pl.col("stage").is_in(["ingest", "self-instruct", "agreement", "synthesize"]))
    mine = pl.read_parquet(uri / "data").filter(pl.col("seed_id") == f"{a}.si0").to_dicts() + [
        r for r in map(json.loads, later["record"]) if r["seed_id"] == f"{a}.si0"
    ]
    assert len(mine) == 2
    for row in mine:
        assert row["question"] == FRESH and row["reference_answer"] == "8" and row["member_agreement"] == 1.0
        assert row["parent_id"] == a and row["si_examples"][0] == a and len(row["si_examples"]) == cfg.examples
        assert row["si_template"] == load_template("self_instruct", "new_task").id
        assert row["correct"] is not None  # verified against the consensus answer

    templates = manifest["generator"]["self_instruct"]["prompt_templates"]
    assert templates == {"new_task": load_template("self_instruct", "new_task").id, "solve": load_template("self_instruct", "solve").id}
    card = (uri / "card.md").read_text()
    assert "| self-instruct |" in card and "| agreement |" in card
