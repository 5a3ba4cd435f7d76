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
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from distillery.engine import SamplingSettings
from distillery.generation_cache import render, request_key
from distillery.model_setup import model_identity, resolve_model_path
from distillery.prompts import load_template
from distillery.stages.difficulty import variant_requests
from distillery.stages.ingest import ingest_seeds
from distillery.stages.self_instruct import solve_requests
from distillery.stages.synthesize import build_requests
from distillery.store import Store
from schemas.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SETS = ["seeds.builtin.count=5", "difficulty.solve_max_tokens=96", "generation.samples_per_problem=2", "generation.max_tokens=96", "quality.drop_truncated=false"]


def test_difficulty_recipe_end_to_end(tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / "recipes/difficulty.yaml", overrides=SETS)
    cfg, gen, seed = recipe.difficulty, recipe.generation, recipe.generation.seed
    model_dir = resolve_model_path(recipe.model.path)
    model = {"sha256": model_identity(model_dir)["sha256"], "dtype": recipe.engine.dtype}
    cache = Store(str(store))

    def plant(request, sampling, completion):
        key = request_key(model, render(str(model_dir), request["messages"]), sampling, request["sampling_seed"])
        cache.put(f"_cache/generation/{key[:2]}/{key}.json", json.dumps({"completion": completion, "finish_reason": "stop", "num_tokens": 12, "prompt_tokens": 40}).encode())

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

    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/difficulty.yaml", "--store", str(store)]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())

    stages = manifest["counts"]["stages"]
    assert [s["stage"] for s in stages[:5]] == ["ingest", "probe", "retarget", "agreement", "synthesize"]
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    for before, after in zip(stages, stages[1:]):
        assert before["rows_out"] == after["rows_in"]
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
