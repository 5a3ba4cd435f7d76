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

import numba
import numpy as np
import polars as pl
import pyarrow as pa
from datasketch import MinHash
from datasketch.minhash import _FMIX_CONSTANTS

MAX_HASH = np.uint32(0xFFFFFFFF)
_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)
_S1, _M1, _S2, _M2, _S3 = (int(c) for c in _FMIX_CONSTANTS[32])
HASH_SCHEME = "affine32; shingle = fnv1a32 over fnv1a32(utf-8) of words"


@cache
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own (a, b) for this num_perm and seed."""
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


@numba.njit(parallel=True, cache=True, nogil=True)
def _fnv_words(data, offsets, out):  # pragma: no cover - compiled
    for k in numba.prange(out.size):
        h = np.uint64(2166136261)
        for i in range(offsets[k], offsets[k + 1]):
            h = ((h ^ np.uint64(data[i])) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
        out[k] = np.uint32(h)


def _word_hashes(words: pl.Series) -> np.ndarray:
    """FNV-1a of every word's UTF-8 bytes, straight from the Arrow buffers."""
    data, offsets = _arrow_bytes(words)
    out = np.empty(len(words), dtype=np.uint32)
    _fnv_words(data, offsets, out)
    return out


_MASK = np.uint64(0xFFFFFFFF)


@numba.njit(parallel=True, cache=True, nogil=True)
def _minhash_kernel(words, offsets, ngram, a, b, out):  # pragma: no cover - compiled
    # numba widens integer arithmetic to 64 bits, so every 32-bit step is masked explicitly.
    n_docs = offsets.size - 1
    num_perm = a.size
    s1, m1, s2, m2, s3 = np.uint64(_S1), np.uint64(_M1), np.uint64(_S2), np.uint64(_M2), np.uint64(_S3)
    for d in numba.prange(n_docs):
        start = offsets[d]
        length = offsets[d + 1] - start
        mins = np.full(num_perm, np.uint64(0xFFFFFFFF), dtype=np.uint64)
        if length > 0:
            width = ngram if length >= ngram else length
            for s in range(length - width + 1):
                h = np.uint64(2166136261)
                for w in range(width):
                    h = ((h ^ np.uint64(words[start + s + w])) * np.uint64(16777619)) & _MASK
                h = h ^ (h >> s1)
                h = (h * m1) & _MASK
                h = h ^ (h >> s2)
                h = (h * m2) & _MASK
                h = h ^ (h >> s3)
                for p in range(num_perm):
                    v = (a[p] * h + b[p]) & _MASK
                    if v < mins[p]:
                        mins[p] = v
        for p in range(num_perm):
            out[d, p] = np.uint32(mins[p])


@numba.njit(cache=True, nogil=True)
def _shingle_hashes(words, offsets, ngram, out_offsets, out):  # pragma: no cover - compiled
    for d in range(offsets.size - 1):
        start = offsets[d]
        length = offsets[d + 1] - start
        o = out_offsets[d]
        if length == 0:
            continue
        width = ngram if length >= ngram else length
        for s in range(length - width + 1):
            h = np.uint64(2166136261)
            for w in range(width):
                h = ((h ^ np.uint64(words[start + s + w])) * np.uint64(16777619)) & _MASK
            out[o + s] = h
        out[o : o + length - width + 1].sort()


@numba.njit(parallel=True, cache=True, nogil=True)
def _pair_jaccard(hashes, offsets, left, right, out):  # pragma: no cover - compiled
    for k in numba.prange(left.size):
        a0, a1 = offsets[left[k]], offsets[left[k] + 1]
        b0, b1 = offsets[right[k]], offsets[right[k] + 1]
        inter = 0
        union = 0
        i, j = a0, b0
        prev_a, prev_b = np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0xFFFFFFFFFFFFFFFF)
        while i < a1 or j < b1:
            if i < a1 and hashes[i] == prev_a:  # skip repeated shingles: sets, not bags
                i += 1
                continue
            if j < b1 and hashes[j] == prev_b:
                j += 1
                continue
            if j >= b1 or (i < a1 and hashes[i] < hashes[j]):
                prev_a = hashes[i]
                i += 1
            elif i >= a1 or hashes[j] < hashes[i]:
                prev_b = hashes[j]
                j += 1
            else:
                inter += 1
                prev_a, prev_b = hashes[i], hashes[j]
                i += 1
                j += 1
            union += 1
        out[k] = inter / union if union else 1.0


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
    _shingle_hashes(words, offsets, np.int64(ngram), out_offsets, hashes)
    local = inverse.reshape(-1, 2).astype(np.int64)
    out = np.empty(len(pairs))
    _pair_jaccard(hashes, out_offsets, np.ascontiguousarray(local[:, 0]), np.ascontiguousarray(local[:, 1]), out)
    return out


