"""Model-collapse statistics in bounded memory: ``collapse.collapse_report`` for corpora read
shard by shard (sharded curation), with the same numbers.

``collapse.ngram_statistics`` counts every distinct n-gram in a Counter, so its memory grows with
the corpus (about 7 million distinct 3-grams in a million GSM8K-like texts: gigabytes). Here each
n-gram becomes a 64-bit hash (of the polars hashes of its words, the words being
``dedup.normalize_text(text).split()`` as there), and ``(hash, first position, count)`` records
are spilled to files partitioned by hash bucket (``dedup_external.spill_by_bucket``; a bucket over
budget is split again). Bucket by bucket they give the exact total, the number of distinct n-grams,
and each bucket's most frequent n-grams; merged, the ``top_k`` most frequent overall, ties broken
by first occurrence as ``Counter.most_common`` breaks them. One more pass over the texts reads
back the words of the ``TOP_SHOWN`` n-grams listed. Exact up to 64-bit hash collisions.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import polars as pl

from distillery.stages.collapse import TOP_SHOWN, report_from_statistics, report_sizes
from distillery.stages.dedup import normalize_text
from distillery.stages.dedup_external import read_buckets, spill_by_bucket
from schemas.recipe import CollapseConfig

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


def ngram_statistics_sharded(texts: Callable[[], Iterable[str | None]], workdir: Path, *, ngram_sizes=(1, 2, 3), top_k: int = 100) -> dict:
    """``collapse.ngram_statistics`` in bounded memory; ``texts()`` is called twice (two passes)."""
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
    shutil.rmtree(workdir, ignore_errors=True)
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


def collapse_report_sharded(output_texts: Callable[[], Iterator[str]], seed_texts: Callable[[], Iterator[str]], cfg: CollapseConfig, workdir: Path) -> dict:
    """``collapse.collapse_report`` (same report, same gate) for corpora too large to count in memory."""
    sizes = report_sizes(cfg)
    output = ngram_statistics_sharded(output_texts, workdir / "output", ngram_sizes=sizes, top_k=cfg.top_k)
    seeds = ngram_statistics_sharded(seed_texts, workdir / "seeds", ngram_sizes=sizes, top_k=cfg.top_k)
    return report_from_statistics(output, seeds, cfg)
