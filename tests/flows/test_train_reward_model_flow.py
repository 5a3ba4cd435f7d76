"""The ``train_reward_model`` flow on a small samples version built from real GSM8K problems:
the reference solution is a correct sample, the same solution with its final number changed an
incorrect one. Embedded Prefect, transformers on CPU; no vLLM, no Ray.

The tests on the trained model are slow (about 35 s on 2 idle cores, over a minute on a busy
machine: the features of 24 GSM8K chats, the Prefect server, a 540 MB classifier folder);
the clear error on too few usable problems is not.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from distillery.accounting import StageCount, empty_rejects
from distillery.stages.publish import publish_version, read_shards
from distillery.store import Store
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[2]
N_MIXED = 12


def _corrupt(solution: str, k: int) -> str:
    """The same worked solution with a wrong final answer."""
    head, final = solution.rsplit("#### ", 1)
    wrong = int(float(final.replace(",", "").strip())) + 1 + k % 5
    return f"{head}#### {wrong}"


def _sample(seed_id: str, index: int, question: str, completion: str, correct: bool | None) -> dict:
    final = completion.rsplit("#### ", 1)[-1].strip()
    return {
        "sample_id": f"{seed_id}-{index}",
        "seed_id": seed_id,
        "sample_index": index,
        "question": question,
        "prompt": question,
        "completion": re.sub(r"<<[^>]*>>", "", completion),  # without GSM8K's calculator notes
        "reference_answer": final,
        "predicted_answer": final,
        "answer_source": "hashes",
        "correct": correct,
        "finish_reason": "stop",
        "num_tokens": len(completion.split()),
        "sampling_seed": index,
        "model": "reference",
        "recipe_hash": "h",
        "code_version": "c",
        "source": "gsm8k/train.jsonl",
    }


def samples_frame() -> pl.DataFrame:
    problems = [json.loads(line) for line in (DATA / "gsm8k/train.jsonl").read_text().splitlines()[: N_MIXED + 2]]
    rows = []
    for k, p in enumerate(problems[:N_MIXED]):  # both classes: these train the head
        rows.append(_sample(f"gsm-{k:02d}", 0, p["question"], p["answer"], True))
        rows.append(_sample(f"gsm-{k:02d}", 1, p["question"], _corrupt(p["answer"], k), False))
    rows.append(_sample("gsm-00", 2, problems[0]["question"], problems[0]["answer"], None))  # no label
    easy = problems[N_MIXED]  # only correct samples: nothing to contrast
    rows += [_sample("gsm-easy", i, easy["question"], easy["answer"], True) for i in range(2)]
    hard = problems[N_MIXED + 1]  # only wrong samples
    rows.append(_sample("gsm-hard", 0, hard["question"], _corrupt(hard["answer"], 0), False))
    return pl.DataFrame(rows, schema_overrides={"correct": pl.Boolean})


def publish_samples(store: Store, rows: pl.DataFrame, name: str = "gsm-samples") -> str:
    meta = {"recipe": {"name": "test"}, "recipe_hash": "h", "code_version": "c", "generator": {"model": "reference"}, "parents": [], "flow_run_id": "r"}
    return publish_version(
        store, name, rows, empty_rejects(), input_rows=rows.height, stages=[StageCount("ingest", rows.height, rows.height)], run_id="r", metadata=meta, shard_rows=10
    ).uri


@pytest.fixture(scope="module")
def base():
    from distillery.model_setup import ModelNotFound, resolve_model_path

    try:
        return resolve_model_path("embedded")
    except ModelNotFound as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def trained(in_process_prefect, base, tmp_path_factory):
    from flows.train_reward_model import train_reward_model

    tmp = tmp_path_factory.mktemp("rm")
    store = Store(str(tmp / "store"))
    rows = samples_frame()
    input_uri = publish_samples(store, rows)
    # float32: the test below compares the published logits with a float32 classifier's
    uri = train_reward_model(input_uri, "gsm-rm", store=store.root, heldout_fraction=0.25, seed=0, dtype="float32")
    return {"uri": uri, "input_uri": input_uri, "rows": rows, "store": store, "manifest": store.manifest("gsm-rm"), "tmp": tmp}


@pytest.mark.slow
def test_the_artifact_is_a_complete_reward_model_version(trained):
    m = trained["manifest"]
    assert trained["uri"] == trained["store"].uri("gsm-rm/v0001")
    assert m["kind"] == "reward-model" and m["dataset"] == "gsm-rm" and m["version"] == "v0001"
    for key in ("created_at", "schema_version", "base_model", "training_data", "split", "metrics", "hyperparameters", "code_version", "flow_run_id", "counts", "shards", "parents", "recipe", "recipe_hash"):
        assert key in m, key
    assert m["training_data"] == {**m["training_data"], "uri": trained["input_uri"], "dataset": "gsm-samples", "version": "v0001"}
    assert m["base_model"]["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and len(m["base_model"]["sha256"]) == 64
    head = Path(trained["uri"]) / m["model"]["head"]["path"]
    assert head.stat().st_size == m["model"]["head"]["bytes"] < 10_000  # the head only, not the base weights
    files = sorted(p.relative_to(trained["uri"]).as_posix() for p in Path(trained["uri"]).rglob("*") if p.is_file())
    assert all(not f.endswith(".safetensors") or f == "model/score_head.safetensors" for f in files)
    assert m["hyperparameters"]["l2"] == 1e-2 and m["hyperparameters"]["seed"] == 0


@pytest.mark.slow
def test_counts_add_up_and_every_unused_row_has_a_reason(trained):
    m, rows = trained["manifest"], trained["rows"]
    counts = m["counts"]
    assert counts["input"] == rows.height == 2 * N_MIXED + 4
    stages = counts["stages"]
    assert [s["stage"] for s in stages] == ["ingest", "select_examples"]
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    assert stages[0]["rows_out"] == stages[1]["rows_in"] and stages[-1]["rows_out"] == counts["published"] == 2 * N_MIXED
    assert stages[1]["dropped"] == {"unlabeled": 1, "problem_all_correct": 2, "problem_all_incorrect": 1}
    rejects = read_shards(trained["store"], m, "reject_shards")
    assert counts["rejected"] == rejects.height == 4
    assert sorted(rejects["sample_id"]) == ["gsm-00-2", "gsm-easy-0", "gsm-easy-1", "gsm-hard-0"]
    examples = read_shards(trained["store"], m)
    assert examples.height == counts["published"] and examples["sample_id"].n_unique() == examples.height
    split = m["split"]
    assert split["problems"]["train"] + split["problems"]["heldout"] == N_MIXED and split["problems"]["heldout"] == 3
    assert split["examples"]["heldout"] == {"pos": 3, "neg": 3} and split["examples"]["train"] == {"pos": 9, "neg": 9}
    heldout_problems = set(examples.filter(pl.col("split") == "heldout")["seed_id"])
    assert len(heldout_problems) == 3 and not heldout_problems & set(examples.filter(pl.col("split") == "train")["seed_id"])
    assert m["stats"]["problems_used"] == N_MIXED and m["stats"]["problems_skipped_all_correct"] == 1


@pytest.mark.slow
def test_metrics_are_recorded(trained):
    metrics = trained["manifest"]["metrics"]
    assert metrics["n"] == 2 * N_MIXED and metrics["n_train"] == 18 and metrics["n_heldout"] == 6
    assert 0.0 <= metrics["auc_heldout"] <= 1.0 and 0.0 <= metrics["auc_train"] <= 1.0
    examples = read_shards(trained["store"], trained["manifest"])
    from distillery.stages.reward_training import roc_auc

    heldout = examples.filter(pl.col("split") == "heldout")
    assert roc_auc(heldout["logit"].to_numpy(), heldout["correct"].to_numpy()) == pytest.approx(metrics["auc_heldout"])
    np.testing.assert_allclose(examples["reward"].to_numpy(), 1 / (1 + np.exp(-examples["logit"].to_numpy())))
    print(f"AUC train {metrics['auc_train']}, held-out {metrics['auc_heldout']}")


@pytest.mark.slow
def test_materialized_model_scores_like_its_features(trained, base, monkeypatch):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distillery.model_setup import materialize_reward_model
    from distillery.stages.reward_training import head_from_bytes, last_token_features, render_texts

    monkeypatch.setenv("DISTILLERY_CACHE", str(trained["tmp"] / "cache"))
    name_only = str(Path(trained["uri"]).parent)  # STORE/NAME: the latest version
    folder = materialize_reward_model(name_only, base_model=str(base))
    assert folder.parent == trained["tmp"] / "cache" / "reward_models" and folder.name.startswith("gsm-rm-v0001-")
    assert materialize_reward_model(trained["uri"], base_model=str(base)) == folder  # built once
    assert json.loads((folder / "distillery_model.json").read_text())["head_sha256"] == trained["manifest"]["model"]["head"]["sha256"]

    rows = trained["rows"].filter(pl.col("seed_id").is_in(["gsm-01", "gsm-easy"]))
    features = last_token_features(base, rows["question"].to_list(), rows["completion"].to_list(), batch_size=4)
    weight = head_from_bytes((Path(trained["uri"]) / "model/score_head.safetensors").read_bytes())
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.inference_mode():
        logits = [model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in render_texts(tokenizer, rows["question"], rows["completion"])]
    np.testing.assert_allclose(logits, features @ weight, atol=2e-3)
    published = read_shards(trained["store"], trained["manifest"]).filter(pl.col("seed_id") == "gsm-01").sort("sample_id")
    np.testing.assert_allclose(published["logit"].to_numpy(), np.array(logits[:2]), atol=2e-3)
    shutil.rmtree(folder)  # 540 MB


@pytest.mark.slow
def test_datasets_list_show_and_diff_work_on_it(trained):
    root = trained["store"].root

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "distillery.cli", "datasets", "--store", root, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)

    listing = cli("list")
    assert listing.returncode == 0, listing.stderr
    assert "gsm-rm" in listing.stdout and "gsm-samples" in listing.stdout
    shown = cli("show", "gsm-rm")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# gsm-rm v0001 (reward model)") and "| held-out | 3 | 3 | 3 |" in shown.stdout
    assert "select_examples" in shown.stdout and (Path(trained["uri"]) / "card.md").read_text().strip() == shown.stdout.strip()
    as_json = cli("show", "gsm-rm", "--json")
    assert json.loads(as_json.stdout)["kind"] == "reward-model"
    diff = cli("diff", "gsm-rm", "v0001", "v0001")
    assert diff.returncode == 0 and "rows: 24 -> 24 (+0 added, -0 removed, 24 in both)" in diff.stdout, diff.stderr


def test_too_few_usable_problems_is_a_clear_error(in_process_prefect, base, tmp_path):
    from flows.train_reward_model import train_reward_model

    store = Store(str(tmp_path / "store"))
    rows = samples_frame().filter(~pl.col("seed_id").is_in([f"gsm-{k:02d}" for k in range(1, N_MIXED)]))  # one mixed problem left
    uri = publish_samples(store, rows)
    with pytest.raises(ValueError, match=r"1 problem\(s\) with both correct and incorrect samples.*verify.keep=all"):
        train_reward_model(uri, "rm", store=store.root)
    assert not (tmp_path / "store/rm").exists()
