"""Answer extraction and equivalence on the formats real completions have."""

import polars as pl
import pytest

from distillery.stages.verify import answers_match, extract_answer, is_correct, reference_answer, verify_samples


@pytest.mark.parametrize(
    ("completion", "expected", "source"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72", "hash"),
        ("so the total is $1,234.\n#### 1,234", "1234", "hash"),
        ("The answer is 18 dollars.", "18", "answer_is"),
        ("The answer is $18.00.", "18.00", "answer_is"),
        ("The final answer is: 3.5 hours", "3.5", "answer_is"),
        ("Thus x = \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "boxed"),
        ("First \\boxed{2}, corrected: \\boxed{5}", "5", "boxed"),
        ("We get \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("Answer: 1,000,000", "1000000", "answer_is"),
        ("The answer is 42.", "42", "answer_is"),
        ("The answer is 25%.", "25", "answer_is"),
        ("The answer is -7", "-7", "answer_is"),
        ("So, the final answer is 3, and it is not the result.", "3", "answer_is"),
        ("So, the answer is 10 * 100 = 1000 shells.", "1000", "answer_is"),
        ("This is the final answer, which is 32.", "32", "answer_is"),
        ("I have no idea.", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(completion, expected, source):
    found = extract_answer(completion)
    assert found.text == expected
    assert found.source == source


def test_last_number_fallback_is_opt_in():
    text = "She has 3 + 4 = 7 apples"
    assert extract_answer(text).text is None
    assert extract_answer(text, fallback_last_number=True).text == "7"


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("72", "72"),
        ("72.0", "72"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\frac{3}{4}", "0.75"),
        ("1234", "1234"),
        ("18.00", "18"),
    ],
)
def test_equivalent_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(("predicted", "reference"), [("71", "72"), ("0.5", "\\frac{1}{3}"), ("7", "-7"), ("1243", "1234")])
def test_different_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_reference_answer_formats():
    assert reference_answer("Step one.\n#### 1,200", answer_format="gsm8k") == "1200"
    assert reference_answer("no hashes here", answer_format="gsm8k") is None
    assert reference_answer("27.0", answer_format="plain") == "27.0"


def test_several_boxes_count_together_only_for_list_references():
    hedge = extract_answer("maybe \\boxed{3} or \\boxed{5}")
    assert is_correct(hedge, "3, 5") is True
    assert is_correct(hedge, "3") is False  # hedging does not earn credit for the first box


def test_verify_samples_accounts_for_every_row():
    samples = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d"],
            "seed_id": ["s1", "s1", "s2", "s3"],
            "completion": ["#### 72", "The answer is 70.", "no answer here", "The answer is 9"],
            "reference_answer": ["72", "72", "5", None],
        }
    )
    result = verify_samples(samples, keep="correct")
    assert result.kept["sample_id"].to_list() == ["a", "d"]
    assert result.kept.filter(pl.col("sample_id") == "d")["correct"].to_list() == [None]
    assert result.count.dropped == {"incorrect": 1, "no_final_answer": 1}
    assert sorted(result.rejects["reason"].to_list()) == ["incorrect", "no_final_answer"]
    assert result.count.rows_in == 4 and result.count.rows_out == 2

    kept_all = verify_samples(samples, keep="all")
    assert kept_all.kept.height == 4
    assert kept_all.kept["correct"].to_list() == [True, False, False, None]
