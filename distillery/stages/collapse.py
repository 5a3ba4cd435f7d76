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

How it counts, in bounded memory (a Counter of every distinct n-gram would grow with the corpus:
about 7 million distinct 3-grams in a million GSM8K-like texts, gigabytes): each n-gram becomes a
64-bit hash (of the polars hashes of its words, the words being ``dedup.normalize_text(text).split()``),
and ``(hash, first position, count)`` records are spilled to files partitioned by hash bucket
(``dedup.spill_by_bucket``; a bucket over budget is split again). Bucket by bucket they give the
exact total, the number of distinct n-grams, and each bucket's most frequent n-grams; merged, the
``top_k`` most frequent overall, ties broken by first occurrence (as ``Counter.most_common``).
One more pass over the texts reads back the words of the ``TOP_SHOWN`` n-grams listed. Exact up
to 64-bit hash collisions. A list in memory is one shard of the same code.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path

import numpy as np
import polars as pl

from distillery.stages.dedup import normalize_text, read_buckets, spill_by_bucket
from schemas.recipe import CollapseConfig

GATE_NGRAM = 2  # the gate reads the 2-gram statistics
TOP_SHOWN = 10  # most frequent n-grams listed in the statistics, to see what concentrated

RECORD = np.dtype([("key", "<u8"), ("pos", "<i8"), ("count", "<i8")])
BATCH_TEXTS = 10_000
BUCKET_BYTES = 16 << 20
_WORD_SEED = 11
_K = np.uint64(0x100000001B3)


def _words(texts: list[str | None]) -> tuple[list[str], np.ndarray]:
    words: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        w = normalize_text(text or "").split()
        words.extend(w)
        lengths[i] = len(w)
    return words, lengths


