"""Formats trainers read: versions that the real ``synthesize`` flow publishes (scripted generator,
fast tier) carry their conversations; ``distillery export`` writes folders that the real
``datasets.load_dataset`` opens as they are, whose rows TRL's own data utilities take as
conversational and template with the embedded model's tokenizer; DuckDB queries the published
Parquet in place; the train/test split is by problem."""

import json
import subprocess
import sys

import polars as pl
import pytest
import yaml

from distillery.formats import ExportError, export_version, split_of
from distillery.stages.ingest import ingest_seeds
from distillery.stages.synthesize import build_messages
from distillery.store import Store
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/rewards-best-of-n.yaml"
SETS = [
    "seeds.builtin.count=8",
    "score.method=majority_vote",
    "generation.adaptive=null",
    "publish.license=cc-by-4.0",
    "publish.test_share=0.5",
]


@pytest.fixture
def published(scripted, tmp_path):
    """An SFT version and its preference pairs: half of each problem's samples right, half wrong."""
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    reference = dict(zip(seeds["seed_id"].to_list(), seeds["reference_answer"].to_list(), strict=True))

    @scripted.rule
    def sample_with_answers(request, sampling):
        right = request["sample_index"] % 2 == 0
        answer = reference[request["seed_id"]] if right else reference[request["seed_id"]] + "1"
        return distinct_text(f"{request['seed_id']}-{request['sample_index']}", answer)

    store = tmp_path / "store"
    uri, manifest = run_flow(RECIPE, store, SETS)
    pairs_uri = manifest["companions"]["preference_pairs"]
    return recipe, Store(str(store)), manifest, Store(str(store)).manifest(recipe.pairs_dataset), uri, pairs_uri


def test_published_rows_carry_their_conversation_and_split(published):
    recipe, store, manifest, pairs_manifest, uri, _ = published
    rows = pl.read_parquet(uri / "data")
    assert rows.height == manifest["counts"]["published"] > 0
    for row in rows.iter_rows(named=True):
        sent = build_messages(row["question"], recipe.generation)
        assert row["messages"] == [*sent, {"role": "assistant", "content": row["completion"]}]
    assert rows["messages"].list.first().struct.field("content").unique().to_list() == [recipe.generation.system_prompt]
    # the split is by problem, from a hash: a problem's rows on one side, the same as split_of says
    by_seed = rows.group_by("seed_id").agg(pl.col("split").unique())
    assert by_seed["split"].list.len().max() == 1
    assert rows["split"].to_list() == split_of(rows["seed_id"].to_list(), 0.5)
    pairs = pl.read_parquet(store.uri(f"{pairs_manifest['dataset']}/{pairs_manifest['version']}/data"))
    assert pairs.height > 0
    for row in pairs.iter_rows(named=True):
        assert row["prompt_messages"] == build_messages(row["prompt"], recipe.generation)
    assert pairs["split"].to_list() == split_of(pairs["seed_id"].to_list(), 0.5)


def test_duckdb_reads_a_published_version_in_place(published):
    import duckdb

    _, _, manifest, _, uri, _ = published
    data = str(uri / "data" / "*.parquet")
    n, problems, same = duckdb.sql(
        f"SELECT count(*), count(DISTINCT seed_id), bool_and(messages[len(messages)].content = completion) FROM read_parquet('{data}')"
    ).fetchall()[0]
    assert n == manifest["counts"]["published"] and same is True
    assert problems == pl.read_parquet(uri / "data")["seed_id"].n_unique()


