"""Dedup within a run: exact (normalized text hash), then near-duplicate (datasketch MinHash + LSH).

Rows are visited in a fixed order (``seed_id``, ``sample_index``) so the same input keeps the
same rows; the first row of each duplicate group is kept and the others are rejected with the
id of the row they duplicate.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import polars as pl
from datasketch import MinHash, MinHashLSH

from distillery.accounting import StageCount, StageResult, empty_rejects, rows_to_rejects
from schemas.recipe import DedupConfig

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Case, Unicode form, punctuation and white space do not make two texts different."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


def shingles(text: str, ngram: int) -> set[bytes]:
    """Word n-grams of the normalized text (the whole text when it is shorter than n words)."""
    words = normalize_text(text).split()
    if len(words) <= ngram:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)}


def minhashes(texts: list[str], cfg: DedupConfig) -> list[MinHash]:
    return MinHash.bulk([shingles(t, cfg.ngram) for t in texts], num_perm=cfg.num_perm, seed=cfg.seed)


def dedup_samples(samples: pl.DataFrame, cfg: DedupConfig, *, text_column: str = "completion") -> StageResult:
    """Drop exact and near duplicates of ``text_column``; rejects name the row they duplicate."""
    ordered = samples.sort(["seed_id", "sample_index"]) if "sample_index" in samples.columns else samples
    ids = ordered["sample_id"].to_list()
    texts = ordered[text_column].fill_null("").to_list()
    duplicate_of: dict[int, tuple[str, str]] = {}  # row -> (reason, kept row's id)

    if cfg.exact:
        first_with_hash: dict[str, int] = {}
        for i, text in enumerate(texts):
            h = text_hash(text)
            if h in first_with_hash:
                duplicate_of[i] = ("exact_duplicate", ids[first_with_hash[h]])
            else:
                first_with_hash[h] = i

    if cfg.near:
        candidates = [i for i in range(len(texts)) if i not in duplicate_of]
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        for i, signature in zip(candidates, minhashes([texts[i] for i in candidates], cfg), strict=True):
            match = lsh.query(signature)
            if match:
                duplicate_of[i] = ("near_duplicate", ids[min(match)])
            else:
                lsh.insert(i, signature)

    keep_mask = [i not in duplicate_of for i in range(len(texts))]
    kept = ordered.filter(pl.Series(keep_mask))
    dropped_rows = sorted(duplicate_of)
    if dropped_rows:
        reasons = [duplicate_of[i][0] for i in dropped_rows]
        details = [f"duplicates sample {duplicate_of[i][1]}" for i in dropped_rows]
        rejects = rows_to_rejects("dedup", ordered[dropped_rows], reasons, details)
    else:
        rejects = empty_rejects()
    dropped: dict[str, int] = {}
    for reason, _ in duplicate_of.values():
        dropped[reason] = dropped.get(reason, 0) + 1
    return StageResult("dedup", kept, rejects, StageCount("dedup", samples.height, kept.height, 1, dropped).check())
