"""Dedup: exact and MinHash near-duplicates are dropped, distinct texts kept, first kept wins."""

import numpy as np
import polars as pl

from distillery.stages.dedup import EarlierRows, dedup_samples, normalize_text
from schemas.recipe import DedupConfig

BASE = (
    "Sam starts with twelve apples and buys seven more at the market. He then gives five apples to his "
    "friend Alex who lives next door. Twelve plus seven is nineteen and nineteen minus five is fourteen. "
    "So Sam has fourteen apples left at the end of the day. The answer is 14"
)


def _frame(texts):
    return pl.DataFrame(
        {
            "sample_id": [f"p-s{i:03d}" for i in range(len(texts))],
            "seed_id": ["p"] * len(texts),
            "sample_index": list(range(len(texts))),
            "completion": texts,
        }
    )


def test_exact_and_near_duplicates_are_dropped():
    near = BASE.replace("next door", "next door to him")  # a small insertion
    exact = BASE.upper().replace(".", " .")  # case and punctuation only
    other = "Ava saves 5 dollars a week for 4 weeks, so 20 dollars, and spends 3. The answer is 17"
    result = dedup_samples(_frame([BASE, exact, near, other]), DedupConfig(threshold=0.7))
    assert result.kept["sample_id"].to_list() == ["p-s000", "p-s003"]
    assert result.count.dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    details = dict(zip(result.rejects["sample_id"], result.rejects["detail"], strict=True))
    assert details["p-s001"] == "duplicates sample p-s000"
    assert details["p-s002"].startswith("duplicates sample p-s000 (J~0.")


def test_distinct_texts_are_all_kept():
    texts = [f"Problem {i}: {i} plus {i * 3} equals {i * 4}, so the answer is {i * 4}." for i in range(20)]
    texts = [t + " " + " ".join(f"word{i}x{j}" for j in range(i % 5 + 3)) for i, t in enumerate(texts)]
    result = dedup_samples(_frame(texts), DedupConfig())
    assert result.kept.height == 20 and result.count.dropped == {}


def test_keep_policy_prefers_correct_then_reward_then_earliest():
    frame = _frame([BASE, BASE + " indeed", BASE + " truly"]).with_columns(
        correct=pl.Series([False, True, True]), reward=pl.Series([0.9, 0.1, 0.5])
    )
    result = dedup_samples(frame, DedupConfig(threshold=0.7))
    assert result.kept["sample_id"].to_list() == ["p-s002"]  # correct beats incorrect; higher reward wins
    assert result.count.dropped == {"near_duplicate": 2}


def test_dedup_against_earlier_rows_drops_exactly_those():
    first = dedup_samples(_frame([BASE, "A completely different text about marbles and stickers and shells here"]), DedupConfig())
    table = first.meta["signatures"]
    earlier = EarlierRows(
        "store/demo/v0001", table["sample_id"].to_list(), table["text_sha256"].to_list(), np.array(table["minhash"].to_list(), dtype=np.uint32)
    )
    new = "Kofi reads nine books in June and eleven in July, twenty books in all. The answer is 20"
    second = dedup_samples(_frame([new, BASE, BASE.replace("next door", "next door to him")]), DedupConfig(threshold=0.7), earlier=[earlier])
    assert second.kept["completion"].to_list() == [new]
    assert second.count.dropped == {"duplicate_of_earlier": 2}
    assert all("store/demo/v0001 sample p-s000" in d for d in second.rejects["detail"])


def test_exact_candidate_check_uses_true_jaccard():
    near = BASE.replace("next door", "next door to him")
    result = dedup_samples(_frame([BASE, near]), DedupConfig(threshold=0.7, verify_candidates="exact"))
    assert result.count.dropped == {"near_duplicate": 1}
    strict = dedup_samples(_frame([BASE, near]), DedupConfig(threshold=0.95, verify_candidates="exact"))
    assert strict.count.dropped == {}


def test_normalize_text():
    assert normalize_text("  Hello,\tWORLD!  ") == "hello world"
