"""Synthesize without an engine: requests, per-sample seeds, and result rows with lineage."""

import polars as pl

from distillery.stages.synthesize import build_requests, sample_id, samples_from_results, sampling_seed
from schemas.recipe import GenerationConfig

SEEDS = pl.DataFrame(
    {"seed_id": ["a", "b"], "question": ["What is 1+1?", "What is 2+2?"], "reference_answer": ["2", "4"], "source": ["x", "x"], "source_row": [0, 1]}
)
LINEAGE = {"model": "m", "recipe_hash": "h", "code_version": "c"}


def test_requests_fan_out_with_distinct_reproducible_seeds():
    cfg = GenerationConfig(samples_per_problem=3, prompt_template="Q: {{ question }}", seed=7)
    requests = build_requests(SEEDS, cfg)
    assert len(requests) == 6
    assert requests[0]["messages"][-1] == {"role": "user", "content": "Q: What is 1+1?"}
    assert requests[0]["messages"][0]["role"] == "system"
    seeds = [r["sampling_seed"] for r in requests]
    assert len(set(seeds)) == 6
    assert seeds == [r["sampling_seed"] for r in build_requests(SEEDS, cfg)]
    assert sampling_seed(7, "a", 0) != sampling_seed(8, "a", 0)


def test_results_become_rows_and_failures_become_rejects():
    cfg = GenerationConfig(samples_per_problem=2)
    requests = build_requests(SEEDS, cfg)
    ok = {"prompt": "p", "completion": "The answer is 2", "finish_reason": "stop", "num_tokens": 5, "error": None}
    results = [ok, {**ok, "completion": "  "}, ok, {**ok, "completion": None, "error": "RuntimeError: boom", "finish_reason": "error"}]
    out = samples_from_results(SEEDS, requests, results, samples_per_problem=2, lineage=LINEAGE)
    assert out.count.as_dict() == {"stage": "synthesize", "rows_in": 2, "rows_out": 2, "fanout": 2, "dropped": {"empty_completion": 1, "generation_error": 1}}
    assert out.kept["sample_id"].to_list() == [sample_id("a", 0), sample_id("b", 0)]
    assert set(out.kept["model"]) == {"m"} and "error" not in out.kept.columns
    assert out.rejects.filter(pl.col("reason") == "generation_error")["record"][0].count("boom") == 1
