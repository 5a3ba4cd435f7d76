"""Adaptive sampling rounds, majority-vote scoring, best-of-N selection and preference pairs
through the real ``synthesize`` flow, in-process, with a scripted generator in place of the vLLM
engines (tests/scripted.py; fast tier: seconds, no vLLM): ``recipes/rewards-best-of-n.yaml``
with ``score.method=majority_vote`` (tests/flows/test_rewards_flow.py runs the same recipe with a
trained reward model and the real engine, slow).

The script (a rule on each sample's problem and index) makes four problems whose samples are
known: one solved 3 of 4 times in the first round (it stops early), one solved 3 of 8 times
whose majority answer is wrong (it goes on to the budget, and best-of-N must prefer a verified
sample to the vote), one never solved with an engine error in its second round, and one solved
exactly the target number of times in the first round with a truncated sample. Every count of
rounds, samples spent, rejects, selections and pairs is then known and checked.
"""

import json
from pathlib import Path

import polars as pl

from distillery.stages.ingest import ingest_seeds
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/rewards-best-of-n.yaml"
SETS = ["seeds.builtin.count=4", "score.method=majority_vote", "generation.max_tokens=64"]
# per problem (in seed order), the final answer of each sample index; None: an engine error;
# "10!": that answer in a sample cut off at max_tokens
ANSWERS = [
    ["14", "14", "14", "15"],  # 7 + 7: 3 verified in round 1 -> stops at 4
    ["16", "17", "16", "16", "16", "17", "17", "16"],  # 9 + 8: 1 in round 1, 3 of 8; the vote says 16
    ["12", "12", "11", "12", "11", None, "12", "11"],  # 5 + 8: never; the vote says 12
    ["13", "10", "13", "10!"],  # 4 + 9: exactly 2 in round 1 -> stops; a truncated sample
]


def test_adaptive_rounds_vote_best_of_n_and_pairs(scripted, tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    ids = seeds["seed_id"].to_list()
    assert seeds["reference_answer"].to_list() == ["14", "17", "13", "13"]

    @scripted.rule
    def sample(request, sampling):
        answers = ANSWERS[ids.index(request["seed_id"])]
        if request["sample_index"] >= len(answers):
            return None  # a sample the flow should not have drawn: the default answer, and the checks below fail
        answer = answers[request["sample_index"]]
        if answer is None:
            return {"error": "EngineDeadError: the engine core died"}
        if answer.endswith("!"):
            return {"completion": distinct_text(request["seed_id"], answer[:-1]), "finish_reason": "length"}
        return distinct_text(f"{request['seed_id']}-{request['sample_index']}", answer)

    uri, manifest = run_flow(RECIPE, store, SETS)
    pairs_uri = manifest["companions"]["preference_pairs"]

    # rounds: all four problems in round 1 (4 samples each), two of them in round 2
    assert [(n, s.temperature) for _, n, s in scripted.calls] == [(16, recipe.generation.temperature), (8, recipe.generation.temperature)]
    assert sorted((r["seed_id"], r["sample_index"]) for r in scripted.requests) == sorted(
        (sid, k) for sid, answers in zip(ids, ANSWERS, strict=True) for k in range(len(answers))
    )
    sampling = manifest["stats"]["sampling"]
    assert sampling == {"rounds": 2, "budget_per_problem": 8, "samples_spent_total": 24, "samples_spent_histogram": {"4": 2, "8": 2}}

    stages = check_stages(manifest, ["ingest", "synthesize", "verify", "score", "quality", "dedup", "select"])
    synth, verify, score, quality, dedup, select = stages[1:]
    assert (synth["rows_in"], synth["fanout"], synth["rows_out"]) == (4, 8, 23)
    assert synth["dropped"] == {"stopped_early": 8, "generation_error": 1}
    assert verify["rows_out"] == score["rows_out"] == 23  # verify.keep: all
    assert quality["dropped"] == {"truncated": 1} and dedup["dropped"] == {}
    assert (select["rows_in"], select["rows_out"], select["dropped"]) == (22, 4, {"not_best": 18})
    assert manifest["stats"]["samples_correct"] == 3 + 3 + 0 + 2

    rejects = pl.read_parquet(uri / "rejects")
    (error,) = rejects.filter(pl.col("reason") == "generation_error").to_dicts()
    assert (error["stage"], error["seed_id"], json.loads(error["record"])["sample_index"]) == ("synthesize", ids[2], 5)
    (cut,) = rejects.filter(pl.col("stage") == "quality").to_dicts()
    assert cut["reason"] == "truncated" and json.loads(cut["record"])["sample_index"] == 3

    # the vote (never the reference) and the published best: verified first, then the vote's reward
    rows = pl.read_parquet(uri / "data").sort("seed_id")
    assert rows["seed_id"].to_list() == ids and rows["sample_index"].to_list() == [0, 1, 0, 0]
    assert rows["majority_answer"].to_list() == ["14", "16", "12", "13"]  # the tie 13/10 goes to the first sample's answer
    assert rows["correct"].to_list() == [True, True, False, True]
    assert rows["reward"].to_list() == [1.0, 0.0, 1.0, 1.0] and rows["reward_source"].unique().to_list() == ["majority_vote"]
    assert rows["samples_spent"].to_list() == [4, 8, 8, 4]
    losers = rejects.filter(pl.col("stage") == "select")
    assert losers.height == 18 and losers["reason"].unique().to_list() == ["not_best"]

    # preference pairs from what dedup kept: labels where a problem has both, else the vote's reward
    pairs = pl.read_parquet(Path(pairs_uri) / "data")
    pairs_manifest = json.loads((Path(pairs_uri) / "manifest.json").read_text())
    assert pairs_manifest["kind"] == "preference-pairs" and pairs_manifest["dataset"] == "rewards-best-of-n-pairs"
    (stage,) = check_stages(pairs_manifest, ["pair"])
    assert (stage["rows_in"], stage["fanout"], stage["rows_out"]) == (4, 2, 8)
    assert sorted(pairs.select("seed_id", "reason").iter_rows()) == sorted(
        (sid, why) for sid, why in zip(ids, ["label", "label", "reward", "label"], strict=True) for _ in range(2)
    )
    samples = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    samples |= {json.loads(r)["sample_id"]: json.loads(r) for r in losers["record"]}
    for pair in pairs.iter_rows(named=True):
        chosen, rejected = samples[pair["chosen_sample_id"]], samples[pair["rejected_sample_id"]]
        assert chosen["seed_id"] == rejected["seed_id"] == pair["seed_id"]
        assert pair["chosen"] == chosen["completion"] and pair["rejected"] == rejected["completion"]
        if pair["reason"] == "label":
            assert chosen["correct"] is True and rejected["correct"] is False
        else:
            assert (chosen["reward"], rejected["reward"]) == (1.0, 0.0) and chosen["predicted_answer"] == "12"
    assert manifest["counts"]["published"] == 4 and pairs_manifest["counts"]["published"] == 8
