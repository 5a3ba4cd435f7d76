"""Revision traces through the real ``synthesize`` flow (scripted generator, fast tier): each
wrong sample is shown its verdict and asked again; a revision that still fails verification is
dropped, the kept ones are published as multi-turn conversations and as preference pairs of the
revision over the first answer, each naming the wrong sample it revises."""

import json
from pathlib import Path

import polars as pl
import pytest

from distillery.stages.ingest import ingest_seeds
from schemas.recipe import RecipeError, load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/rewards-best-of-n.yaml"
SETS = ["seeds.builtin.count=3", "score.method=none", "select.policy=all", "select.pairs.enabled=false", "generation.adaptive=null",
        "generation.samples_per_problem=2", "verify.keep=all", "revise.enabled=true"]  # fmt: skip


def test_wrong_samples_get_revisions_that_verify(scripted, tmp_path):
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    ids, refs = seeds["seed_id"].to_list(), seeds["reference_answer"].to_list()
    ref = dict(zip(ids, refs, strict=True))

    @scripted.rule
    def answer(request, sampling):
        sid, k = request["seed_id"], request["sample_index"]
        if len(request["messages"]) == 4:  # a revision: system, user, the first answer, the feedback
            fixed = sid != ids[1]  # the second problem's revision is still wrong
            return distinct_text(f"revision-{sid}", ref[sid] if fixed else ref[sid] + "2")
        return distinct_text(f"{sid}-{k}", ref[sid] if k == 0 else ref[sid] + "1")  # sample 1 is wrong

    uri, manifest = run_flow(RECIPE, tmp_path / "store", SETS)
    asked = [r for r in scripted.requests if len(r["messages"]) == 4]
    assert sorted(r["seed_id"] for r in asked) == sorted(ids)
    for r in asked:
        assert r["messages"][2] == {"role": "assistant", "content": distinct_text(f"{r['seed_id']}-1", ref[r["seed_id"]] + "1")}
        assert r["messages"][3]["role"] == "user" and f"{ref[r['seed_id']]}1, is not correct" in r["messages"][3]["content"]

    rev_uri = Path(manifest["companions"]["revisions"])
    rev = json.loads((rev_uri / "manifest.json").read_text())
    revise, verify = check_stages(rev, ["revise", "verify"])
    assert rev["counts"]["input"] == 3 and revise["rows_out"] == 3 and verify["dropped"] == {"incorrect": 1}
    rows = pl.read_parquet(rev_uri / "data").sort("seed_id")
    assert rows["seed_id"].to_list() == sorted([ids[0], ids[2]]) and rows["correct"].all()
    for row in rows.iter_rows(named=True):
        assert row["revises"] == f"{row['seed_id']}-s001" and row["sample_id"] == f"{row['seed_id']}-s001-v000"
        assert row["origin"] == "revision" and row["first_completion"].endswith(f"The answer is {ref[row['seed_id']]}1")
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"]
        assert row["messages"][2]["content"] == row["first_completion"] and row["messages"][3]["content"] == row["feedback"]
        assert row["messages"][4]["content"] == row["completion"]
    rejects = pl.read_parquet(rev_uri / "rejects")
    assert dict(zip(rejects["sample_id"], rejects["reason"], strict=True)) == {f"{ids[1]}-s001-v000": "incorrect"}

    pairs_uri = Path(manifest["companions"]["revision_pairs"])
    pm = json.loads((pairs_uri / "manifest.json").read_text())
    assert pm["kind"] == "preference-pairs" and pm["counts"]["published"] == 2
    pairs = pl.read_parquet(pairs_uri / "data").sort("seed_id")
    assert pairs["reason"].unique().to_list() == ["revision"]
    assert pairs["chosen"].to_list() == rows["completion"].to_list() and pairs["rejected"].to_list() == rows["first_completion"].to_list()
    assert pairs["rejected_sample_id"].to_list() == rows["revises"].to_list()


def test_revision_needs_the_wrong_samples():
    with pytest.raises(RecipeError, match="revise.enabled needs the wrong samples"):
        load_recipe(ROOT / RECIPE, overrides=["revise.enabled=true", "verify.keep=correct"])


def test_revisions_export_as_multi_turn_conversations(scripted, tmp_path, embedded_model):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    from distillery.formats import export_version
    from distillery.store import Store

    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    ref = dict(zip(*[ingest_seeds(recipe.seeds).kept[c].to_list() for c in ("seed_id", "reference_answer")], strict=True))

    @scripted.rule
    def answer(request, sampling):  # every first answer wrong, every revision right
        sid = request["seed_id"]
        revising = len(request["messages"]) == 4
        return distinct_text(f"{sid}-{request['sample_index']}-{revising}", ref[sid] if revising else ref[sid] + "1")

    _, manifest = run_flow(RECIPE, tmp_path / "store", SETS)
    store = Store(str(tmp_path / "store"))
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model))
    revisions = store.manifest(recipe.revisions_dataset)
    export_version(store, revisions, tmp_path / "revisions")
    loaded = load_dataset(str(tmp_path / "revisions"), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == revisions["counts"]["published"] == 6  # 3 problems x 2 wrong samples
    for example in loaded:
        assert is_conversational(example) and len(example["messages"]) == 5
        text = maybe_apply_chat_template({"messages": example["messages"]}, tokenizer)["text"]
        assert text.index(example["first_completion"]) < text.index(example["feedback"]) < text.index(example["completion_text"])
    pairs = store.manifest(recipe.revision_pairs_dataset)
    export_version(store, pairs, tmp_path / "revision-pairs", fmt="jsonl")
    loaded = load_dataset(str(tmp_path / "revision-pairs"), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == 6 and all(is_conversational(e) and e["chosen"][0]["role"] == "assistant" for e in loaded)
