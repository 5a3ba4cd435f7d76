"""Difficulty-targeted generation end to end with the real CPU vLLM engine:
``distillery run recipes/difficulty.yaml``.

Planted cases: before the run, the test stores the engine's answers to some requests in the
generation cache (under the keys the run computes): every probe sample of the first problem is
right (so the model "always solves" it) and every one of the second is wrong ("never solves"),
the first one's harder rewrite, the second one's "simpler" rewrite that is the problem again, and
the ensemble's three answers to the harder variant (two agree). The run must make the harder
variant (its reference the ensemble's answer), drop the unchanged one as ``no_change``, and label
the first problem's samples easy and the second's hard. Everything else is the real engine. Slow.
"""

import json

import polars as pl
import pytest

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.difficulty import variant_requests
from distillery.stages.ingest import ingest_seeds
from distillery.stages.self_instruct import solve_requests
from distillery.stages.synthesize import build_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, Planter, check_stages, run_recipe

pytestmark = pytest.mark.slow
SETS = ["seeds.builtin.count=5", "difficulty.solve_max_tokens=96", "generation.samples_per_problem=2", "generation.max_tokens=96", "quality.drop_truncated=false"]


def test_difficulty_recipe_end_to_end(tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / "recipes/difficulty.yaml", overrides=SETS)
    cfg, gen, seed = recipe.difficulty, recipe.generation, recipe.generation.seed
    plant = Planter(store, recipe).plant

    seeds = ingest_seeds(recipe.seeds).kept
    easy, hard = seeds.row(0, named=True), seeds.row(1, named=True)
    wrong = str(int(hard["reference_answer"]) + 1)
    for request in build_requests(seeds[:2], gen):  # the probe's samples, and so the final ones
        answer = easy["reference_answer"] if request["seed_id"] == easy["seed_id"] else wrong
        plant(request, SamplingSettings.from_config(gen), f"Let me add. The answer is {answer}")
    probed = seeds[:2].with_columns(pl.Series("probe_pass_rate", [1.0, 0.0]))
    harder_text = f"{easy['question'][:-1]}, and then 3 more are added. What is the total?"
    rewrites = variant_requests(probed, run_seed=seed)
    rewrite = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens)
    plant(rewrites[0], rewrite, f"Harder problem: {harder_text}")
    plant(rewrites[1], rewrite, hard["question"])  # the "simpler" problem is the problem again
    harder = pl.DataFrame({"seed_id": [f"{easy['seed_id']}.harder"], "question": [harder_text]})
    member_answers = ["The answer is 99", "The answer is 99", "The answer is 7"]
    for member, requests, text in zip(cfg.members, solve_requests(harder, [m.model_dump() for m in cfg.members], run_seed=seed), member_answers, strict=True):
        plant(requests[0], SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens), text)

    uri, manifest = run_recipe(tmp_path, "recipes/difficulty.yaml", store, SETS)

    stages = check_stages(manifest, ["ingest", "probe", "retarget", "agreement", "synthesize"])
    retargeted = stages[2]
    assert (retargeted["rows_in"], retargeted["fanout"]) == (5, 2) and retargeted["dropped"]["no_change"] >= 1

    rejects = pl.read_parquet(uri / "rejects")
    by_id = {r["seed_id"]: r for r in rejects.filter(pl.col("stage") == "retarget").iter_rows(named=True)}
    assert by_id[f"{hard['seed_id']}.simpler"]["reason"] == "no_change"
    data = pl.read_parquet(uri / "data")
    later = rejects.filter(~pl.col("stage").is_in(["ingest", "probe", "retarget", "agreement", "synthesize"]))
    rows = data.to_dicts() + [json.loads(r) for r in later["record"]]

    variant = [r for r in rows if r["seed_id"] == f"{easy['seed_id']}.harder"]
    assert len(variant) == 2
    for row in variant:
        assert row["question"] == harder_text and row["reference_answer"] == "99" and row["variant_of"] == easy["seed_id"]
        assert row["variant_direction"] == "harder" and row["variant_template"] == load_template("difficulty", "harder").id
        assert row["member_agreement"] == round(2 / 3, 4) and row["correct"] is not None and row["difficulty"] in {"easy", "medium", "hard"}
    assert {r["difficulty"] for r in rows if r["seed_id"] == easy["seed_id"]} == {"easy"}  # its planted samples are all right
    assert {r["difficulty"] for r in rows if r["seed_id"] == hard["seed_id"]} == {"hard"}
    assert {r["probe_pass_rate"] for r in rows if r["seed_id"] == easy["seed_id"]} == {1.0}

    stats = manifest["stats"]["difficulty"]
    assert stats["problems_probed"] == 5 and stats["always_solved"] >= 1 and stats["never_solved"] >= 1 and stats["variants_kept"] >= 1
    assert sum(stats["published_by_difficulty"].values()) == data.height
    assert manifest["stats"]["generation_cache"]["hits"] >= 4  # the planted probe samples, reused by the final sampling
    assert manifest["generator"]["difficulty"]["prompt_templates"]["harder"] == load_template("difficulty", "harder").id
    card = (uri / "card.md").read_text()
    assert "| probe |" in card and "| retarget |" in card and "| agreement |" in card
