"""Self-Instruct with Ensemble-Instruct's agreement through the real ``synthesize`` flow,
in-process, with a scripted generator in place of the vLLM engines (tests/scripted.py; fast
tier: seconds, no vLLM): ``recipes/self-instruct.yaml``.

The script answers every request the flow makes, keyed by the requests the stage functions build
(``task_requests``, ``solve_requests``, ``build_requests``). New tasks: a fresh one, a near-copy of
a pool problem, a near-copy of that fresh task, a too-short one, a second and a third fresh one, an
engine error and a too-long one. The flow must drop the copies as ``too_similar`` naming what they
copy, and the others with their reasons; the ensemble agrees on the first fresh task's answer,
disagrees on the second (``no_agreement``) and gives no answer for the third (``no_answer``); the
first is sampled and verified against the members' answer, with its lineage.
"""

import json

import polars as pl

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.ingest import ingest_seeds
from distillery.stages.self_instruct import solve_requests, task_requests
from distillery.stages.synthesize import build_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow

RECIPE = "recipes/self-instruct.yaml"
SETS = [
    "seeds.builtin.count=4",
    "self_instruct.solve_max_tokens=96",
    "generation.samples_per_problem=2",
    "generation.max_tokens=96",
    "verify.keep=all",
    "quality.drop_truncated=false",
]
FRESH = "A baker makes 24 muffins and packs them in bags of 3. How many bags does the baker fill?"
TRAIN = "A train travels 60 kilometres every hour for 3 hours. How far does the train go?"
GARDEN = "A gardener plants tulips in rows along a fence. What colour are the tulips in the last row?"


