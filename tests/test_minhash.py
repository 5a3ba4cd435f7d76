"""MinHash signatures: bit-identical to datasketch's, and usable in datasketch's LSH."""

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash, MinHashLSH

from distillery import minhash

TEXTS = [
    "Sam has 12 apples, buys 7 more and gives 5 away. How many now?",
    "",
    "one two",
    "Ünïcödé ｆｕｌｌｗｉｄｔｈ text, with CAPITALS and punctuation!!! and more words to shingle here",
]


@pytest.mark.parametrize("ngram", [1, 3, 5])
def test_signatures_equal_datasketch_with_the_documented_hashfunc(ngram):
    sigs = minhash.signatures(TEXTS, num_perm=64, ngram=ngram, seed=7)
    for text, sig in zip(TEXTS, sigs, strict=True):
        reference = MinHash(num_perm=64, seed=7, hashfunc=minhash.shingle_hash)
        shingles = minhash.shingle_bytes(text, ngram)
        if shingles:
            reference.update_batch(shingles)
        assert np.array_equal(reference.hashvalues, sig)


def test_tokens_fold_unicode_case_and_punctuation():
    assert minhash.tokens("Ｈｅｌｌｏ, WORLD!  it's") == ["hello", "world", "it", "s"]


def test_our_signatures_query_datasketch_lsh():
    base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat all day long"
    texts = [base, base.replace("warm", "soft"), "an entirely different sentence about prime numbers and their many properties today"]
    sigs = minhash.signatures(texts, num_perm=128, ngram=3)
    lsh = MinHashLSH(threshold=0.5, num_perm=128)
    for i, sig in enumerate(sigs):
        lsh.insert(i, LeanMinHash(seed=1, hashvalues=sig, scheme="affine32"))
    assert sorted(lsh.query(LeanMinHash(seed=1, hashvalues=sigs[1], scheme="affine32"))) == [0, 1]


def test_candidate_pairs_find_shared_buckets_only():
    keys = np.array([[1, 10], [1, 11], [2, 12], [3, 12], [4, 13]], dtype=np.uint64)
    assert minhash.candidate_pairs(keys).tolist() == [[0, 1], [2, 3]]


def test_large_buckets_are_connected_by_star_edges():
    keys = np.zeros((10, 1), dtype=np.uint64)
    pairs = minhash.candidate_pairs(keys, max_bucket=4)
    assert pairs.tolist() == [[0, j] for j in range(1, 10)]


def test_optimal_bands_match_datasketch():
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    assert minhash.optimal_bands(0.8, 128) == (lsh.b, lsh.r) == (9, 13)


def test_exact_jaccard_of_pairs():
    import polars as pl

    texts = pl.Series(["a b c d e f", "a b c d e g", "x y z", "a a a a"])
    pairs = np.array([[0, 1], [0, 2], [3, 3]])
    # 3-word shingles: {abc, bcd, cde, def} vs {abc, bcd, cde, deg}: 3 shared of 5
    assert np.allclose(minhash.exact_jaccard(texts, pairs, ngram=3), [3 / 5, 0.0, 1.0])


def test_ascii_fast_path_and_unicode_path_agree_in_one_batch():
    import polars as pl

    texts = ["Hello, World_42 it's", "Ｃａｆé au lait, NAÏVE", "", "  ...  ", "MiXeD ascii text", "日本語 テキスト mixed"]
    words, offsets = minhash.document_words(pl.Series(texts))
    for k, text in enumerate(texts):
        expected = [minhash.word_hash(w.encode()) for w in minhash.tokens(text)]
        assert words[offsets[k] : offsets[k + 1]].tolist() == expected
