"""Select: majority vote, pass rates, difficulty filters, selection policies and preference pairs."""

import polars as pl
import pytest

from distillery.stages.select import majority_vote, pass_rates, pair_stage, preference_pairs, select_samples
from schemas.recipe import PairsConfig, SelectConfig


def _frame(problems: dict[str, list[tuple]]) -> pl.DataFrame:
    """``{seed_id: [(predicted_answer, correct, reward), ...]}``: one row per sample, in order."""
    rows = []
    for seed, samples in problems.items():
        for i, (answer, correct, reward) in enumerate(samples):
            rows.append(
                {
                    "sample_id": f"{seed}-s{i}",
                    "seed_id": seed,
                    "sample_index": i,
                    "question": f"question {seed}",
                    "completion": f"completion {seed} {i}",
                    "predicted_answer": answer,
                    "correct": correct,
                    "reward": reward,
                }
            )
    schema = {
        "sample_id": pl.Utf8,
        "seed_id": pl.Utf8,
        "sample_index": pl.Int64,
        "question": pl.Utf8,
        "completion": pl.Utf8,
        "predicted_answer": pl.Utf8,
        "correct": pl.Boolean,
        "reward": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def _by_id(frame: pl.DataFrame, column: str) -> dict:
    return dict(zip(frame["sample_id"], frame[column], strict=True))


def _check_counts(result, rows_in: int) -> None:
    count = result.count
    assert count.rows_in == rows_in
    assert count.rows_out == result.kept.height == rows_in - sum(count.dropped.values())
    assert result.rejects.height == sum(count.dropped.values())
    assert set(result.kept["sample_id"]).isdisjoint(result.rejects["sample_id"])


# --------------------------------------------------------------------------- majority vote


def test_majority_vote_groups_equivalent_answers():
    rows = _frame(
        {
            "p": [("0.5", None, None), ("3", None, None), ("1/2", None, None), (None, None, None), ("\\frac{1}{2}", None, None)],
            "q": [(None, None, None), (None, None, None)],
        }
    )
    voted = majority_vote(rows)
    assert voted.height == rows.height  # drops nothing
    assert voted["sample_id"].to_list() == rows["sample_id"].to_list()
    assert _by_id(voted, "majority_answer") == {
        "p-s0": "0.5",
        "p-s1": "0.5",
        "p-s2": "0.5",
        "p-s3": "0.5",
        "p-s4": "0.5",
        "q-s0": None,
        "q-s1": None,
    }
    assert _by_id(voted, "agreement")["p-s1"] == pytest.approx(0.75)  # 3 of the 4 answered samples
    assert _by_id(voted, "voters") == {"p-s0": 4, "p-s1": 4, "p-s2": 4, "p-s3": 4, "p-s4": 4, "q-s0": 0, "q-s1": 0}
    assert _by_id(voted, "pseudo_correct") == {
        "p-s0": True,
        "p-s1": False,
        "p-s2": True,
        "p-s3": None,
        "p-s4": True,
        "q-s0": None,
        "q-s1": None,
    }
    assert _by_id(voted, "agreement")["q-s0"] is None


def test_majority_vote_tie_goes_to_the_earliest_answer():
    # 7 and 8 have two votes each; 7 has the lowest sample_index although an 8 comes first in the rows.
    rows = _frame({"t": [("8", None, None), ("7", None, None), ("7", None, None), ("8", None, None), ("9", None, None)]})
    rows = rows.with_columns(sample_index=pl.Series([1, 0, 2, 3, 4])).sort("sample_id", descending=True)
    voted = majority_vote(rows)
    assert set(voted["majority_answer"]) == {"7"}
    assert _by_id(voted, "pseudo_correct") == {"t-s0": False, "t-s1": True, "t-s2": True, "t-s3": False, "t-s4": False}
    assert voted["agreement"].to_list() == pytest.approx([0.4] * 5)


def test_majority_vote_ignores_the_reference():
    # Every reference (and every `correct` flag) says 5; the samples mostly say 4.
    rows = _frame({"r": [("4", False, None), ("4", False, None), ("5", True, None)]}).with_columns(reference_answer=pl.lit("5"))
    voted = majority_vote(rows)
    assert set(voted["majority_answer"]) == {"4"}
    assert voted["pseudo_correct"].to_list() == [True, True, False]
    assert voted["agreement"].to_list() == pytest.approx([2 / 3] * 3)


# --------------------------------------------------------------------------- pass rates


def test_pass_rates_count_null_labels_as_not_passed():
    rows = _frame({"a": [("1", True, None), ("2", False, None), ("1", True, None), ("1", None, None)], "b": [("3", None, None)]})
    rates = pass_rates(rows)
    assert rates.to_dicts() == [
        {"seed_id": "a", "samples": 4, "passed": 2, "pass_rate": 0.5},
        {"seed_id": "b", "samples": 1, "passed": 0, "pass_rate": 0.0},
    ]
    pseudo = pass_rates(majority_vote(rows), label="pseudo_correct")
    assert pseudo["pass_rate"].to_list() == [0.75, 1.0]
    with pytest.raises(ValueError, match="label='score'"):
        pass_rates(rows, label="score")


# --------------------------------------------------------------------------- difficulty


DIFFICULTY = {
    "easy": [("1", True, 0.9)] * 4,  # pass rate 1.00
    "mid": [("1", True, 0.8), ("2", False, 0.1), ("1", True, 0.7), ("2", False, 0.2)],  # 0.50
    "hard": [("2", False, 0.1)] * 4,  # 0.00
    "most": [("1", True, 0.6), ("1", True, 0.6), ("1", True, 0.6), ("2", False, 0.3)],  # 0.75
}


def _kept_problems(result) -> list[str]:
    return list(dict.fromkeys(result.kept["seed_id"].to_list()))


def test_drop_all_solved():
    rows = _frame(DIFFICULTY)
    result = select_samples(rows, SelectConfig(policy="all", difficulty="drop_all_solved"))
    assert _kept_problems(result) == ["mid", "hard", "most"]
    assert result.count.dropped == {"too_easy": 4}
    assert set(result.rejects["seed_id"]) == {"easy"}
    assert set(result.rejects["detail"]) == {"pass rate 1.00 (4/4)"}
    assert set(result.rejects["stage"]) == {"select"}
    _check_counts(result, 16)


def test_drop_all_failed():
    result = select_samples(_frame(DIFFICULTY), SelectConfig(policy="all", difficulty="drop_all_failed"))
    assert _kept_problems(result) == ["easy", "mid", "most"]
    assert result.count.dropped == {"too_hard": 4}
    assert set(result.rejects["detail"]) == {"pass rate 0.00 (0/4)"}
    _check_counts(result, 16)


def test_drop_all_failed_says_when_labels_are_missing():
    rows = _frame({"noref": [("1", None, None), ("1", None, None)]})
    result = select_samples(rows, SelectConfig(policy="all", difficulty="drop_all_failed"))
    assert result.kept.height == 0
    assert result.rejects["detail"].to_list() == ["pass rate 0.00 (0/2, 2 unlabeled)"] * 2


def test_band_keeps_problems_inside_and_names_the_side():
    result = select_samples(_frame(DIFFICULTY), SelectConfig(policy="all", difficulty="band", band=(0.25, 0.75)))
    assert _kept_problems(result) == ["mid", "most"]  # 0.75 is on the edge: kept
    assert result.count.dropped == {"too_easy": 4, "too_hard": 4}
    details = dict(zip(result.rejects["seed_id"], result.rejects["detail"], strict=False))
    assert details == {
        "easy": "pass rate 1.00 (4/4) above band [0.25, 0.75]",
        "hard": "pass rate 0.00 (0/4) below band [0.25, 0.75]",
    }
    reasons = dict(zip(result.rejects["seed_id"], result.rejects["reason"], strict=False))
    assert reasons == {"easy": "too_easy", "hard": "too_hard"}
    _check_counts(result, 16)


def test_difficulty_any_keeps_every_problem():
    result = select_samples(_frame(DIFFICULTY), SelectConfig(policy="all"))
    assert result.kept.equals(_frame(DIFFICULTY))
    assert result.count.dropped == {} and result.rejects.height == 0


# --------------------------------------------------------------------------- policies


POLICY = {
    "x": [("1", False, 0.95), ("2", True, 0.40), ("2", True, 0.70), ("3", False, None)],
    "y": [("5", True, 0.12), ("5", True, 0.50), ("5", True, 0.50)],
}


def test_threshold_policy():
    result = select_samples(_frame(POLICY), SelectConfig(policy="threshold", min_reward=0.5))
    assert result.kept["sample_id"].to_list() == ["x-s0", "x-s2", "y-s1", "y-s2"]  # 0.50 >= 0.50 is kept
    assert _by_id(result.rejects, "reason") == {"x-s1": "below_threshold", "x-s3": "no_reward", "y-s0": "below_threshold"}
    assert _by_id(result.rejects, "detail") == {
        "x-s1": "reward 0.40 < 0.50",
        "x-s3": "reward is null (min_reward 0.50)",
        "y-s0": "reward 0.12 < 0.50",
    }
    assert result.count.dropped == {"below_threshold": 2, "no_reward": 1}
    _check_counts(result, 7)


def test_threshold_needs_min_reward():
    # the stage checks its options itself, also in a config built without validation
    with pytest.raises(ValueError, match="min_reward"):
        select_samples(_frame(POLICY), SelectConfig.model_construct(policy="threshold"))
    with pytest.raises(ValueError, match="min_reward"):
        SelectConfig(policy="threshold")


def test_bad_options_are_named():
    rows = _frame(POLICY)
    # model_construct: configs that skip pydantic's checks, so the stage's own ones are tested
    with pytest.raises(ValueError, match="policy='best'"):
        select_samples(rows, SelectConfig.model_construct(policy="best"))
    with pytest.raises(ValueError, match="difficulty='easy'"):
        select_samples(rows, SelectConfig.model_construct(policy="all", difficulty="easy"))
    with pytest.raises(ValueError, match="k=0"):
        select_samples(rows, SelectConfig.model_construct(policy="top_k", k=0))
    with pytest.raises(ValueError, match="band="):
        select_samples(rows, SelectConfig.model_construct(policy="all", difficulty="band", band=(0.8, 0.2)))
    with pytest.raises(ValueError, match="label='judge'"):
        select_samples(rows, SelectConfig(policy="best_of_n"), "judge")


def test_best_of_n_prefers_label_then_reward_then_earliest():
    result = select_samples(_frame(POLICY), SelectConfig(policy="best_of_n"))
    # x: the correct sample with the higher reward beats the incorrect one with 0.95;
    # y: two at 0.50, the earlier wins.
    assert result.kept["sample_id"].to_list() == ["x-s2", "y-s1"]
    assert _by_id(result.rejects, "reason") == {s: "not_best" for s in ("x-s0", "x-s1", "x-s3", "y-s0", "y-s2")}
    assert _by_id(result.rejects, "detail") == {
        "x-s1": "rank 2 of 4 for problem x (kept x-s2)",
        "x-s0": "rank 3 of 4 for problem x (kept x-s2)",
        "x-s3": "rank 4 of 4 for problem x (kept x-s2)",
        "y-s2": "rank 2 of 3 for problem y (kept y-s1)",
        "y-s0": "rank 3 of 3 for problem y (kept y-s1)",
    }
    _check_counts(result, 7)


def test_best_of_n_by_another_label():
    rows = _frame(POLICY).with_columns(pseudo_correct=pl.Series([True, False, False, False, True, True, True]))
    result = select_samples(rows, SelectConfig(policy="best_of_n"), "pseudo_correct")
    assert result.kept["sample_id"].to_list() == ["x-s0", "y-s1"]
    # without a label argument, the config's own label (``auto`` is ``correct``)
    assert select_samples(rows, SelectConfig(policy="best_of_n", label="pseudo_correct")).kept["sample_id"].to_list() == ["x-s0", "y-s1"]
    assert select_samples(rows, SelectConfig(policy="best_of_n")).kept["sample_id"].to_list() == ["x-s2", "y-s1"]


def test_top_k():
    result = select_samples(_frame(POLICY), SelectConfig(policy="top_k", k=2))
    assert result.kept["sample_id"].to_list() == ["x-s1", "x-s2", "y-s1", "y-s2"]  # input order
    assert _by_id(result.rejects, "reason") == {"x-s0": "not_top_k", "x-s3": "not_top_k", "y-s0": "not_top_k"}
    assert _by_id(result.rejects, "detail") == {
        "x-s0": "rank 3 of 4 for problem x (k=2)",
        "x-s3": "rank 4 of 4 for problem x (k=2)",
        "y-s0": "rank 3 of 3 for problem y (k=2)",
    }
    _check_counts(result, 7)


def test_difficulty_runs_before_the_policy():
    result = select_samples(_frame(DIFFICULTY), SelectConfig(policy="best_of_n", difficulty="band", band=(0.25, 0.75)))
    assert result.kept["sample_id"].to_list() == ["mid-s0", "most-s0"]
    assert result.count.dropped == {"too_easy": 4, "too_hard": 4, "not_best": 6}
    _check_counts(result, 16)


def test_empty_input():
    result = select_samples(_frame({}), SelectConfig(policy="best_of_n"))
    assert result.kept.height == 0 and result.count.rows_in == 0 and result.count.dropped == {}


# --------------------------------------------------------------------------- preference pairs


def test_preference_pairs_by_label():
    rows = _frame({"x": [("1", False, 0.95), ("2", True, 0.40), ("2", True, 0.70), ("3", False, None)]})
    pairs = preference_pairs(rows)
    assert pairs.to_dicts() == [
        {
            "pair_id": "x-p0",
            "seed_id": "x",
            "prompt": "question x",
            "chosen": "completion x 2",
            "rejected": "completion x 3",
            "chosen_sample_id": "x-s2",
            "rejected_sample_id": "x-s3",  # null reward is the worst
            "chosen_score": 0.70,
            "rejected_score": 0.0,  # no reward: the label's score
            "reason": "label",
        }
    ]


def test_preference_pairs_max_pairs_use_samples_once_first():
    rows = _frame({"x": [("1", False, 0.95), ("2", True, 0.40), ("2", True, 0.70), ("3", False, None)]})
    pairs = preference_pairs(rows, max_pairs_per_problem=10)
    got = list(zip(pairs["chosen_sample_id"], pairs["rejected_sample_id"], strict=True))
    assert got == [("x-s2", "x-s3"), ("x-s1", "x-s0"), ("x-s2", "x-s0"), ("x-s1", "x-s3")]
    assert pairs["pair_id"].to_list() == ["x-p0", "x-p1", "x-p2", "x-p3"]
    assert preference_pairs(rows, max_pairs_per_problem=2)["pair_id"].to_list() == ["x-p0", "x-p1"]


def test_preference_pairs_without_labels_or_rewards():
    rows = _frame({"x": [("1", True, None), ("2", False, None)]}).drop("reward")
    pairs = preference_pairs(rows)
    assert pairs.select("chosen_score", "rejected_score", "reason").row(0) == (1.0, 0.0, "label")


def test_preference_pairs_by_reward_gap():
    # All correct: no label differs, so rewards decide.
    rows = _frame({"r": [("1", True, 0.9), ("1", True, 0.3), ("1", True, 0.7), ("1", True, 0.5), ("1", True, None)]})
    pairs = preference_pairs(rows, max_pairs_per_problem=3, min_reward_gap=0.3)
    got = list(zip(pairs["chosen_sample_id"], pairs["rejected_sample_id"], pairs["reason"], strict=True))
    # 0.9 with 0.3 first; 0.7 - 0.5 < 0.3 so no second disjoint pair; then 0.9/0.5 and 0.7/0.3.
    assert got == [("r-s0", "r-s1", "reward"), ("r-s0", "r-s3", "reward"), ("r-s2", "r-s1", "reward")]
    assert pairs["chosen_score"].to_list() == pytest.approx([0.9, 0.9, 0.7])
    assert pairs["rejected_score"].to_list() == pytest.approx([0.3, 0.5, 0.3])
    assert preference_pairs(rows, max_pairs_per_problem=3, min_reward_gap=0.7).height == 0


def test_no_pair_when_all_samples_agree():
    rows = _frame(
        {
            "same": [("1", True, 0.5), ("1", True, 0.5)],  # same label, same reward
            "nolabel": [("1", None, None), ("2", None, None)],  # nothing to compare
            "split": [("1", True, None), ("2", False, None)],
        }
    )
    stage = pair_stage(rows, PairsConfig())
    assert stage.kept["seed_id"].to_list() == ["split"]
    # problems in, pairs out, and a reject per problem without a pair, with why
    assert (stage.count.rows_in, stage.count.rows_out) == (3, 1)
    assert stage.count.dropped == {"no_reward_gap": 1, "one_label": 1}
    assert dict(zip(stage.rejects["seed_id"], stage.rejects["reason"], strict=True)) == {"same": "no_reward_gap", "nolabel": "one_label"}
    assert "2 samples: 2 correct, 0 not" in stage.rejects.filter(pl.col("seed_id") == "same")["detail"][0]
    # two slots per problem: the unfilled ones are counted, and the counts still add up
    wide = pair_stage(rows, PairsConfig(max_pairs_per_problem=2))
    assert wide.count.fanout == 2 and wide.count.rows_out == 1
    assert wide.count.dropped == {"no_reward_gap": 1, "one_label": 1, "fewer_pairs": 3}
    empty = pair_stage(_frame({"same": [("1", True, 0.5), ("1", True, 0.5)]}), PairsConfig())
    assert empty.kept.height == 0 and empty.kept.columns[0] == "pair_id" and empty.count.rows_in == 1


def test_preference_pairs_options_are_checked():
    rows = _frame(POLICY)
    with pytest.raises(ValueError, match="max_pairs_per_problem=0"):
        preference_pairs(rows, max_pairs_per_problem=0)
    with pytest.raises(ValueError, match="min_reward_gap=-0.1"):
        preference_pairs(rows, min_reward_gap=-0.1)


def test_preference_pairs_are_deterministic():
    rows = _frame(POLICY)
    assert preference_pairs(rows, max_pairs_per_problem=3).equals(
        preference_pairs(rows.reverse(), max_pairs_per_problem=3).sort("seed_id", maintain_order=True)
    )


def test_a_gap_equal_to_min_reward_gap_counts():
    rows = _frame({"g": [("1", True, 0.7), ("1", True, 0.4)]})  # 0.7 - 0.4 == 0.29999999999999993 in floats
    assert preference_pairs(rows, min_reward_gap=0.3)["chosen_sample_id"].to_list() == ["g-s0"]
    assert preference_pairs(rows, min_reward_gap=0.31).height == 0
