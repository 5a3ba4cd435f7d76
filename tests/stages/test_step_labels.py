"""Step labels on planted cases: the continuations from each prefix are planted (right up to a
given step, wrong after), so every label and every rollout count is known."""

import math

import polars as pl
import pytest

from distillery.stages.step_labels import label_steps, split_steps, step_prefix
from schemas.recipe import GenerationConfig, ProcessSupervisionConfig, VerifyConfig

GEN, VERIFY = GenerationConfig(), VerifyConfig()
REFERENCE = "42"


def _solution(n_steps: int, *, correct: bool) -> str:
    steps = [f"Step {i}: work on the problem, part {i}." for i in range(1, n_steps)]
    return "\n".join([*steps, f"The answer is {REFERENCE if correct else '99'}"])


def _rows(*solutions: tuple[str, bool], reference: str | None = REFERENCE) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": [f"q{k}-s000" for k in range(len(solutions))],
            "seed_id": [f"q{k}" for k in range(len(solutions))],
            "question": [f"Problem {k}" for k in range(len(solutions))],
            "completion": [text for text, _ in solutions],
            "reference_answer": [reference] * len(solutions),
            "correct": [ok for _, ok in solutions],
        }
    )


class Planted:
    """Continuations from a prefix of ``i`` steps reach the reference iff ``i < wrong_from[problem]``
    (``right_share`` of them, from the last good prefix on, when given); counts every rollout."""

    def __init__(self, wrong_from: dict[str, int], right_share: dict[tuple[str, int], float] | None = None, error: bool = False):
        self.wrong_from, self.right_share, self.error = wrong_from, right_share or {}, error
        self.requests: list[dict] = []

    def __call__(self, requests):
        self.requests += requests
        out, seen = [], {}
        for r in requests:
            i = r["response_prefix"].count("\n")
            key = (r["seed_id"], i)
            seen[key] = seen.get(key, 0) + 1
            good = i < self.wrong_from[r["seed_id"]]
            if key in self.right_share:  # the first share of the rollouts right, the rest wrong
                good = seen[key] <= self.right_share[key] * 4
            if self.error:
                out.append({"completion": None, "error": "EngineDeadError: planted"})
            else:
                out.append({"completion": f"So on. The answer is {REFERENCE if good else '7'}", "error": None})
        return out


def _cfg(method: str, **kw) -> ProcessSupervisionConfig:
    return ProcessSupervisionConfig(enabled=True, method=method, rollouts=4, **kw)


def test_split_steps_by_paragraph_else_by_line():
    assert split_steps("a\nb\n\nc\n") == ["a\nb", "c"]
    assert split_steps("a\n  b \n\n") == ["a", "b"]
    assert split_steps("") == []
    assert step_prefix(["a", "b", "c"], 2) == "a\nb\n"


@pytest.mark.parametrize("method", ["per_step", "binary_search"])
def test_a_wrong_third_step_is_labelled_by_both_methods(method):
    rows = _rows((_solution(5, correct=False), False))
    planted = Planted({"q0": 3})  # from 1 or 2 steps: right; from 3 or more: wrong
    result = label_steps(rows, _cfg(method), GEN, VERIFY, planted, seed=0)
    (row,) = result.kept.to_dicts()
    assert row["labels"] == [True, True, False, False, False]
    assert row["first_wrong_step"] == 3
    assert len(row["completions"]) == 5 and row["completions"][2].startswith("Step 3")
    expected = 4 * 4 if method == "per_step" else 2 * 4  # prefixes 1..4, or 3 then 2
    assert row["rollouts"] == len(planted.requests) == expected
    # each rollout continues the assistant's turn after its prefix, with its own seed
    assert all(r["response_prefix"].endswith("\n") and r["messages"][-1]["content"] == "Problem 0" for r in planted.requests)
    assert len({r["sampling_seed"] for r in planted.requests}) == expected
    assert result.count.rows_in == result.count.rows_out == 1


def test_binary_search_spends_fewer_rollouts_and_agrees_on_every_position():
    for n in range(1, 13):
        for wrong in range(1, n + 1):  # the first wrong step (the last: only the answer is wrong)
            rows = _rows((_solution(n, correct=False), False))
            per_step, binary = Planted({"q0": wrong}), Planted({"q0": wrong})
            a = label_steps(rows, _cfg("per_step"), GEN, VERIFY, per_step, seed=0).kept.row(0, named=True)
            b = label_steps(rows, _cfg("binary_search"), GEN, VERIFY, binary, seed=0).kept.row(0, named=True)
            assert a["labels"] == b["labels"] == [i + 1 < wrong for i in range(n)], (n, wrong)
            assert a["first_wrong_step"] == b["first_wrong_step"] == wrong
            assert a["rollouts"] == 4 * (n - 1)
            assert b["rollouts"] <= 4 * math.ceil(math.log2(n)) if n > 1 else b["rollouts"] == 0
            if n >= 4:
                assert b["rollouts"] < a["rollouts"], (n, wrong)


def test_soft_labels_are_the_share_of_continuations_that_reach_the_reference():
    rows = _rows((_solution(4, correct=False), False), (_solution(3, correct=True), True))
    planted = Planted({"q0": 3, "q1": 9}, right_share={("q0", 2): 0.25, ("q1", 1): 0.5})
    result = label_steps(rows, _cfg("per_step"), GEN, VERIFY, planted, seed=0)
    wrong, right = result.kept.to_dicts()
    assert wrong["soft_labels"] == [1.0, 0.25, 0.0, 0.0] and wrong["labels"] == [True, True, False, False]
    assert right["soft_labels"] == [0.5, 1.0, 1.0] and right["labels"] == [True, True, True] and right["first_wrong_step"] is None
    # binary search: a correct solution needs no rollout; unprobed prefixes have no soft label
    planted = Planted({"q0": 3, "q1": 9})
    result = label_steps(rows, _cfg("binary_search"), GEN, VERIFY, planted, seed=0)
    wrong, right = result.kept.to_dicts()
    assert right["rollouts"] == 0 and right["labels"] == [True, True, True] and right["soft_labels"] == [None, None, 1.0]
    assert wrong["labels"] == [True, True, False, False] and wrong["soft_labels"][-1] == 0.0


def test_rows_that_cannot_be_labelled_are_rejects_with_their_reason():
    rows = pl.concat([
        _rows((_solution(20, correct=False), False)).with_columns(pl.lit("long-s000").alias("sample_id")),
        _rows((_solution(3, correct=False), False), reference=None).with_columns(pl.lit("noref-s000").alias("sample_id")),
        _rows((_solution(3, correct=False), False)),
    ])  # fmt: skip
    result = label_steps(rows, _cfg("per_step", max_steps=12), GEN, VERIFY, Planted({"q0": 2}, error=True), seed=0)
    assert result.kept.height == 0
    assert result.count.dropped == {"too_many_steps": 1, "no_reference": 1, "rollout_error": 1}
    assert dict(zip(result.rejects["sample_id"], result.rejects["reason"], strict=True)) == {
        "long-s000": "too_many_steps", "noref-s000": "no_reference", "q0-s000": "rollout_error"
    }  # fmt: skip
