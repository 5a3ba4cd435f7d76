"""Model-collapse statistics: distinct-n and top-k share by hand, collapsed vs diverse corpora, the gate."""

import pytest

from distillery.stages.collapse import CollapseGateFailed, check_gate, collapse_report, ngram_statistics
from schemas.recipe import CollapseConfig

COLLAPSED = ["The cat sat on the mat."] * 100
DIVERSE = [f"Item {i} costs {3 * i} dollars and weighs {i + 7} kilograms" for i in range(100)]


def test_statistics_by_hand():
    # words: [a b a] and [b a]
    stats = ngram_statistics(["A, b a!", "b  a"], ngram_sizes=(1, 2), top_k=1)
    assert stats["texts"] == 2
    # 1-grams: a x3, b x2 -> 5 in all, 2 unique; the top one (a) takes 3 of 5.
    assert stats["n1"]["total"] == 5 and stats["n1"]["unique"] == 2
    assert stats["n1"]["distinct_n"] == pytest.approx(2 / 5)
    assert stats["n1"]["top_k_share"] == pytest.approx(3 / 5)
    # 2-grams: (a b), (b a), (b a) -> 3 in all, 2 unique; the top one (b a) takes 2 of 3.
    assert stats["n2"]["total"] == 3 and stats["n2"]["unique"] == 2
    assert stats["n2"]["distinct_n"] == pytest.approx(2 / 3)
    assert stats["n2"]["top_k_share"] == pytest.approx(2 / 3)
    assert stats["n2"]["top"][0] == ["b a", 2]
    assert "n3" not in stats


def test_texts_shorter_than_n_have_no_ngrams_and_any_iterable_works():
    stats = ngram_statistics((t for t in ["hello", "", None, "a b c"]), ngram_sizes=(3,), top_k=5)
    assert stats["texts"] == 4
    assert stats["n3"] == {"total": 1, "unique": 1, "distinct_n": 1.0, "top_k_share": 1.0, "top": [["a b c", 1]]}
    empty = ngram_statistics([], ngram_sizes=(2,))
    assert empty["texts"] == 0 and empty["n2"]["total"] == 0 and empty["n2"]["distinct_n"] == 0.0


def test_collapsed_corpus_scores_lower_distinct_and_higher_top_share():
    collapsed = ngram_statistics(COLLAPSED, top_k=3)
    diverse = ngram_statistics(DIVERSE, top_k=3)
    # Collapsed: 5 2-grams per text, the same 5 every time -> 5 unique of 500; the top 3 take 300 of 500.
    assert collapsed["n2"]["distinct_n"] == pytest.approx(5 / 500)
    assert collapsed["n2"]["top_k_share"] == pytest.approx(300 / 500)
    # Diverse: 8 2-grams per text; only "dollars and" and "and weighs" are the same in all of them.
    assert diverse["n2"]["total"] == 800
    assert diverse["n2"]["distinct_n"] > 0.7
    assert diverse["n2"]["distinct_n"] > 50 * collapsed["n2"]["distinct_n"]
    assert diverse["n2"]["top_k_share"] < 0.3 < collapsed["n2"]["top_k_share"]


def test_report_ratios_are_output_over_seeds():
    report = collapse_report(["a b a", "b a"], ["a b", "c d"], CollapseConfig(ngram_sizes=[2], top_k=1))
    assert set(report) == {"output", "seeds", "ratio", "gate"}
    # output 2-grams: distinct 2/3, top-1 share 2/3; seeds: (a b), (c d): distinct 1, top-1 share 1/2.
    assert report["ratio"]["distinct_2"] == pytest.approx((2 / 3) / 1)
    assert report["ratio"]["top_k_share_2"] == pytest.approx((2 / 3) / (1 / 2))
    assert report["gate"] == {"passed": True, "violations": []}  # no threshold set

    no_seed_bigrams = collapse_report(["a b"], ["one", "two"], CollapseConfig(ngram_sizes=[2]))
    assert no_seed_bigrams["ratio"]["distinct_2"] is None


def test_gate_fails_a_collapsed_output_and_check_gate_raises():
    cfg = CollapseConfig(top_k=3, max_top_k_share=0.5, min_distinct_2=0.1)
    failed = collapse_report(COLLAPSED, DIVERSE, cfg)
    assert failed["gate"]["passed"] is False
    assert failed["gate"]["violations"] == [
        "output top-3 2-gram share 0.6000 > max_top_k_share 0.5",
        "output distinct-2 0.0100 < min_distinct_2 0.1",
    ]
    assert failed["ratio"]["distinct_2"] < 0.05
    with pytest.raises(CollapseGateFailed, match="max_top_k_share 0.5.*min_distinct_2 0.1"):
        check_gate(failed)

    passed = collapse_report(DIVERSE, COLLAPSED, cfg)
    assert passed["gate"] == {"passed": True, "violations": []}
    check_gate(passed)  # does not raise


def test_each_gate_threshold_alone_and_2grams_even_when_not_configured():
    only_share = collapse_report(COLLAPSED, DIVERSE, CollapseConfig(ngram_sizes=[1, 3], top_k=3, max_top_k_share=0.7))
    assert only_share["gate"]["passed"] is True  # 0.6 <= 0.7, and distinct-2 is not checked
    assert "n2" in only_share["output"] and "distinct_2" in only_share["ratio"]
    only_distinct = collapse_report(COLLAPSED, DIVERSE, CollapseConfig(ngram_sizes=[1, 3], min_distinct_2=0.02))
    assert only_distinct["gate"]["violations"] == ["output distinct-2 0.0100 < min_distinct_2 0.02"]
    with pytest.raises(CollapseGateFailed, match="distinct-2 0.0100"):
        check_gate(only_distinct)
