"""Dedup: exact and MinHash near-duplicates are dropped, distinct texts kept, first kept wins."""

import polars as pl
from datasketch import MinHash

from distillery.stages.dedup import dedup_samples, minhashes, normalize_text, shingles
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
    assert details == {"p-s001": "duplicates sample p-s000", "p-s002": "duplicates sample p-s000"}


def test_distinct_texts_are_all_kept():
    texts = [f"Problem {i}: {i} plus {i * 3} equals {i * 4}, so the answer is {i * 4}." for i in range(20)]
    texts = [t + " " + " ".join(f"word{i}x{j}" for j in range(i % 5 + 3)) for i, t in enumerate(texts)]
    result = dedup_samples(_frame(texts), DedupConfig())
    assert result.kept.height == 20 and result.count.dropped == {}


def test_minhash_matches_datasketch_update_path():
    cfg = DedupConfig(num_perm=64)
    (bulk,) = minhashes([BASE], cfg)
    single = MinHash(num_perm=64, seed=cfg.seed)
    for s in shingles(BASE, cfg.ngram):
        single.update(s)
    assert (bulk.hashvalues == single.hashvalues).all()


def test_normalize_text():
    assert normalize_text("  Hello,\tWORLD!  ") == "hello world"
