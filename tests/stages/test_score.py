"""Scoring: judge parsing and reward columns; the real CPU vLLM engine for the pooling reward
model and the judge (those two are `slow`)."""

import math
import os
import re

import polars as pl
import pytest

from distillery.stages.score import judge_constraint, judge_requests, parse_judge_score, with_judge_scores, with_rewards

ROWS = pl.DataFrame(
    {
        "sample_id": ["a-s000", "a-s001"],
        "seed_id": ["a", "a"],
        "question": ["What is 2 + 3?", "What is 2 + 3?"],
        "completion": ["2 + 3 = 5. The answer is 5.", "2 + 3 = 6. The answer is 6."],
    }
)


@pytest.mark.parametrize(
    ("text", "score"),
    [("Score: 7", 7.0), ("I'd give it a score of 8/10.", 8.0), ("**Score:** 9", 9.0), ("Score: 3\nScore: 10", 10.0), ("no score", None), ("Score: 42", None), (None, None)],
)
def test_parse_judge_score(text, score):
    assert parse_judge_score(text) == score


def test_judge_scores_become_columns_and_unparseable_rows_rejects():
    results = [{"completion": "Correct. Score: 9"}, {"completion": "I cannot tell."}]
    out = with_judge_scores(ROWS, results)
    assert out.kept["reward"].to_list() == [0.9] and out.kept["judge_output"][0] == "Correct. Score: 9"
    assert out.count.dropped == {"judge_unparseable": 1}
    assert out.rejects["detail"][0] == "judge said: I cannot tell."


def test_judge_requests_render_the_rubric_with_stable_seeds():
    requests = judge_requests(ROWS)
    assert "2 + 3 = 6" in requests[1]["messages"][0]["content"]
    assert [r["sampling_seed"] for r in requests] == [r["sampling_seed"] for r in judge_requests(ROWS)]
    assert requests[0]["sampling_seed"] != requests[1]["sampling_seed"]


def test_rewards_are_kept_as_columns():
    out = with_rewards(ROWS, [0.8, float("nan")], source="rm")
    assert out.kept["reward"].to_list() == [0.8] and out.kept["reward_source"][0] == "rm"
    assert out.count.dropped == {"unscored": 1}


@pytest.mark.slow
def test_pooling_reward_model_on_the_cpu_engine_matches_transformers(tmp_path):
    """vLLM's pooling runner must give the same scores as the model run by transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distillery.engine import PoolingRewardModel
    from distillery.model_setup import make_classifier, resolve_model_path
    from schemas.recipe import EngineConfig

    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = make_classifier(resolve_model_path("embedded"), tmp_path / "rm", seed=3)
    with PoolingRewardModel(str(folder), EngineConfig(dtype="float32", max_model_len=512)) as engine:
        scores = engine.score(ROWS["question"].to_list(), ROWS["completion"].to_list())
        texts = [engine.render(q, c) for q, c in zip(ROWS["question"], ROWS["completion"], strict=True)]
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        expected = [torch.sigmoid(model(**tokenizer(t, return_tensors="pt")).logits)[0, 0].item() for t in texts]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    assert scores == pytest.approx(expected, abs=2e-3)
    assert not math.isclose(scores[0], scores[1])  # the two completions are scored differently


@pytest.mark.slow
def test_judge_through_the_cpu_generation_engine():
    from distillery.engine import SamplingSettings, VLLMEngine
    from distillery.model_setup import resolve_model_path
    from schemas.recipe import EngineConfig

    os.environ["HF_HUB_OFFLINE"] = "1"
    with VLLMEngine(str(resolve_model_path("embedded")), EngineConfig()) as engine:
        requests = judge_requests(ROWS, response_prefix="Score:")
        results = engine.generate(requests, SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=48))
        free_and_constrained = [
            engine.generate(judge_requests(ROWS, response_prefix=""), SamplingSettings(0.0, 1.0, 48, spec)) for spec in (None, judge_constraint(""))
        ]
    out = with_judge_scores(ROWS, results, response_prefix="Score:")
    # Started with "Score:", even the 135M model answers with a number (without it, it never did).
    assert out.kept.height >= 1 and all(o.startswith("Score:") for o in out.kept["judge_output"])
    assert all(r["completion"] for r in results)  # the judge said something for every row
    assert out.count.rows_in == 2 and out.kept.height + out.rejects.height == 2
    for row in out.kept.iter_rows(named=True):  # every kept score is what the raw output says
        assert row["judge_score"] == parse_judge_score(row["judge_output"]) and row["reward"] == pytest.approx(row["judge_score"] / 10)
    # The embedded 135M model is a weak judge: print what it said, for the record.
    print([r["completion"] for r in results])
    # With no response prefix the model writes freely and never says "Score: N" by itself;
    # constrained decoding (score.judge.constrained, the default) holds it to that form.
    free, held = free_and_constrained
    assert with_judge_scores(ROWS, free).count.dropped.get("judge_unparseable", 0) >= 1, [r["completion"] for r in free]
    constrained = with_judge_scores(ROWS, held)
    assert constrained.count.dropped.get("judge_unparseable", 0) == 0 and constrained.kept.height == 2
    assert all(re.fullmatch(r"Score: ?(10|[1-9])", o) for o in constrained.kept["judge_output"])
