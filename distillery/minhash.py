"""MinHash signatures for millions of texts, compatible with datasketch.

The signatures are datasketch's own (scheme ``affine32``, the default in datasketch 2.x): the
same permutations (taken from ``datasketch.MinHash(num_perm, seed)``), the same MurmurHash3
pre-mix and the same ``a * h + b mod 2**32`` min-reduction. What differs is how a shingle's
32-bit hash is computed, so that it can be vectorized:

    word hash    = FNV-1a (32-bit) over the word's UTF-8 bytes
    shingle hash = FNV-1a (32-bit) over the word hashes of its n words   # shingle_hash() below

A datasketch user gets identical hash values with
``MinHash(num_perm, seed, hashfunc=shingle_hash)`` updated with ``shingle_bytes(text, n)``
(tested in tests/test_minhash.py), and can query our signatures directly with
``MinHash(seed=seed, hashvalues=sig, scheme="affine32")`` / ``LeanMinHash`` in ``MinHashLSH``.

Tokens are ``\\w+`` runs of the NFKC-normalized, lower-cased text (``tokens()``), the same
tokenization as ``distillery.stages.dedup.normalize_text``. The heavy loop (shingle hash,
pre-mix, permutations, min) is one numba kernel, parallel over documents.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import polars as pl
import pyarrow as pa

MAX_HASH = np.uint32(0xFFFFFFFF)


@cache
def _kernels():
    """The numba kernels (``distillery.minhash_kernels``), compiled or loaded from numba's cache on
    first use: importing numba (llvmlite) and datasketch costs seconds that a process which never
    computes a signature (the CLI failing early, a driver that only dedups on workers) skips."""
    from distillery import minhash_kernels

    return minhash_kernels
_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)
HASH_SCHEME = "affine32; shingle = fnv1a32 over fnv1a32(utf-8) of words"


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own (a, b) for this num_perm and seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return np.ascontiguousarray(a, dtype=np.uint64), np.ascontiguousarray(b, dtype=np.uint64)


def tokens(text: str) -> list[str]:
    """The words a text is shingled into (scalar form of what ``signatures`` does in bulk)."""
    return _token_lists(pl.Series([text]))[0].to_list()


def shingle_bytes(text: str, ngram: int) -> list[bytes]:
    """The shingles of a text, as the bytes datasketch's ``update`` takes (with ``shingle_hash``)."""
    words = tokens(text)
    if len(words) <= ngram:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def word_hash(word: bytes) -> int:
    """FNV-1a, 32 bits, of a word's UTF-8 bytes."""
    h = int(_FNV_OFFSET)
    for byte in word:
        h = ((h ^ byte) * int(_FNV_PRIME)) & 0xFFFFFFFF
    return h


def shingle_hash(shingle: bytes) -> int:
    """The 32-bit hash of one shingle (space-separated words): pass as datasketch's ``hashfunc``."""
    h = int(_FNV_OFFSET)
    for word in shingle.split(b" "):
        h = ((h ^ word_hash(word)) * int(_FNV_PRIME)) & 0xFFFFFFFF
    return h


def _token_lists(texts: pl.Series) -> pl.Series:
    """Lists of ``\\w+`` words of the NFKC-normalized, lower-cased texts (empty list for empty text)."""
    texts = texts.fill_null("")
    non_ascii = texts.str.contains(r"[^\x00-\x7F]").arg_true()
    if len(non_ascii):  # NFKC is the slowest step and changes nothing in ASCII text
        texts = texts.scatter(non_ascii, texts.gather(non_ascii).str.normalize("NFKC"))
    words = texts.str.to_lowercase().str.replace_all(r"[^\w]+", " ").str.strip_chars()
    empty = pl.lit([], dtype=pl.List(pl.Utf8))
    return pl.select(pl.when(words == "").then(empty).otherwise(words.str.split(" "))).to_series()


def _word_hashes(words: pl.Series) -> np.ndarray:
    """FNV-1a of every word's UTF-8 bytes, straight from the Arrow buffers."""
    data, offsets = _arrow_bytes(words)
    out = np.empty(len(words), dtype=np.uint32)
    _kernels()._fnv_words(data, offsets, out)
    return out




def exact_jaccard(texts: pl.Series, pairs: np.ndarray, *, ngram: int) -> np.ndarray:
    """Jaccard of the shingle sets of each pair (exact up to 32-bit shingle-hash collisions);
    only the texts that appear in a pair are tokenized."""
    if len(pairs) == 0:
        return np.zeros(0)
    docs, inverse = np.unique(pairs, return_inverse=True)
    words, offsets = document_words(texts.gather(docs))
    lengths = np.diff(offsets)
    counts = np.where(lengths == 0, 0, np.maximum(lengths - ngram + 1, 1))
    out_offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    hashes = np.empty(out_offsets[-1], dtype=np.uint64)
    _kernels()._shingle_hashes(words, offsets, np.int64(ngram), out_offsets, hashes)
    local = inverse.reshape(-1, 2).astype(np.int64)
    out = np.empty(len(pairs))
    _kernels()._pair_jaccard(hashes, out_offsets, np.ascontiguousarray(local[:, 0]), np.ascontiguousarray(local[:, 1]), out)
    return out


