"""The generation request cache with the real engine: a rerun that only edits a later stage asks
the engines for nothing (they do not even start) and publishes the same samples; an edited prompt
template regenerates every request. Slow (about three minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
BASE = ["seeds.builtin.count=3", "generation.samples_per_problem=2", "generation.max_tokens=48", "verify.keep=all", "quality.drop_truncated=false", "quality.require_final_answer=false"]


def _run(tmp: Path, store: Path, *sets: str) -> tuple[dict, pl.DataFrame, str]:
    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/default.yaml", "--store", str(store)]
    for s in [*BASE, *sets]:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    return json.loads((uri / "manifest.json").read_text()), pl.read_parquet(uri / "data"), out.stderr


def test_downstream_edits_reuse_generations_and_prompt_edits_do_not(tmp_path):
    store = tmp_path / "store"
    first, rows, _ = _run(tmp_path, store)
    assert first["stats"]["generation_cache"] == {"hits": 0, "misses": 6}
    assert rows.height > 0
    # a later stage changed (a quality filter): every request comes from the cache, no engine starts
    second, again, log = _run(tmp_path, store, "quality.min_chars=5")
    assert second["recipe_hash"] != first["recipe_hash"]
    assert second["stats"]["generation_cache"] == {"hits": 6, "misses": 0}
    assert "engines: " not in log  # the vLLM actors never started
    same = rows.select("sample_id", "completion", "num_tokens").sort("sample_id")
    assert again.select("sample_id", "completion", "num_tokens").sort("sample_id").equals(same)
    # the prompt template changed: a new rendered prompt, so every request is generated again
    third, _, _ = _run(tmp_path, store, "generation.prompt_template='Question: {{ question }}'")
    assert third["stats"]["generation_cache"] == {"hits": 0, "misses": 6}
    cached = list((store / "_cache" / "generation").rglob("*.json"))
    assert len(cached) == 12  # two prompt templates x 6 requests, nothing thrown away
