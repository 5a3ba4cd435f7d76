"""The generation request cache through the real ``synthesize`` flow, in-process (fast tier:
seconds, no vLLM): a rerun that only edits a later stage asks the engines for nothing (the real
``EnginePool`` is built but never starts an engine) and publishes the same samples; an edited
prompt template regenerates every request. The first and third runs generate with a scripted
generator (tests/scripted.py) under the real ``CachedGenerator``, so the keys are the real ones
(the model's sha256 and dtype, the prompt rendered by the model's chat template, sampling, seed).
"""

import json

import polars as pl
import pytest

import flows.sampling
import flows.synthesize
from distillery.engine import EnginePool
from tests.flows.strategy_helpers import check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/default.yaml"
BASE = ["seeds.builtin.count=3", "generation.samples_per_problem=2", "generation.max_tokens=48", "verify.keep=all", "quality.drop_truncated=false", "quality.require_final_answer=false"]


class MustNotStart:
    """Stands in for ``VLLMEngine`` (its methods) in a run that must not start one: starting it
    fails the run."""

    def __init__(self, *args, **kwargs) -> None:
        raise AssertionError("an engine was started although every request was cached")

    def render(self, messages):  # never reached
        raise NotImplementedError

    def generate(self, requests, sampling):  # never reached
        raise NotImplementedError


def _read(uri) -> pl.DataFrame:
    return pl.read_parquet(uri / "data").select("sample_id", "completion", "num_tokens").sort("sample_id")


def test_downstream_edits_reuse_generations_and_prompt_edits_do_not(scripted, tmp_path, monkeypatch):
    store = tmp_path / "store"
    scripted.default = lambda request, sampling: distinct_text(f"{request['seed_id']}-{request['sample_index']}", "7")
    uri, first = run_flow(RECIPE, store, BASE)
    assert first["stats"]["generation_cache"] == {"hits": 0, "misses": 6} and len(scripted.requests) == 6
    rows = _read(uri)
    assert rows.height == 6
    check_stages(first, ["ingest", "synthesize", "verify"])

    # a later stage changed (a quality filter): every request comes from the cache, and the real
    # engine pool the run builds never starts an engine (its engine class would fail the run)
    pools: list[EnginePool] = []

    def real_pool(model_path, engine, seed=0):
        pools.append(EnginePool(model_path, engine, seed=seed, engine_cls=MustNotStart))
        return pools[-1]

    with monkeypatch.context() as m:
        m.setattr(flows.synthesize, "ENGINE_POOL_FACTORY", real_pool)
        again_uri, second = run_flow(RECIPE, store, [*BASE, "quality.min_chars=5"])
    assert second["recipe_hash"] != first["recipe_hash"]
    assert second["stats"]["generation_cache"] == {"hits": 6, "misses": 0}
    (pool,) = pools
    assert pool.actors == [] and pool.started_in is None and pool.placement_group is None
    assert second["stats"]["engine_failures"] == 0
    assert _read(again_uri).equals(rows)
    assert len(scripted.requests) == 6  # nothing more reached the scripted engine either

    # the prompt template changed: a new rendered prompt, so every request is generated again
    third_uri, third = run_flow(RECIPE, store, [*BASE, "generation.prompt_template='Question: {{ question }}'"])
    assert third["stats"]["generation_cache"] == {"hits": 0, "misses": 6} and len(scripted.requests) == 12
    assert {r["messages"][-1]["content"] for r in scripted.requests[6:]} == set(pl.read_parquet(third_uri / "data")["question"].map_elements(lambda q: f"Question: {q}", return_dtype=pl.Utf8))
    cached = list((store / "_cache" / "generation").rglob("*.json"))
    assert len(cached) == 12  # two prompt templates x 6 requests, nothing thrown away
    entry = json.loads(cached[0].read_text())
    assert set(entry) == {"completion", "finish_reason", "num_tokens", "prompt_tokens", "batch"}


def test_a_cached_run_with_a_missing_answer_does_start_the_pool(scripted, tmp_path, monkeypatch):
    """The other side of the check above: the stand-in engine does fail a run that needs one."""
    store = tmp_path / "store"
    monkeypatch.setattr(flows.synthesize, "ENGINE_POOL_FACTORY", lambda model_path, engine, seed=0: EnginePool(model_path, engine, seed=seed, engine_cls=MustNotStart))
    monkeypatch.setattr(flows.sampling, "synthesize_shard", flows.sampling.synthesize_shard.with_options(retries=0))  # fail at once
    with pytest.raises(Exception, match="an engine was started"):
        run_flow(RECIPE, store, [*BASE, "seeds.builtin.count=1", "generation.samples_per_problem=1"])