def test_an_sft_export_loads_with_datasets_and_templates_with_trl(published, tmp_path, embedded_model):
    # imported here, not at the top: datasets, transformers and trl take seconds to import, and
    # every xdist worker collects this module, most without running it
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    recipe, store, manifest, _, uri, _ = published
    out = tmp_path / "sft-export"
    exported = export_version(store, manifest, out)  # the version's own split (publish.test_share)
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    rows = pl.read_parquet(uri / "data")
    assert {s: loaded[s].num_rows for s in loaded} == exported.rows == {s: rows.filter(pl.col("split") == s).height for s in ("train", "test") if rows.filter(pl.col("split") == s).height}
    assert set(loaded["train"]["seed_id"]).isdisjoint(loaded["test"]["seed_id"])
    # TRL's names hold only conversations (a `prompt` string would make TRL read prompt-completion rows)
    assert {"messages", "prompt_text", "completion_text"} <= set(loaded["train"].column_names)
    assert not {"prompt", "completion"} & set(loaded["train"].column_names)
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model))
    for split in loaded:
        for example in loaded[split]:
            assert is_conversational(example)
            text = maybe_apply_chat_template({"messages": example["messages"]}, tokenizer)["text"]
            assert recipe.generation.system_prompt in text and example["completion_text"] in text
            # the template the model was sent is the one the trainer renders (no double templating)
            assert text.startswith(example["prompt_text"])
    card = (out / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "cc-by-4.0" and header["size_categories"] == ["n<1K"]
    assert [f["split"] for f in header["configs"][0]["data_files"]] == sorted(exported.rows, key=("train", "test").index)
    for plot in manifest["plots"]:
        assert (out / plot["path"]).read_bytes() == store.get(f"{manifest['dataset']}/{manifest['version']}/{plot['path']}")
        assert f"]({plot['path']})" in card
    assert json.loads((out / "export.json").read_text())["rows"] == exported.rows


def test_a_pairs_export_in_jsonl_loads_as_dpo_rows(published, tmp_path, embedded_model):
    # imported here, not at the top: datasets, transformers and trl take seconds to import, and
    # every xdist worker collects this module, most without running it
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    recipe, store, _, pairs_manifest, _, pairs_uri = published
    out = tmp_path / "pairs-export"
    # through the CLI: STORE/NAME (the latest version), a split of its own
    done = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "export", pairs_uri.rsplit("/", 1)[0], "--out", str(out), "--format", "jsonl", "--test-share", "0.3"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out)
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "hf"))
    pairs = pl.read_parquet(store.uri(f"{pairs_manifest['dataset']}/{pairs_manifest['version']}/data"))
    assert sum(loaded[s].num_rows for s in loaded) == pairs.height
    expected_test = {sid for sid, side in zip(pairs["seed_id"], split_of(pairs["seed_id"].to_list(), 0.3), strict=True) if side == "test"}
    assert set(loaded["test"]["seed_id"] if "test" in loaded else []) == expected_test
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model))
    for split in loaded:
        for example in loaded[split]:
            assert is_conversational(example)
            assert example["prompt"] == build_messages(example["prompt_text"], recipe.generation)
            assert example["chosen"] == [{"role": "assistant", "content": example["chosen_text"]}]
            templated = maybe_apply_chat_template({k: example[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
            assert example["chosen_text"] in templated["chosen"] and example["rejected_text"] in templated["rejected"]
            assert recipe.generation.system_prompt in templated["prompt"]


def test_export_refuses_what_it_cannot_write(published, tmp_path):
    _, store, manifest, _, _, _ = published
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty folder"):
        export_version(store, manifest, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]  # untouched
    with pytest.raises(ExportError, match="--format 'csv'"):
        export_version(store, manifest, tmp_path / "a", fmt="csv")
    with pytest.raises(ExportError, match="--test-share 1.0"):
        export_version(store, manifest, tmp_path / "b", test_share=1.0)
    with pytest.raises(ExportError, match="is a reward model"):
        export_version(store, {**manifest, "kind": "reward-model"}, tmp_path / "c")
    with pytest.raises(ExportError, match="plot path"):
        export_version(store, {**manifest, "plots": [{"path": "../../etc/passwd"}]}, tmp_path / "d")
    assert not any(p.name.startswith((".a", ".b", ".c", ".d", "a", "b", "c", "d")) for p in tmp_path.iterdir())  # nothing half-written
