"""Model-collapse statistics: how concentrated the n-grams of a corpus are.

A model trained on synthetic text whose n-grams concentrate on a few phrasings loses the tails
of the distribution (model collapse). Two numbers per n-gram size show it:

* ``distinct_n``: unique n-grams / all n-grams (lower = more repetitive across the corpus);
* ``top_k_share``: the share of all n-gram occurrences taken by the ``top_k`` most frequent
  n-grams (higher = more concentrated).

:func:`collapse_report` puts the output's statistics beside the seeds' and applies the optional
gate of the recipe (``collapse.max_top_k_share``, ``collapse.min_distinct_2``) to the output's
2-gram statistics; :func:`check_gate` fails a run whose report did not pass.

Both numbers depend on the size of the corpus (a larger corpus has a lower ``distinct_n`` even
without any collapse), so compare corpora of similar size, and set gate thresholds from runs
of the size they guard.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable

from distillery.stages.dedup import normalize_text
from schemas.recipe import CollapseConfig

GATE_NGRAM = 2  # the gate reads the 2-gram statistics
TOP_SHOWN = 10  # most frequent n-grams listed in the statistics, to see what concentrated


def _ngrams(words: list[str], n: int):
    if n == 1:
        return words
    return zip(*(words[i:] for i in range(n)), strict=False)


def ngram_statistics(texts: Iterable[str | None], *, ngram_sizes=(1, 2, 3), top_k: int = 100) -> dict:
    """Corpus-level n-gram statistics of ``texts`` (any iterable; read once, in one pass).

    Returns ``{"texts": N, "n1": {...}, "n2": {...}, ...}`` where each ``"nN"`` holds ``total``
    (n-gram occurrences), ``unique``, ``distinct_n`` (unique / total), ``top_k_share`` (the
    occurrences of the ``top_k`` most frequent n-grams / total) and ``top`` (the most frequent
    n-grams with their counts). A corpus with no n-gram of a size scores 0.0 on both shares.
    Words are ``dedup.normalize_text(text).split()``; a text shorter than n words has no n-gram.

    Memory grows with the number of distinct n-grams (one Counter entry each; words are interned
    so the n-gram tuples share them): about 10^7 distinct 3-grams take a few GB.
    """
    sizes = sorted(set(ngram_sizes))
    if not sizes or sizes[0] < 1:
        msg = f"n-gram sizes must be positive integers, got {list(ngram_sizes)}"
        raise ValueError(msg)
    counters: dict[int, Counter] = {n: Counter() for n in sizes}
    n_texts = 0
    intern = sys.intern
    for text in texts:
        n_texts += 1
        words = list(map(intern, normalize_text(text or "").split()))
        for n, counter in counters.items():
            if len(words) >= n:
                counter.update(_ngrams(words, n))
    stats: dict = {"texts": n_texts}
    for n, counter in counters.items():
        total = sum(counter.values())
        unique = len(counter)
        top = counter.most_common(max(top_k, TOP_SHOWN))
        top_k_count = sum(count for _, count in top[:top_k])
        stats[f"n{n}"] = {
            "total": total,
            "unique": unique,
            "distinct_n": unique / total if total else 0.0,
            "top_k_share": top_k_count / total if total else 0.0,
            "top": [[gram if n == 1 else " ".join(gram), count] for gram, count in top[:TOP_SHOWN]],
        }
    return stats


def _ratio(out: float, seed: float) -> float | None:
    return out / seed if seed else None


def collapse_report(output_texts: Iterable[str | None], seed_texts: Iterable[str | None], cfg: CollapseConfig) -> dict:
    """The output's n-gram statistics against the seeds', and the gate's verdict on the output.

    ``ratio`` is output / seeds for ``distinct_N`` and ``top_k_share_N`` of every size (None where
    the seeds' value is 0). The gate reads the output's 2-gram statistics (computed even when 2
    is not among ``cfg.ngram_sizes``): ``top_k_share`` must not exceed ``cfg.max_top_k_share`` and
    ``distinct_n`` must not fall below ``cfg.min_distinct_2``; a threshold of None is not checked.
    """
    sizes = report_sizes(cfg)
    output = ngram_statistics(output_texts, ngram_sizes=sizes, top_k=cfg.top_k)
    seeds = ngram_statistics(seed_texts, ngram_sizes=sizes, top_k=cfg.top_k)
    return report_from_statistics(output, seeds, cfg)


def report_sizes(cfg: CollapseConfig) -> list[int]:
    """The n-gram sizes a report counts: the recipe's, and the gate's 2-grams."""
    return sorted(set(cfg.ngram_sizes) | {GATE_NGRAM})


def report_from_statistics(output: dict, seeds: dict, cfg: CollapseConfig) -> dict:
    """The report (ratios and the gate's verdict) from the output's and the seeds' statistics,
    however they were counted (in memory here; spilled to disk in ``collapse_external``)."""
    sizes = report_sizes(cfg)
    ratio: dict[str, float | None] = {}
    for n in sizes:
        ratio[f"distinct_{n}"] = _ratio(output[f"n{n}"]["distinct_n"], seeds[f"n{n}"]["distinct_n"])
        ratio[f"top_k_share_{n}"] = _ratio(output[f"n{n}"]["top_k_share"], seeds[f"n{n}"]["top_k_share"])

    gate_stats = output[f"n{GATE_NGRAM}"]
    violations: list[str] = []
    if cfg.max_top_k_share is not None and gate_stats["top_k_share"] > cfg.max_top_k_share:
        violations.append(
            f"output top-{cfg.top_k} 2-gram share {gate_stats['top_k_share']:.4f} > max_top_k_share {cfg.max_top_k_share}"
        )
    if cfg.min_distinct_2 is not None and gate_stats["distinct_n"] < cfg.min_distinct_2:
        violations.append(f"output distinct-2 {gate_stats['distinct_n']:.4f} < min_distinct_2 {cfg.min_distinct_2}")
    return {
        "output": output,
        "seeds": seeds,
        "ratio": ratio,
        "gate": {"passed": not violations, "violations": violations},
    }


class CollapseGateFailed(RuntimeError):
    """The output's n-gram statistics crossed a threshold of the recipe's collapse gate."""


def check_gate(report: dict) -> None:
    """Raise :class:`CollapseGateFailed`, naming every violation, when the report's gate failed."""
    gate = report["gate"]
    if not gate["passed"]:
        msg = "collapse gate failed: " + "; ".join(gate["violations"])
        raise CollapseGateFailed(msg)
