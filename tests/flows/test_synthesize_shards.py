"""The synthesize flow's shards do not change what it publishes: the same problems in one shard
and in seven publish the same rows (in the same order; each row's ``recipe_hash`` aside, as the
recipes differ in ``generation.shard_size``), rejects, signatures and counts, duplicates planted
across shards included; in-process with a scripted generator (fast tier)."""

import json
from pathlib import Path

import polars as pl

from distillery.stages.ingest import ingest_seeds
from distillery.stages.publish import read_shards
from distillery.store import Store
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/default.yaml"
BASE = ["seeds.builtin.count=14", "generation.samples_per_problem=2", "verify.keep=all", "quality.require_final_answer=false", "select.pairs.enabled=false"]


def _version(uri: Path):
    store = Store(str(uri.parent.parent))
    manifest = json.loads((uri / "manifest.json").read_text())
    return manifest, read_shards(store, manifest), read_shards(store, manifest, "reject_shards"), read_shards(store, manifest, "signatures")


def test_one_shard_and_seven_shards_publish_the_same_version(scripted, tmp_path):
    recipe = load_recipe(ROOT / RECIPE, overrides=BASE)
    seeds = ingest_seeds(recipe.seeds).kept
    ids, answers = seeds["seed_id"].to_list(), seeds["reference_answer"].to_list()

    @scripted.rule
    def sample(request, sampling):
        p, k = ids.index(request["seed_id"]), request["sample_index"]
        if (p, k) == (12, 0):  # shard 6 of 7: the very text of problem 1's first sample (shard 0)
            return distinct_text(f"{ids[1]}-0", answers[1])
        if (p, k) == (9, 1):  # shard 4: problem 3's second sample (shard 1) with a word more
            return distinct_text(f"{ids[3]}-1", answers[3]) + " Checked."
        return distinct_text(f"{request['seed_id']}-{k}", answers[p])

    one_uri, _ = run_flow(RECIPE, tmp_path / "one", [*BASE, "generation.shard_size=14"])
    seven_uri, _ = run_flow(RECIPE, tmp_path / "seven", [*BASE, "generation.shard_size=2"])
    one, seven = _version(one_uri), _version(seven_uri)
    shards = [c[0] for c in scripted.calls]
    assert shards.count(0) == 2 and max(shards) == 6  # one batch of 28 requests, then seven of 4

    stages = {s["stage"]: s for s in check_stages(one[0], ["ingest", "synthesize", "verify"])}
    assert stages["dedup"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert one[0]["counts"] == seven[0]["counts"]
    assert one[1]["recipe_hash"].n_unique() == 1 and one[1]["recipe_hash"][0] != seven[1]["recipe_hash"][0]  # the only difference: the recipe
    assert one[1].drop("recipe_hash").equals(seven[1].drop("recipe_hash")) and one[3].equals(seven[3])
    keys = ["stage", "reason", "detail", "seed_id", "sample_id"]
    assert one[2].select(keys).equals(seven[2].select(keys))
    dropped = one[2].filter(pl.col("stage") == "dedup")
    assert sorted(dropped["sample_id"]) == sorted([f"{ids[12]}-s000", f"{ids[9]}-s001"])  # the later copies go, wherever their shard
    # published in the problems' order, each problem's samples by sample_index
    expected = [f"{seed}-s{k:03d}" for seed in ids for k in range(2)]
    assert one[1]["sample_id"].to_list() == [s for s in expected if s not in set(dropped["sample_id"])]
    assert one[3]["sample_id"].to_list() == one[1]["sample_id"].to_list()  # the signatures of the published rows
