"""Quality filters: each heuristic drops what it should, in priority order, and keeps good solutions."""

import json

import polars as pl
import pytest

from distillery.stages.quality import ngram_tokens, non_text_share, quality_filter, repeated_ngram_share
from schemas.recipe import QualityConfig

GOOD = [
    "Natalia sold 48 / 2 = 24 clips in May. Altogether she sold 48 + 24 = 72 clips in April and May.\n#### 72",
    "Weng earns 12 / 60 = 0.2 dollars per minute. Working 50 minutes, she earned 0.2 x 50 = 10 dollars. The answer is 10.",
    "Betty has only 100 / 2 = 50 dollars. Her grandparents gave her 15 * 2 = 30 dollars. "
    "She needs 100 - 50 - 30 - 15 = 5 more dollars, so the answer is $\\boxed{5}$.",
]

# A degenerate loop the way a small model writes one: the step number changes, nothing else does.
LOOP = "".join(f"Step {i}: Calculate 1 (sticks)\n" for i in range(11, 41))

# A normal worked solution of about the same length (about 900 characters), with a final answer.
WORKED = (
    "Step 1: Find how many eggs Janet's ducks lay in a week: 16 eggs a day for 7 days is 16 * 7 = 112 eggs.\n"
    "Step 2: She eats 3 eggs for breakfast every morning, which is 3 * 7 = 21 eggs over the week.\n"
    "Step 3: She bakes muffins for her friends with 4 eggs a day, which uses 4 * 7 = 28 eggs.\n"
    "Step 4: The eggs she keeps for herself are 21 + 28 = 49 in total.\n"
    "Step 5: That leaves 112 - 49 = 63 eggs to sell at the farmers' market.\n"
    "Step 6: Each fresh duck egg sells for $2, so the weekly income is 63 * 2 = 126 dollars.\n"
    "Step 7: To check, the daily surplus is 16 - 3 - 4 = 9 eggs, worth 9 * 2 = 18 dollars a day.\n"
    "Step 8: Seven days of 18 dollars is 7 * 18 = 126 dollars, which agrees with step 6.\n"
    "Step 9: Janet therefore makes 126 dollars every week from selling eggs at the market.\n"
    "#### 126"
)


def _frame(texts, finish_reasons=None):
    data = {"sample_id": [f"s{i}" for i in range(len(texts))], "seed_id": ["p"] * len(texts), "completion": texts}
    if finish_reasons is not None:
        data["finish_reason"] = finish_reasons
    return pl.DataFrame(data)


def test_non_text_share_counts_garbage_not_math_or_foreign_letters():
    assert non_text_share("x = 3 × 4 ≤ 12 — “ok”, 50% of $7; café, 日本語, नमस्ते, a_b\\c|d~e`f") == 0.0
    assert non_text_share("ab\ufffd\ufffd") == 0.5  # replacement characters: 2 of 4
    assert non_text_share("\x00\x01ab") == 0.5  # control characters
    assert non_text_share("\U0001f600\U0001f600\U0001f600ab") == pytest.approx(3 / 5)  # emoji, 3 of 5 code points
    assert non_text_share("") == 0.0


def test_repeated_ngram_share_by_hand():
    # 3-grams: (a b c) (b c a) (c a b) (a b c): the last repeats the first -> 1 of 4.
    assert repeated_ngram_share("a b c a b c", 3) == 0.25
    # 2-grams: ab ba ab ba ab: 2 unique of 5 -> 3 repeats.
    assert repeated_ngram_share("a b a b a b", 2) == pytest.approx(3 / 5)
    assert repeated_ngram_share("A, b; C! a B c", 3) == 0.25  # case and punctuation do not count
    assert repeated_ngram_share("one two", 3) == 0.0  # no 3-gram at all
    assert repeated_ngram_share("", 3) == 0.0


def test_line_breaks_are_tokens_so_line_loops_count():
    assert ngram_tokens("Step 1: x\n\n  \r\nStep 2: y\n") == ["step", "1", "x", "\n", "step", "2", "y"]
    # 30 lines of "step i calculate 1 sticks", joined by line-break tokens: 30*6 - 1 = 179 tokens, 177 3-grams.
    # Unique: (step i calculate) x30, (i calculate 1) x30, (\n step i) x29 for i = 12..40, and the
    # three constant ones (calculate 1 sticks), (1 sticks \n), (sticks \n step): 92 -> 85 repeats.
    assert repeated_ngram_share(LOOP, 3) == pytest.approx(85 / 177)
    # Without line breaks as tokens the 4-word loop "Step i: Calculate 1" would score only 1/4 repeats.
    short_loop = "".join(f"Step {i}: Calculate 1\n" for i in range(11, 41))
    assert repeated_ngram_share(short_loop, 3) > 0.3


