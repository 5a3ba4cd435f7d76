"""The reward loop end to end, as a user runs it (three CLI commands, real engines):

1. `distillery run recipes/rewards-best-of-n.yaml` without a scorer: one-step problems sampled in
   adaptive rounds, verified (keep all): the reward model's training data;
2. `distillery train-reward-model` on that version: a classification head on the embedded model,
   AUC on held-out problems in its manifest;
3. the same recipe on new problems, scored by that reward model through vLLM's pooling runner:
   best-of-N published as SFT data and preference pairs as their own data set.

Slow (a few minutes): deselect with `-m "not slow"`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from distillery.stages.publish import read_shards
from distillery.store import Store

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "recipes/rewards-best-of-n.yaml"
pytestmark = pytest.mark.slow


def _cli(tmp: Path, *args: str) -> str:
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout.strip().splitlines()[-1]


def _run(tmp: Path, store: Path, *sets: str) -> str:
    args = ["run", RECIPE, "--store", str(store)]
    for s in sets:
        args += ["--set", s]
    return _cli(tmp, *args)


def _version(uri: str) -> tuple[dict, pl.DataFrame, pl.DataFrame]:
    path = Path(uri)
    store = Store(str(path.parent.parent))
    manifest = store.manifest(path.parent.name, path.name)
    return manifest, read_shards(store, manifest), read_shards(store, manifest, "reject_shards")


@pytest.fixture(scope="module")
def loop(tmp_path_factory, prefect_server):
    tmp = tmp_path_factory.mktemp("rewards")
    store = tmp / "store"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_API_URL", prefect_server)  # the three runs report to the session's prefect server
        data_uri = _run(tmp, store, "name=rm-data", "score.method=none", "select.policy=all", "select.pairs.enabled=false", "seeds.builtin.count=12")
        rm_uri = _cli(tmp, "train-reward-model", data_uri, "--name", "rm-onestep", "--store", str(store))
        sft_uri = _run(tmp, store, f"score.reward_model={rm_uri}", "seeds.builtin.count=4", "seeds.builtin.seed=1")
    return {"data": _version(data_uri), "rm": Store(str(store)).manifest("rm-onestep"), "rm_uri": rm_uri, "sft": _version(sft_uri), "sft_uri": sft_uri}


def _chain_adds_up(manifest: dict) -> None:
    counts = manifest["counts"]
    stages = counts["stages"]
    assert stages[0]["rows_in"] == counts["input"] and stages[-1]["rows_out"] == counts["published"]
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values()), s
    for before, after in zip(stages, stages[1:]):
        assert before["rows_out"] == after["rows_in"]


def test_adaptive_rounds_record_samples_spent(loop):
    manifest, rows, rejects = loop["data"]
    _chain_adds_up(manifest)
    synth = next(s for s in manifest["counts"]["stages"] if s["stage"] == "synthesize")
    sampling = manifest["stats"]["sampling"]
    assert synth["fanout"] == 8 and sampling["budget_per_problem"] == 8
    # every slot of the budget is a drawn sample or one not drawn because the problem stopped early
    assert synth["rows_in"] * 8 - synth["dropped"].get("stopped_early", 0) == sampling["samples_spent_total"]
    # Every drawn sample, published or dropped after verify (quality and dedup may drop some of a
    # problem's samples, so the published rows alone need not show both rounds)
    verified = [json.loads(r) for r in rejects.filter(pl.col("stage").is_in(["quality", "decontaminate", "dedup"]))["record"]]
    drawn = rows.select("seed_id", "sample_index", "correct").to_dicts() + [
        {k: r.get(k) for k in ("seed_id", "sample_index", "correct")} for r in verified
    ]
    for seed_id, group in rows.group_by("seed_id"):
        spent = group["samples_spent"].unique().to_list()
        assert len(spent) == 1 and spent[0] in (4, 8)
        samples = [d for d in drawn if d["seed_id"] == seed_id[0]]
        first_round_correct = sum(bool(d["correct"]) for d in samples if d["sample_index"] < 4)
        assert max(d["sample_index"] for d in samples) < spent[0], seed_id  # no sample beyond the budget spent
        if spent[0] == 4:  # stopped early: the first round reached the target of 2 verified samples
            assert first_round_correct >= 2, seed_id
        else:  # went on: the first round did not
            assert first_round_correct < 2, seed_id


def test_reward_model_is_a_versioned_artifact_with_an_honest_auc(loop):
    rm = loop["rm"]
    assert rm["kind"] == "reward-model"
    assert rm["training_data"]["uri"].endswith("rm-data/v0001")
    auc = rm["metrics"]["auc_heldout"]
    assert auc is not None and 0.0 <= auc <= 1.0  # computed and recorded; its value is in the note
    print(f"reward model: AUC held-out {auc}, train {rm['metrics'].get('auc_train')}, split {rm['split']}")


def test_best_of_n_keeps_the_best_scored_sample_per_problem(loop):
    manifest, rows, rejects = loop["sft"]
    _chain_adds_up(manifest)
    assert manifest["scorer"] == {"method": "reward_model", "reward_model": loop["rm_uri"]}
    stages = [s["stage"] for s in manifest["counts"]["stages"]]
    assert stages == ["ingest", "synthesize", "verify", "score", "quality", "dedup", "select"]
    assert rows["seed_id"].n_unique() == rows.height  # one per problem
    assert rows["reward"].is_not_null().all() and rows["reward"].is_between(0, 1).all()
    assert rows["reward_source"].unique().to_list() == [f"reward_model:{loop['rm_uri']}"]
    losers = rejects.filter(pl.col("reason") == "not_best")
    assert losers.height == manifest["counts"]["stages"][-1]["dropped"].get("not_best", 0)
    best = {r["seed_id"]: (bool(r["correct"]), r["reward"]) for r in rows.iter_rows(named=True)}
    for record in losers["record"].to_list():
        loser = json.loads(record)
        assert (bool(loser["correct"]), loser["reward"]) <= best[loser["seed_id"]]  # correct first, then reward


def test_preference_pairs_are_their_own_data_set_with_counts_that_add_up(loop):
    manifest, rows, rejects = loop["sft"]
    pairs_uri = manifest["companions"]["preference_pairs"]
    pairs_manifest, pairs, pair_rejects = _version(pairs_uri)
    assert pairs_manifest["kind"] == "preference-pairs" and pairs_manifest["dataset"] == "rewards-best-of-n-pairs"
    _chain_adds_up(pairs_manifest)
    stage = pairs_manifest["counts"]["stages"][0]
    assert stage["stage"] == "pair" and stage["fanout"] == 2
    assert pairs_manifest["counts"]["rejected"] == pair_rejects.height
    assert pair_rejects["reason"].is_in(["one_label", "no_reward_gap"]).all()
    # Each pair's sides are samples of this run (published or dropped by best-of-N), and chosen
    # beats rejected: verified against wrong, or a higher reward.
    samples = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    samples |= {json.loads(r)["sample_id"]: json.loads(r) for r in rejects.filter(pl.col("stage") == "select")["record"]}
    assert pairs.height > 0
    for pair in pairs.iter_rows(named=True):
        chosen, rejected = samples[pair["chosen_sample_id"]], samples[pair["rejected_sample_id"]]
        assert chosen["seed_id"] == rejected["seed_id"] == pair["seed_id"]
        assert pair["chosen"] == chosen["completion"] and pair["rejected"] == rejected["completion"]
        if pair["reason"] == "label":
            assert chosen["correct"] is True and rejected["correct"] is False
        else:
            assert chosen["reward"] > rejected["reward"]
