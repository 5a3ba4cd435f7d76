"""Shared by the synthesis-strategy tests: plant known model answers in the generation cache, run
a recipe through the real CLI, and check a manifest's stage chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from distillery.engine import SamplingSettings, with_resolved_dtype
from distillery.generation_cache import render, request_key
from distillery.model_setup import model_identity, resolve_model_path
from distillery.store import Store

ROOT = Path(__file__).resolve().parents[2]


class Planter:
    """Stores the engine's answer to a request in the generation cache, under the key the run
    computes (model sha256 and dtype, rendered prompt, sampling, seed): the run then gets it back
    instead of asking the engine, so a test knows what the model "said" for that request."""

    def __init__(self, store: Path, recipe) -> None:
        self.model_dir = resolve_model_path(recipe.model.path)
        engine, _ = with_resolved_dtype(recipe.engine, str(self.model_dir))  # what the run resolves "auto" to
        self.model = {"sha256": model_identity(self.model_dir)["sha256"], "dtype": engine.dtype}
        self.store = Store(str(store))

    def plant(self, request: dict, sampling: SamplingSettings, completion: str) -> None:
        key = request_key(self.model, render(str(self.model_dir), request["messages"]), sampling, request["sampling_seed"])
        entry = {"completion": completion, "finish_reason": "stop", "num_tokens": 20, "prompt_tokens": 100}
        self.store.put(f"_cache/generation/{key[:2]}/{key}.json", json.dumps(entry).encode())


def run_recipe(tmp_path: Path, recipe: str, store: Path, sets: list[str]) -> tuple[Path, dict]:
    """``distillery run RECIPE --store STORE --set ...`` (embedded Prefect, local Ray, CPU vLLM);
    the published version's folder and manifest."""
    cmd = [sys.executable, "-m", "distillery.cli", "run", recipe, "--store", str(store)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    return uri, json.loads((uri / "manifest.json").read_text())


def check_stages(manifest: dict, first: list[str]) -> list[dict]:
    """The stages start with ``first``, each adds up, and each takes what the one before passed on."""
    stages = manifest["counts"]["stages"]
    assert [s["stage"] for s in stages[: len(first)]] == first
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    for before, after in zip(stages, stages[1:]):
        assert before["rows_out"] == after["rows_in"]
    return stages