def test_self_instruct_recipe_end_to_end(scripted, tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    cfg, run_seed = recipe.self_instruct, recipe.generation.seed
    seeds = ingest_seeds(recipe.seeds).kept
    a, b, c, d = seeds["seed_id"].to_list()
    requests = task_requests(seeds, cfg, run_seed=run_seed)
    by_id = {(r["seed_id"], r["task_index"]): r for r in requests}
    new = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens)
    scripted.plant(by_id[(a, 0)], f"Problem 4: {FRESH}\n\nProblem 5: something else", new)
    scripted.plant(by_id[(a, 1)], seeds["question"][1].replace("?", " now?"), new)  # a pool problem again
    scripted.plant(by_id[(b, 0)], FRESH.replace("fill?", "fill up?"), new)  # the fresh task again
    scripted.plant(by_id[(b, 1)], "Hi", new)
    scripted.plant(by_id[(c, 0)], TRAIN, new)
    scripted.plant(by_id[(c, 1)], {"error": "EngineDeadError: the engine core died"}, new)
    scripted.plant(by_id[(d, 0)], GARDEN, new)
    scripted.plant(by_id[(d, 1)], "How many coins are in the jar? " * 40, new)  # over max_chars

    kept = pl.DataFrame({"seed_id": [f"{a}.si0", f"{c}.si0", f"{d}.si0"], "question": [FRESH, TRAIN, GARDEN]})
    answers = [  # per member: its answers to the three kept tasks
        ["24 / 3 = 8. The answer is 8", "60 x 3 = 180. The answer is 180", "The tulips could be any colour."],
        ["Eight bags. The answer is 8", "The answer is 170", "I cannot tell the colour."],
        ["The answer is 8.0", "The answer is 160", "The answer is red"],
    ]
    for member, member_requests, texts in zip(cfg.members, solve_requests(kept, cfg, run_seed=run_seed), answers, strict=True):
        for request, text in zip(member_requests, texts, strict=True):
            scripted.plant(request, text, SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens))
    fresh = pl.DataFrame({"seed_id": [f"{a}.si0"], "question": [FRESH]})
    solutions = ["24 muffins in bags of 3 is 24 / 3 = 8 bags. The answer is 8", "Each bag holds 3, so 24 muffins need 9 bags. The answer is 9"]
    for request, text in zip(build_requests(fresh, recipe.generation), solutions, strict=True):
        scripted.plant(request, text, SamplingSettings.from_config(recipe.generation))

    uri, manifest = run_flow(RECIPE, store, SETS)

    # what reached the engine: exactly the scripted requests, each once
    assert scripted.unused() == [] and set(scripted.sources) == {"planted"}
    assert len(scripted.requests) == 8 + 3 * 3 + 2
    assert manifest["stats"]["generation_cache"] == {"hits": 0, "misses": 19}

    stages = check_stages(manifest, ["ingest", "self-instruct", "agreement", "synthesize", "verify", "quality", "dedup"])
    made, agreed = stages[1], stages[2]
    assert (made["rows_in"], made["fanout"], made["rows_out"]) == (4, 2, 3)
    assert made["dropped"] == {"too_similar": 2, "too_short": 1, "generation_error": 1, "too_long": 1}
    assert (agreed["rows_in"], agreed["rows_out"], agreed["dropped"]) == (3, 1, {"no_agreement": 1, "no_answer": 1})

    rejects = pl.read_parquet(uri / "rejects")
    si = {r["seed_id"]: (r["reason"], json.loads(r["record"]), r["detail"]) for r in rejects.filter(pl.col("stage") == "self-instruct").iter_rows(named=True)}
    assert set(si) == {f"{a}.si1", f"{b}.si0", f"{b}.si1", f"{c}.si1", f"{d}.si1"}
    assert si[f"{a}.si1"][0] == "too_similar" and si[f"{a}.si1"][1]["nearest_id"] == b  # copies a pool problem
    assert si[f"{b}.si0"][0] == "too_similar" and si[f"{b}.si0"][1]["nearest_id"] == f"{a}.si0"  # copies a new task kept before it
    assert si[f"{b}.si0"][2].startswith("ROUGE-L ") and si[f"{b}.si0"][2].endswith(f" with {a}.si0")
    assert si[f"{b}.si1"][0] == "too_short" and si[f"{d}.si1"][0] == "too_long"
    assert si[f"{c}.si1"][0] == "generation_error" and "EngineDeadError" in si[f"{c}.si1"][2]
    ag = {r["seed_id"]: (r["reason"], r["detail"]) for r in rejects.filter(pl.col("stage") == "agreement").iter_rows(named=True)}
    assert ag == {f"{c}.si0": ("no_agreement", ag[f"{c}.si0"][1]), f"{d}.si0": ("no_answer", ag[f"{d}.si0"][1])}
    assert ag[f"{c}.si0"][1].startswith("1 of 3 members agree on '180'")

    # the fresh task was sampled and verified against the members' answer; its samples carry lineage
    rows = pl.read_parquet(uri / "data").sort("sample_index")
    assert rows["seed_id"].to_list() == [f"{a}.si0"] * 2 and rows["completion"].to_list() == solutions
    for row in rows.to_dicts():
        assert row["question"] == FRESH and row["reference_answer"] == "8" and row["member_agreement"] == 1.0
        assert row["member_answers"] == ["8", "8", "8.0"]  # 8.0 agrees with 8 (math-verify)
        assert row["parent_id"] == a and row["si_examples"] == by_id[(a, 0)]["examples"] and row["si_examples"][0] == a
        assert len(row["si_examples"]) == cfg.examples and row["si_template"] == load_template("self_instruct", "new_task").id
    assert rows["correct"].to_list() == [True, False]  # verified against the consensus answer
    assert manifest["stats"]["samples_correct"] == 1 and manifest["stats"]["samples_with_reference"] == 2

    templates = manifest["generator"]["self_instruct"]["prompt_templates"]
    assert templates == {"new_task": load_template("self_instruct", "new_task").id, "solve": load_template("self_instruct", "solve").id}
    card = (uri / "card.md").read_text()
    assert "| self-instruct |" in card and "| agreement |" in card
