"""Rationalization (STaR) through the real ``synthesize`` flow (scripted generator, fast tier):
two of four problems are never solved; asked again with the reference as a hint, a rationale
that names the hint and one that is still wrong are dropped with their reasons, and the kept one
is published in its own version with its lineage, trained on without the hint."""

import json
from pathlib import Path

import polars as pl

from distillery.stages.ingest import ingest_seeds
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/rewards-best-of-n.yaml"
SETS = ["seeds.builtin.count=4", "score.method=none", "select.policy=all", "select.pairs.enabled=false", "generation.adaptive=null",
        "generation.samples_per_problem=2", "verify.keep=correct", "rationalize.enabled=true", "rationalize.samples=2"]  # fmt: skip
HINT = "(Hint: the correct final answer is"


def test_unsolved_problems_get_rationales_that_stand_without_the_hint(scripted, tmp_path):
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    ids, refs = seeds["seed_id"].to_list(), seeds["reference_answer"].to_list()
    ref = dict(zip(ids, refs, strict=True))
    # per unsolved problem, its two rationales: (answer, says so with the hint?)
    planted = {ids[2]: [(refs[2], "I used the hint."), (refs[2], "")], ids[3]: [(refs[3] + "0", ""), (refs[3], "That matches the given answer.")]}

    @scripted.rule
    def answer(request, sampling):
        sid, k = request["seed_id"], request["sample_index"]
        if HINT in request["messages"][-1]["content"]:
            value, mention = planted[sid][k]
            return (distinct_text(f"rationale-{sid}-{k}", value) + (" " + mention if mention else "")).strip()
        right = sid in ids[:2] and k == 0  # problems 0 and 1 solved once; 2 and 3 never
        return distinct_text(f"{sid}-{k}", ref[sid] if right else ref[sid] + "1")

    uri, manifest = run_flow(RECIPE, tmp_path / "store", SETS)
    hinted = [r for r in scripted.requests if HINT in r["messages"][-1]["content"]]
    assert sorted((r["seed_id"], r["sample_index"]) for r in hinted) == [(ids[2], 0), (ids[2], 1), (ids[3], 0), (ids[3], 1)]
    assert all(f"{HINT} {ref[r['seed_id']]}." in r["messages"][-1]["content"] for r in hinted)

    rat_uri = Path(manifest["companions"]["rationales"])
    rat = json.loads((rat_uri / "manifest.json").read_text())
    stages = check_stages(rat, ["rationalize", "verify", "hint_check", "quality", "dedup"])
    assert rat["counts"]["input"] == 2 and stages[0]["fanout"] == 2 and stages[0]["rows_out"] == 4
    assert stages[1]["dropped"] == {"incorrect": 1} and stages[2]["dropped"] == {"mentions_hint": 2}
    assert rat["counts"]["published"] == 1 and rat["origin"] == "rationalization" and rat["kind"] == "sft-chain-of-thought"

    (row,) = pl.read_parquet(rat_uri / "data").to_dicts()
    assert row["sample_id"] == f"{ids[2]}-r001" and row["seed_id"] == ids[2] and row["correct"] is True
    assert row["origin"] == "rationalization" and row["hint"] == f"the correct final answer is {refs[2]}"
    assert row["hint_template"] == rat["hint_template"] and row["hint_template"].startswith("rationalize/hint@")
    assert "Hint:" in row["prompt"]  # what the model was sent...
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][1]["content"] == row["question"] and "Hint" not in json.dumps(row["messages"][:2])  # ...and what a trainer sees
    assert row["messages"][2]["content"] == row["completion"]

    rejects = pl.read_parquet(rat_uri / "rejects")
    why = dict(zip(rejects["sample_id"], rejects["reason"], strict=True))
    assert why == {f"{ids[2]}-r000": "mentions_hint", f"{ids[3]}-r000": "incorrect", f"{ids[3]}-r001": "mentions_hint"}
    detail = rejects.filter(pl.col("sample_id") == f"{ids[3]}-r001")["detail"][0]
    assert "given answer" in detail
    # the main version is untouched: the solved problems' samples only
    main = pl.read_parquet(uri / "data")
    assert sorted(main["seed_id"].to_list()) == sorted(ids[:2]) and "origin" not in main.columns