# Byte -> lower-cased word byte, 0 for a separator, 255 for non-ASCII (ASCII \w is [A-Za-z0-9_]).
_ASCII_WORD = np.zeros(256, dtype=np.uint8)
for _c in range(256):
    if _c >= 128:
        _ASCII_WORD[_c] = 255
    elif chr(_c).isalnum() or _c == 95:
        _ASCII_WORD[_c] = ord(chr(_c).lower())


def _arrow_bytes(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    arrow = texts.fill_null("").to_arrow()
    if isinstance(arrow, pa.ChunkedArray):
        arrow = arrow.combine_chunks()
    arrow = arrow.cast(pa.large_string())
    _, offsets_buf, data_buf = arrow.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arrow.offset : arrow.offset + len(arrow) + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, dtype=np.uint8)
    return data, offsets


def document_words(texts: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Word hashes of every document, flat, with per-document offsets. ASCII documents are
    tokenized by a numba kernel; the others by polars (NFKC, Unicode ``\\w``), with the same result."""
    data, offsets = _arrow_bytes(texts)
    counts = np.empty(len(texts), dtype=np.int64)
    is_ascii = np.empty(len(texts), dtype=np.bool_)
    _kernels()._ascii_word_counts(data, offsets, _ASCII_WORD, counts, is_ascii)
    others = np.flatnonzero(~is_ascii)
    other_lists = _token_lists(texts.gather(others)) if len(others) else None
    if other_lists is not None:
        counts[others] = other_lists.list.len().fill_null(0).to_numpy()
    word_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=word_offsets[1:])
    words = np.empty(word_offsets[-1], dtype=np.uint32)
    _kernels()._ascii_word_fill(data, offsets, _ASCII_WORD, is_ascii, word_offsets, words)
    if other_lists is not None:
        flat = other_lists.explode().drop_nulls()
        if len(flat):
            starts, lengths = word_offsets[others], counts[others]
            positions = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
            words[positions] = _word_hashes(flat)
    return words, word_offsets


def signatures(texts: pl.Series | list[str], *, num_perm: int = 128, ngram: int = 5, seed: int = 1, batch_size: int = 200_000) -> np.ndarray:
    """``(len(texts), num_perm)`` uint32 signatures; an empty text gets all-max values (as datasketch)."""
    texts = texts if isinstance(texts, pl.Series) else pl.Series(texts, dtype=pl.Utf8)
    a, b = permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    for start in range(0, len(texts), batch_size):
        words, offsets = document_words(texts.slice(start, batch_size))
        _kernels()._minhash_kernel(words, offsets, np.int64(ngram), a, b, out[start : start + offsets.size - 1])
    return out


def optimal_bands(threshold: float, num_perm: int, *, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false-positive and false-negative areas at
    ``threshold``, with datasketch's own optimizer (equal weights reproduce ``MinHashLSH``)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1 - false_negative_weight, false_negative_weight)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: two documents share a key in band i iff their rows there agree
    (up to 64-bit hash collisions)."""
    keys = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    _kernels()._band_keys_kernel(np.ascontiguousarray(sigs), np.int64(bands), np.int64(rows), keys)
    return keys


def candidate_pairs(keys: np.ndarray, *, max_bucket: int = 64) -> np.ndarray:
    """Unique ``(i, j)`` pairs, ``i < j``, that share a band key. Buckets larger than ``max_bucket``
    contribute edges to their smallest member only (enough to connect them), not every pair."""
    n, bands = keys.shape
    found = []
    for band in range(bands):
        order = np.argsort(keys[:, band])
        sorted_keys = keys[order, band]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for size in np.unique(sizes[sizes > 1]):
            group_starts = starts[sizes == size]
            members = order[group_starts[:, None] + np.arange(size)]  # (groups, size), ascending doc ids per group after sort below
            members.sort(axis=1)
            if size <= max_bucket:
                i, j = np.triu_indices(size, k=1)
                found.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
            else:
                found.append(np.stack([np.repeat(members[:, 0], size - 1), members[:, 1:].ravel()], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])  # one int64 per pair: a 1-d unique is much faster
    return np.stack([codes // n, codes % n], axis=1)


def estimated_jaccard(sigs_i: np.ndarray, sigs_j: np.ndarray) -> np.ndarray:
    """Share of agreeing signature positions, row by row (the MinHash Jaccard estimate)."""
    return (sigs_i == sigs_j).mean(axis=1)