# Byte -> lower-cased word byte, 0 for a separator, 255 for non-ASCII (ASCII \w is [A-Za-z0-9_]).
_ASCII_WORD = np.zeros(256, dtype=np.uint8)
for _c in range(256):
    if _c >= 128:
        _ASCII_WORD[_c] = 255
    elif chr(_c).isalnum() or _c == 95:
        _ASCII_WORD[_c] = ord(chr(_c).lower())


@numba.njit(parallel=True, cache=True, nogil=True)
def _ascii_word_counts(data, offsets, lut, counts, is_ascii):  # pragma: no cover - compiled
    for d in numba.prange(offsets.size - 1):
        n, prev, ok = 0, 0, True
        for i in range(offsets[d], offsets[d + 1]):
            c = lut[data[i]]
            if c == 255:
                ok = False
                break
            if c != 0 and prev == 0:
                n += 1
            prev = c
        counts[d] = n if ok else 0
        is_ascii[d] = ok


@numba.njit(parallel=True, cache=True, nogil=True)
def _ascii_word_fill(data, offsets, lut, is_ascii, out_offsets, out):  # pragma: no cover - compiled
    # For ASCII text, NFKC changes nothing and the table lower-cases and finds \w bytes.
    for d in numba.prange(offsets.size - 1):
        if not is_ascii[d]:
            continue
        k = out_offsets[d]
        h = np.uint64(0)
        in_word = False
        for i in range(offsets[d], offsets[d + 1]):
            c = lut[data[i]]
            if c != 0:
                if not in_word:
                    h = np.uint64(2166136261)
                    in_word = True
                h = ((h ^ np.uint64(c)) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
            elif in_word:
                out[k] = np.uint32(h)
                k += 1
                in_word = False
        if in_word:
            out[k] = np.uint32(h)


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
    _ascii_word_counts(data, offsets, _ASCII_WORD, counts, is_ascii)
    others = np.flatnonzero(~is_ascii)
    other_lists = _token_lists(texts.gather(others)) if len(others) else None
    if other_lists is not None:
        counts[others] = other_lists.list.len().fill_null(0).to_numpy()
    word_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=word_offsets[1:])
    words = np.empty(word_offsets[-1], dtype=np.uint32)
    _ascii_word_fill(data, offsets, _ASCII_WORD, is_ascii, word_offsets, words)
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
        _minhash_kernel(words, offsets, np.int64(ngram), a, b, out[start : start + offsets.size - 1])
    return out


def optimal_bands(threshold: float, num_perm: int, *, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false-positive and false-negative areas at
    ``threshold``, with datasketch's own optimizer (equal weights reproduce ``MinHashLSH``)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1 - false_negative_weight, false_negative_weight)


@numba.njit(parallel=True, cache=True, nogil=True)
def _band_keys_kernel(sigs, bands, rows, out):  # pragma: no cover - compiled
    for d in numba.prange(sigs.shape[0]):
        for band in range(bands):
            k = np.uint64(1469598103934665603) + np.uint64(band)
            for r in range(rows):
                k = (k ^ np.uint64(sigs[d, band * rows + r])) * np.uint64(1099511628211)
            out[d, band] = k


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(n, bands)`` uint64 keys: two documents share a key in band i iff their rows there agree
    (up to 64-bit hash collisions)."""
    keys = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    _band_keys_kernel(np.ascontiguousarray(sigs), np.int64(bands), np.int64(rows), keys)
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