def _gram_hashes(word_hashes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-gram inside one text, and the index of its first word."""
    ends = np.repeat(np.cumsum(lengths), lengths)
    starts = np.flatnonzero(np.arange(word_hashes.size) + n <= ends)
    grams = word_hashes[starts].copy()
    for j in range(1, n):
        grams = grams * _K + word_hashes[starts + j]
    return grams, starts


class _Counter:
    """One corpus, one n-gram size: spilled records, then the statistics."""

    def __init__(self, folder: Path, n: int) -> None:
        self.folder, self.n = folder, n
        folder.mkdir(parents=True)

    def add(self, word_hashes: np.ndarray, lengths: np.ndarray, base: int) -> None:
        grams, starts = _gram_hashes(word_hashes, lengths, self.n)
        if not grams.size:
            return
        keys, first, counts = np.unique(grams, return_index=True, return_counts=True)
        records = np.empty(keys.size, dtype=RECORD)
        records["key"], records["pos"], records["count"] = keys, base + starts[first], counts
        spill_by_bucket(records, keys, self.folder)

    def statistics(self, top: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """``(total, unique, positions, counts)`` of the ``top`` most frequent n-grams."""
        total = unique = 0
        best_pos, best_count = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        for records in read_buckets(self.folder, RECORD, lambda r: r["key"], BUCKET_BYTES):
            order = np.argsort(records["key"], kind="stable")
            keys = records["key"][order]
            starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
            counts = np.add.reduceat(records["count"][order], starts)
            positions = np.minimum.reduceat(records["pos"][order], starts)
            total += int(counts.sum())
            unique += starts.size
            pos = np.concatenate([best_pos, positions])
            cnt = np.concatenate([best_count, counts])
            keep = np.lexsort((pos, -cnt))[:top]  # most frequent first, then first seen
            best_pos, best_count = pos[keep], cnt[keep]
        return total, unique, best_pos, best_count


Texts = Iterable[str | None] | Callable[[], Iterable[str | None]]


def ngram_statistics(texts: Texts, *, ngram_sizes=(1, 2, 3), top_k: int = 100, workdir: Path | None = None) -> dict:
    """Corpus-level n-gram statistics of ``texts``: a zero-argument callable that returns an
    iterable (called twice: two passes, e.g. over spilled shards), or an iterable (held as a list).

    Returns ``{"texts": N, "n1": {...}, "n2": {...}, ...}`` where each ``"nN"`` holds ``total``
    (n-gram occurrences), ``unique``, ``distinct_n`` (unique / total), ``top_k_share`` (the
    occurrences of the ``top_k`` most frequent n-grams / total) and ``top`` (the most frequent
    n-grams with their counts). A corpus with no n-gram of a size scores 0.0 on both shares.
    A text shorter than n words has no n-gram. Spill files go to a temporary folder under
    ``workdir`` (or the system's), removed before this returns.
    """
    if not callable(texts):
        held = list(texts)
        texts = lambda: held  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="distillery-ngrams-", dir=workdir) as tmp:
        return _ngram_statistics(texts, Path(tmp), ngram_sizes=ngram_sizes, top_k=top_k)


def _ngram_statistics(texts: Callable[[], Iterable[str | None]], workdir: Path, *, ngram_sizes, top_k: int) -> dict:
    sizes = sorted(set(ngram_sizes))
    if not sizes or sizes[0] < 1:
        msg = f"n-gram sizes must be positive integers, got {list(ngram_sizes)}"
        raise ValueError(msg)
    counters = {n: _Counter(workdir / f"n{n}", n) for n in sizes}
    n_texts = base = 0
    stream = iter(texts())
    while batch := list(islice(stream, BATCH_TEXTS)):
        words, lengths = _words(batch)
        hashes = pl.Series(words, dtype=pl.Utf8).hash(seed=_WORD_SEED).to_numpy() if words else np.zeros(0, np.uint64)
        for counter in counters.values():
            counter.add(hashes, lengths, base)
        n_texts += len(batch)
        base += len(words)
    stats: dict = {"texts": n_texts}
    shown: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n, counter in counters.items():
        total, unique, positions, counts = counter.statistics(max(top_k, TOP_SHOWN))
        stats[f"n{n}"] = {
            "total": total,
            "unique": unique,
            "distinct_n": unique / total if total else 0.0,
            "top_k_share": int(counts[:top_k].sum()) / total if total else 0.0,
        }
        shown[n] = (positions[:TOP_SHOWN], counts[:TOP_SHOWN])
    grams = _grams_at(texts(), {n: p for n, (p, _) in shown.items()})
    for n, (positions, counts) in shown.items():
        stats[f"n{n}"]["top"] = [[grams[(n, int(p))], int(c)] for p, c in zip(positions, counts, strict=True)]
    return stats


def _grams_at(texts: Iterable[str | None], positions: dict[int, np.ndarray]) -> dict[tuple[int, int], str]:
    """The n-gram (words joined by a space) that starts at each global word position."""
    wanted = sorted((int(p), n) for n, ps in positions.items() for p in ps)
    found: dict[tuple[int, int], str] = {}
    base, k = 0, 0
    for text in texts:
        if k == len(wanted):
            break
        words = normalize_text(text or "").split()
        while k < len(wanted) and wanted[k][0] < base + len(words):
            p, n = wanted[k]
            found[(n, p)] = " ".join(words[p - base : p - base + n])
            k += 1
        base += len(words)
    return found


def collapse_report(output_texts: Texts, seed_texts: Texts, cfg: CollapseConfig, workdir: Path | None = None) -> dict:
    """The output's n-gram statistics against the seeds', and the gate's verdict on the output.

    ``ratio`` is output / seeds for ``distinct_N`` and ``top_k_share_N`` of every size (None where
    the seeds' value is 0). The gate reads the output's 2-gram statistics (computed even when 2
    is not among ``cfg.ngram_sizes``): ``top_k_share`` must not exceed ``cfg.max_top_k_share`` and
    ``distinct_n`` must not fall below ``cfg.min_distinct_2``; a threshold of None is not checked.
    The texts: as :func:`ngram_statistics` takes them.
    """
    sizes = report_sizes(cfg)
    output = ngram_statistics(output_texts, ngram_sizes=sizes, top_k=cfg.top_k, workdir=workdir)
    seeds = ngram_statistics(seed_texts, ngram_sizes=sizes, top_k=cfg.top_k, workdir=workdir)
    return report_from_statistics(output, seeds, cfg)


def _ratio(out: float, seed: float) -> float | None:
    return out / seed if seed else None


def report_sizes(cfg: CollapseConfig) -> list[int]:
    """The n-gram sizes a report counts: the recipe's, and the gate's 2-grams."""
    return sorted(set(cfg.ngram_sizes) | {GATE_NGRAM})


def report_from_statistics(output: dict, seeds: dict, cfg: CollapseConfig) -> dict:
    """The report (ratios and the gate's verdict) from the output's and the seeds' statistics,
    however they were counted."""
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
