"""Every synthesis strategy and the judge on the served backend (``model.backend: openai``): the
real ``synthesize`` flow, in-process, with its ``ServedModel`` talking HTTP to a scripted
OpenAI-compatible endpoint on 127.0.0.1 (tests/openai_endpoint.py; fast tier: no vLLM). The
strategies build their requests and parse the answers as on the vLLM engines; the judge's and
the syllabus's constraints go out as ``structured_outputs``; every request the flow made reached
the endpoint once, and the manifest counts it. (tests/flows/test_served_backend.py runs a real
``vllm serve``.)"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import polars as pl
import pytest

from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.openai_endpoint import Endpoint, question_of
from tests.scripted import distinct_text

CASES = {  # recipe, its first stages, its own settings
    "evol-instruct": ("recipes/evol-instruct.yaml", ["ingest", "evolve-1"], ["seeds.builtin.count=3", "evolve.rounds=1"]),
    "self-instruct": ("recipes/self-instruct.yaml", ["ingest", "self-instruct"], ["seeds.builtin.count=3", "verify.keep=all"]),
    "glan": ("recipes/glan.yaml", ["ingest", "syllabus", "questions"], ["glan.sessions=2", "glan.per_session=1"]),
    "difficulty": ("recipes/difficulty.yaml", ["ingest", "probe"], ["seeds.builtin.count=3"]),
}


def answer(body: dict) -> str:
    """The endpoint's reply: held to its constraint when the request carries one (the judge's
    score, the syllabus's numbered lines), else a distinct text that ends in an answer (a
    rewrite, a new task, a homework problem and a solution alike)."""
    regex = (body.get("structured_outputs") or {}).get("regex")
    if regex and regex.endswith("(10|[1-9])"):
        return " 8"  # after the response prefix "Score:"
    if regex:  # N numbered lines
        return "\n".join(f"{k}. Session {k} on counting and sums" for k in range(1, regex.count(r"\. ") + 1))
    key = json.dumps([question_of(body), body.get("seed"), body.get("temperature")])
    return "Ben has 4 bags of 3 marbles. " + distinct_text(key, "12", words=14)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_strategy_and_the_judge_run_on_a_served_model(case, in_process_prefect, session_ray, embedded_model, monkeypatch, tmp_path):
    recipe, first, own = CASES[case]
    monkeypatch.chdir(ROOT)  # the recipes' relative paths (a taxonomy) resolve as for the CLI
    endpoint = Endpoint(answer=answer)
    sets = [
        "model.backend=openai", f"model.base_url={endpoint.url}", "model.name=m", "model.max_retries=0",
        "generation.samples_per_problem=2", "generation.max_tokens=64",
        "score.method=judge", "select.policy=all", "quality.require_final_answer=false", "quality.drop_truncated=false", *own,
    ]
    try:
        uri, manifest = run_flow(recipe, tmp_path / "store", sets)
    finally:
        endpoint.shutdown()

    assert manifest["generator"]["engine"] == "openai-endpoint"
    assert manifest["generator"]["endpoint"]["name"] == "m"
    check_stages(manifest, first)
    usage = manifest["stats"]["endpoint_usage"]
    bodies = [seen["body"] for seen in endpoint.seen]
    assert usage["errors"] == 0 and usage["done"] == len(bodies) == manifest["stats"]["generation_cache"]["misses"]
    assert all(b["model"] == "m" for b in bodies)

    judged = [b for b in bodies if b.get("messages", [{}])[-1].get("content") == "Score:"]
    assert judged and all(b["structured_outputs"] == {"regex": " ?(10|[1-9])"} and b["continue_final_message"] for b in judged)
    score = next(s for s in manifest["counts"]["stages"] if s["stage"] == "score")
    assert "judge_unparseable" not in score["dropped"] and score["rows_out"] > 0
    rows = pl.read_parquet(uri / "data")
    assert rows.height == manifest["counts"]["published"] > 0
    assert set(rows["judge_score"].to_list()) == {8.0} and set(rows["reward_source"].to_list()) == {"judge"}
    if case == "glan":  # the syllabus constraint went out with the request, and every session was listed
        syllabi = [b for b in bodies if "regex" in (b.get("structured_outputs") or {}) and b not in judged]
        assert syllabi and all(b["structured_outputs"]["regex"].count(r"\. ") == 2 for b in syllabi)
        syllabus = next(s for s in manifest["counts"]["stages"] if s["stage"] == "syllabus")
        assert syllabus["dropped"] == {} and syllabus["rows_out"] == syllabus["rows_in"] * 2


def _arithmetic_answer(body: dict) -> str:
    """The rewards loop's endpoint: a judge request gets a score drawn from its text; a one-step
    problem (``What is 7 + 5?``) a chain of thought that is right for about half the seeds and off
    by one for the rest, so a problem's samples are both right and wrong as reward data needs."""
    text = question_of(body)
    digest = hashlib.sha256(json.dumps([text, body.get("seed")]).encode()).digest()
    if body.get("messages", [{}])[-1].get("content") == "Score:":
        return f" {1 + digest[0] % 10}"
    a, op, b = re.search(r"What is (\d+) ([+-]) (\d+)\?", text).groups()
    value = int(a) + int(b) if op == "+" else int(a) - int(b)
    return distinct_text(json.dumps([text, body.get("seed")]), str(value if digest[1] % 2 else value + 1), words=14)