def test_each_reason_is_planted_once_and_dropped_in_priority_order():
    cfg = QualityConfig(max_chars=1000)
    planted = {
        "too_short": "ok",  # also has no final answer: too_short comes first
        "too_long": "The answer is 7. " + "Seven is a prime number. " * 45,  # 1142 chars, also repetitive
        "truncated": "Janet has 16 eggs and she eats 3 of them, then she bakes with",  # truncated, no answer
        "non_text": "The answer is 5. " + "\ufffd" * 40,  # 40 of 57 characters; the answer would be found
        "repetitive": LOOP,  # no answer either: repetition comes first
        "missing_final_answer": "Sam has 12 apples and buys 7 more, then gives 5 away, leaving him with fourteen.",
    }
    texts = [GOOD[0], *planted.values(), GOOD[1], WORKED, GOOD[2]]
    finish = ["stop"] * len(texts)
    finish[3] = "length"
    frame = _frame(texts, finish)
    result = quality_filter(frame, cfg)

    assert result.kept["completion"].to_list() == [GOOD[0], GOOD[1], WORKED, GOOD[2]]
    assert result.kept.columns == frame.columns  # no working columns leak out
    reasons = dict(zip(result.rejects["sample_id"], result.rejects["reason"], strict=True))
    assert reasons == {f"s{i + 1}": reason for i, reason in enumerate(planted)}
    assert result.count.dropped == dict.fromkeys(planted, 1)
    assert result.count.rows_in == 10 and result.count.rows_out == 4
    assert result.count.rows_out == result.count.rows_in - sum(result.count.dropped.values())

    details = dict(zip(result.rejects["reason"], result.rejects["detail"], strict=True))
    assert details["too_short"] == "2 chars < min_chars 20"
    assert details["too_long"] == f"{len(planted['too_long'].strip())} chars > max_chars 1000"
    assert "length" in details["truncated"]
    assert details["non_text"] == "non-text character share 0.70 > 0.30 (40 of 57)"  # 0.7018
    assert details["repetitive"] == "repeated 3-gram share 0.48 > 0.30 (85 of 177)"
    assert "no final answer" in details["missing_final_answer"]
    record = json.loads(result.rejects.filter(pl.col("reason") == "truncated")["record"][0])
    assert record["finish_reason"] == "length" and record["sample_id"] == "s3"


def test_degenerate_loop_is_dropped_and_worked_solution_of_same_length_kept():
    assert abs(len(LOOP) - len(WORKED)) < 200
    result = quality_filter(_frame([LOOP + "#### 1", WORKED]), QualityConfig())
    assert result.kept["completion"].to_list() == [WORKED]
    assert result.rejects["reason"].to_list() == ["repetitive"]
    assert repeated_ngram_share(WORKED, 3) < 0.15


def test_short_texts_are_never_judged_repetitive():
    text = "The answer is 5. The answer is 5."  # 2 repeats of 6 3-grams = 0.33, but fewer than 10 3-grams
    assert repeated_ngram_share(text, 3) == pytest.approx(2 / 6)
    assert quality_filter(_frame([text]), QualityConfig()).kept.height == 1


def test_predicted_answer_column_is_used_instead_of_extracting_again():
    frame = _frame([GOOD[0], WORKED.replace("#### 126", "So she makes 126 dollars.")]).with_columns(
        predicted_answer=pl.Series([None, "126"], dtype=pl.Utf8)
    )
    result = quality_filter(frame, QualityConfig())
    assert result.kept["sample_id"].to_list() == ["s1"]
    assert result.rejects["reason"].to_list() == ["missing_final_answer"]
    assert "predicted_answer is null" in result.rejects["detail"][0]


def test_switches_turn_checks_off():
    texts = [GOOD[0], "Janet has 16 eggs and she eats 3 of them, then she bakes with", None]
    frame = _frame(texts, ["stop", "length", "stop"])
    result = quality_filter(frame, QualityConfig(drop_truncated=False, require_final_answer=False))
    assert result.kept["sample_id"].to_list() == ["s0", "s1"]
    assert result.count.dropped == {"too_short": 1}  # a null completion is an empty one

    no_finish_column = quality_filter(_frame(texts[:2]), QualityConfig(require_final_answer=False))
    assert no_finish_column.kept.height == 2


def test_disabled_config_drops_nothing_but_counts():
    frame = _frame(["ok", LOOP, "\ufffd" * 50, GOOD[0]], ["stop", "length", "stop", "stop"])
    result = quality_filter(frame, QualityConfig(enabled=False))
    assert result.kept.equals(frame)
    assert result.rejects.height == 0
    assert result.count.as_dict() == {"stage": "quality", "rows_in": 4, "rows_out": 4, "fanout": 1, "dropped": {}}


def test_custom_column_and_missing_column():
    frame = pl.DataFrame({"sample_id": ["a", "b"], "response": ["no", GOOD[1]]})
    result = quality_filter(frame, QualityConfig(column="response"))
    assert result.kept["sample_id"].to_list() == ["b"]
    with pytest.raises(ValueError, match="completion"):
        quality_filter(frame, QualityConfig())
