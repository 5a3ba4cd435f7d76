"""Shared by the flow tests of the fast tier: run a recipe through the real ``synthesize`` flow
in-process (with the engine pool the test installed: the ``scripted`` fixture,
tests/scripted.py), and check a manifest's stage chain."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_flow(recipe_path: str, store: Path, sets: list[str]) -> tuple[Path, dict]:
    """The ``synthesize`` flow in this process (what ``distillery run`` calls) on
    ``recipe_path`` with ``sets`` (``--set`` overrides); the published version's folder and
    manifest."""
    from flows.synthesize import synthesize
    from schemas.recipe import load_recipe

    uri = Path(synthesize(load_recipe(ROOT / recipe_path, overrides=sets), store=str(store)))
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