def test_the_rewards_loop_runs_on_a_served_model(in_process_prefect, session_ray, embedded_model, monkeypatch, tmp_path):
    """recipes/rewards-best-of-n.yaml with ``model.backend: openai``: adaptive rounds (a problem's
    second round goes out only when its first has fewer than 2 verified), the judge's scores as the
    reward over the same endpoint, best-of-N (correct first, then reward) and preference pairs. (A
    trained reward model scores on the local pooling engine whatever the generation backend:
    tests/flows/test_rewards_flow.py.)"""
    monkeypatch.chdir(ROOT)
    endpoint = Endpoint(answer=_arithmetic_answer)
    sets = [
        "model.backend=openai", f"model.base_url={endpoint.url}", "model.name=m", "model.max_retries=0",
        "seeds.builtin.count=6", "score.method=judge",
    ]
    try:
        uri, manifest = run_flow("recipes/rewards-best-of-n.yaml", tmp_path / "store", sets)
    finally:
        endpoint.shutdown()

    assert manifest["generator"]["engine"] == "openai-endpoint"
    stages = check_stages(manifest, ["ingest", "synthesize", "verify", "score", "quality", "dedup", "select"])
    bodies = [seen["body"] for seen in endpoint.seen]
    usage = manifest["stats"]["endpoint_usage"]
    assert usage["errors"] == 0 and usage["done"] == len(bodies) == manifest["stats"]["generation_cache"]["misses"]
    sampling = manifest["stats"]["sampling"]
    synth = next(s for s in stages if s["stage"] == "synthesize")
    assert sampling["budget_per_problem"] == 8
    assert synth["rows_in"] * 8 - synth["dropped"].get("stopped_early", 0) == sampling["samples_spent_total"]
    asked = [b for b in bodies if b["messages"][-1]["content"] != "Score:"]
    assert len(asked) == sampling["samples_spent_total"]  # each drawn sample was one request

    rows = pl.read_parquet(uri / "data")
    rejects = pl.read_parquet(uri / "rejects")
    assert rows["seed_id"].n_unique() == rows.height == 6  # one per problem
    assert set(rows["samples_spent"].to_list()) == {4, 8}  # some problems stopped after one round, some went on
    assert set(rows["reward_source"].to_list()) == {"judge"} and rows["judge_score"].is_between(1, 10).all()
    drawn = rows.to_dicts() + [json.loads(r) for r in rejects.filter(pl.col("stage").is_in(["quality", "dedup", "select"]))["record"]]
    for row in rows.iter_rows(named=True):
        samples = [d for d in drawn if d["seed_id"] == row["seed_id"]]
        first_round = sum(bool(d["correct"]) for d in samples if d["sample_index"] < 4)
        assert row["samples_spent"] == (4 if first_round >= 2 else 8), row["seed_id"]
        assert len(samples) == row["samples_spent"]  # every drawn sample is published or rejected with a reason
        best = max((bool(d["correct"]), d["reward"]) for d in samples)
        assert (bool(row["correct"]), row["reward"]) == best  # correct first, then the judge's reward

    pairs_uri = Path(manifest["companions"]["preference_pairs"])
    pairs = pl.read_parquet(pairs_uri / "data")
    assert pairs.height > 0
    by_id = {d["sample_id"]: d for d in drawn}
    for pair in pairs.iter_rows(named=True):
        chosen, rejected = by_id[pair["chosen_sample_id"]], by_id[pair["rejected_sample_id"]]
        assert chosen["seed_id"] == rejected["seed_id"] == pair["seed_id"]
        if pair["reason"] == "label":
            assert chosen["correct"] is True and rejected["correct"] is False
        else:
            assert chosen["reward"] > rejected["reward"]
