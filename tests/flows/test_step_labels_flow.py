"""Step labels through the real ``synthesize`` flow (scripted generator, fast tier): one-step
problems whose samples are three steps long, the second step wrong in half of them; the
rollouts go through the generation cache and the labels are published as their own version."""

import json
from pathlib import Path

import polars as pl
import pytest

from distillery.stages.ingest import ingest_seeds
from distillery.formats import export_version
from distillery.store import Store
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow

RECIPE = "recipes/rewards-best-of-n.yaml"
BASE = ["seeds.builtin.count=4", "score.method=none", "select.policy=all", "select.pairs.enabled=false", "generation.adaptive=null",
        "generation.samples_per_problem=2", "verify.keep=all", "quality.require_final_answer=false", "process_supervision.enabled=true",
        "process_supervision.rollouts=2"]  # fmt: skip


@pytest.mark.parametrize("method", ["per_step", "binary_search"])
def test_a_run_publishes_step_labels_whose_counts_and_rollouts_add_up(scripted, tmp_path, method):
    sets = [*BASE, f"process_supervision.method={method}"]
    recipe = load_recipe(ROOT / RECIPE, overrides=sets)
    seeds = ingest_seeds(recipe.seeds).kept
    reference = dict(zip(seeds["seed_id"].to_list(), seeds["reference_answer"].to_list(), strict=True))

    @scripted.rule
    def answer(request, sampling):
        ref, sid = reference[request["seed_id"]], request["seed_id"]
        prefix = request.get("response_prefix", "")
        if not prefix:  # a sample: sample 0 right, sample 1 wrong from its second step on
            k = request["sample_index"]
            second = "Then I add the numbers." if k == 0 else "Then I subtract them by mistake."
            return f"First I read {sid}, sample {k}.\n{second}\nThe answer is {ref if k == 0 else ref + '0'}"
        wrong = "by mistake" in prefix  # a continuation after the wrong step stays wrong
        return f"So the answer is {ref + '0' if wrong else ref}"

    uri, manifest = run_flow(RECIPE, tmp_path / "store", sets)
    steps_uri = manifest["companions"]["process_supervision"]
    steps_manifest = json.loads((Path(steps_uri) / "manifest.json").read_text())
    assert steps_manifest["kind"] == "process-supervision"
    (count,) = check_stages(steps_manifest, ["step_label"])
    rows = pl.read_parquet(f"{steps_uri}/data").sort("sample_id")
    assert count["rows_in"] == 8 and count["rows_out"] == rows.height == 8 and count["dropped"] == {}
    for row in rows.iter_rows(named=True):
        right = row["sample_id"].endswith("s000")
        assert row["completions"][1].startswith("Then I add" if right else "Then I subtract")
        assert row["labels"] == ([True, True, True] if right else [True, False, False])
        assert row["first_wrong_step"] == (None if right else 2)
        assert row["prompt_messages"][-1]["content"] == row["prompt"]
    # rollouts: per step, 2 prefixes x 2 of every solution; binary search, the wrong ones only
    # (3 steps: prefix 2, then prefix 1), none for a correct solution
    expected = 8 * 2 * 2 if method == "per_step" else 4 * 2 * 2
    assert rows["rollouts"].sum() == steps_manifest["stats"]["rollouts_total"] == expected
    rollouts = [r for r in scripted.requests if r.get("response_prefix")]
    assert len(rollouts) == expected
    assert manifest["stats"]["generation_cache"]["misses"] == 8 + expected  # through the cache
    assert manifest["companions"]["process_supervision"].endswith("rewards-best-of-n-steps/v0001")

    # exported, it is TRL's stepwise-supervision layout, and datasets opens it as it is
    from datasets import load_dataset  # here: seconds to import, and every xdist worker collects this module

    out = tmp_path / "steps-export"
    export_version(Store(str(tmp_path / "store")), steps_manifest, out, fmt="jsonl")
    loaded = load_dataset(str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == 8
    by_id = {r["sample_id"]: r for r in rows.iter_rows(named=True)}
    for example in loaded:
        assert (example["prompt"], example["completions"], example["labels"]) == tuple(by_id[example["sample_id"]][k] for k in ("prompt", "completions", "labels"))


@pytest.mark.slow
def test_the_real_engine_labels_steps_of_one_step_problems(shared_prefect, tmp_path):
    """``distillery run`` with the real vLLM engine: the rollouts continue the model's own
    solutions from their prefixes (a response prefix), and the counts of the version add up."""
    import os
    import subprocess
    import sys

    store = tmp_path / "store"
    sets = ["seeds.builtin.count=3", "score.method=none", "select.policy=all", "select.pairs.enabled=false", "generation.adaptive=null",
            "generation.samples_per_problem=2", "generation.max_tokens=64", "verify.keep=all", "quality.require_final_answer=false",
            "quality.drop_truncated=false", "process_supervision.enabled=true", "process_supervision.method=per_step",
            "process_supervision.rollouts=2", "process_supervision.max_tokens=32"]  # fmt: skip
    cmd = [sys.executable, "-m", "distillery.cli", "run", RECIPE, "--store", str(store)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    steps_manifest = json.loads((Path(manifest["companions"]["process_supervision"]) / "manifest.json").read_text())
    (count,) = check_stages(steps_manifest, ["step_label"])
    assert count["rows_in"] == 6 == steps_manifest["counts"]["input"]  # every sample verify kept
    rows = pl.read_parquet(f"{manifest['companions']['process_supervision']}/data")
    assert rows.height == count["rows_out"] == steps_manifest["counts"]["published"] > 0
    for row in rows.iter_rows(named=True):
        n = len(row["completions"])
        assert len(row["labels"]) == len(row["soft_labels"]) == n
        assert row["rollouts"] == 2 * (n - 1)  # per step: every prefix but the whole solution
        assert row["labels"][-1] == row["correct"] and all(0.0 <= v <= 1.0 for v in row["soft_labels"])
    assert rows["rollouts"].sum() == steps_manifest["stats"]["rollouts_total"]
    cache = manifest["stats"]["generation_cache"]
    assert cache["misses"] == 6 + steps_manifest["stats"]["rollouts_total"]  # the rollouts went through the cache
