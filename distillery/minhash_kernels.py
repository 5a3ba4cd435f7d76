"""The numba kernels of ``distillery.minhash`` (there: what each computes, and the hash scheme).
Imported on first use (``distillery.minhash._kernels``): numba loads llvmlite, which takes seconds."""

import numba
import numpy as np
from datasketch.minhash import _FMIX_CONSTANTS

_S1, _M1, _S2, _M2, _S3 = (int(c) for c in _FMIX_CONSTANTS[32])
_MASK = np.uint64(0xFFFFFFFF)


@numba.njit(parallel=True, cache=True, nogil=True)
def _fnv_words(data, offsets, out):  # pragma: no cover - compiled
    for k in numba.prange(out.size):
        h = np.uint64(2166136261)
        for i in range(offsets[k], offsets[k + 1]):
            h = ((h ^ np.uint64(data[i])) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
        out[k] = np.uint32(h)


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


@numba.njit(parallel=True, cache=True, nogil=True)
def _band_keys_kernel(sigs, bands, rows, out):  # pragma: no cover - compiled
    for d in numba.prange(sigs.shape[0]):
        for band in range(bands):
            k = np.uint64(1469598103934665603) + np.uint64(band)
            for r in range(rows):
                k = (k ^ np.uint64(sigs[d, band * rows + r])) * np.uint64(1099511628211)
            out[d, band] = k
