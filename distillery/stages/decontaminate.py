"""Benchmark decontamination: drop rows that contain, or nearly copy, a benchmark item.

Three rules, all on text normalized so that light edits do not hide a copy (:func:`normalize`:
NFKC, lower case, ``1,000`` -> ``1000``, ``27.0`` -> ``27``, apostrophes deleted, ``$`` and other
punctuation turned into spaces, white space collapsed):

1. **n-gram overlap** (method ``"ngram"``): a row is contaminated if one of its checked columns
   shares a word n-gram (``cfg.ngram``, 13 by default) with a benchmark item. An item shorter
   than n words counts when the row contains the whole item as a word sequence.
2. **near duplicate** (method ``"near_duplicate"``): the exact Jaccard similarity of the word
   3-gram sets (:data:`SHINGLE`; a text under 3 words is one shingle) of a column and an item is at
   least ``cfg.near_threshold``. 3-grams because one inserted or deleted word changes only 3 of
   them, so an item with a few words added or removed, which breaks every 13-gram of a short
   item, still scores well above 0.6. Candidates come from datasketch MinHash + MinHashLSH; the
   LSH bands are chosen for recall at the threshold (:func:`lsh_params`; datasketch's default
   finds only ~40% of pairs at exactly 0.6) and the exact Jaccard of the shingle sets confirms.
3. **word edits of a short item** (method ``"edit_distance"``): for an item under
   ``cfg.short_item_words`` words (30), a column of at most twice that many words that holds the
   item with at most ``cfg.short_max_edits`` words (2; and at most one per 6 words of the item)
   inserted, deleted or substituted, every number of the item kept and no number added: a
   word-level edit distance where the column's words before and after the match are free.
   Rules 1 and 2 miss these: one inserted word and one swapped verb break every 13-gram of a
   short item and, in a 15-word item, 5 of its 13 word 3-grams (Jaccard 8/19, about 0.42). The numbers
   keep it precise: a problem of the same template with other numbers is another problem.
   Candidates are exact, not sampled (prefix filtering): an item that allows k edits is indexed
   by its k + 1 rarest words (document frequency over all benchmark items), and a column that
   holds it with at most k edits has at least one of them; a candidate then passes a cheap
   check (every number there, at most k distinct words missing) before the alignment.

Speed: the benchmarks are indexed once per call. Rows are hashed in bulk (polars for the
normalization and the word hashes, numpy for the hash of every word span via prefix sums), so
the per-row Python work only happens for rows whose hashes hit the index: a 64-bit hash hit is
confirmed on the words themselves, and the near-duplicate rule only MinHashes rows that can
still reach the threshold (at least ``near_threshold`` of their distinct shingles occur in some
benchmark item, which any row with Jaccard >= threshold against an item satisfies).

Rules are tried in order on every checked column (1, then 2, then 3), so a row found several
ways reports the first; the item reported is the one the row covers best (for rule 3: the fewest
edits, then the longest item). Contaminated rows are dropped with reason ``"contaminated"`` and a
JSON detail naming the benchmark, the item, the method, the column and the matched span (rule 2
adds ``jaccard``, rule 3 ``edits``).
"""

from __future__ import annotations

import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from distillery.accounting import StageCount, StageResult, empty_rejects, rows_to_rejects
from distillery.uri_io import StorageError, read_bytes
from schemas.recipe import BenchmarkSource, DecontaminationConfig

STAGE = "decontaminate"
REASON = "contaminated"
SHINGLE = 3  # word n-gram size of the near-duplicate rule's shingles
EDIT_WORDS_PER_EDIT = 6  # a short item of n words allows at most n // 6 edits
NUM_PERM = 128
MINHASH_SEED = 1
SPAN_CHARS = 200
_CHUNK_ROWS = 4096  # rows hashed together (bounds the numpy arrays to a few tens of MB)
_WORD_SEED = 20240613
_P = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_ROW_BITS = 13  # _CHUNK_ROWS < 2**13: the row number's bits in a near-rule sort key
assert _CHUNK_ROWS < 1 << _ROW_BITS


# --- benchmarks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    name: str
    ids: list[str]
    texts: list[str]


def _records(src: BenchmarkSource, data: bytes) -> list:
    fmt = src.format
    if fmt == "auto":
        fmt = "parquet" if src.path.endswith((".parquet", ".pq")) else "jsonl"
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).to_pylist()
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            msg = f"benchmark {src.name!r}: {src.path}: line {number} is not a JSON object ({err})"
            raise ValueError(msg) from None
    return records


def load_benchmark(src: BenchmarkSource) -> Benchmark:
    """Read a benchmark's items: ``src.fields`` joined with a space; rows missing a field are skipped.

    An item's id is its ``id`` field when it has one, else its 0-based row number.
    """
    try:
        data = read_bytes(src.path)
    except StorageError as err:
        msg = f"benchmark {src.name!r}: cannot read {err}"
        raise StorageError(msg) from err
    ids: list[str] = []
    texts: list[str] = []
    for number, record in enumerate(_records(src, data)):
        if not isinstance(record, dict):
            continue
        values = [record.get(name) for name in src.fields]
        if any(v is None for v in values):
            continue
        text = " ".join(s for s in (str(v).strip() for v in values) if s)
        if not text:
            continue
        ids.append(str(record["id"]) if record.get("id") is not None else str(number))
        texts.append(text)
    if not texts:
        msg = f"benchmark {src.name!r}: no row of {src.path} has the fields {src.fields}"
        raise ValueError(msg)
    return Benchmark(src.name, ids, texts)


# --- normalization ----------------------------------------------------------------------------


def normalize_series(texts: pl.Series) -> pl.Series:
    """:func:`normalize` for a whole column at once (nulls stay null)."""
    texts = texts.cast(pl.Utf8).clone()  # scatter below writes in place: never into the caller's column
    wide = texts.str.contains(r"[^\x00-\x7F]").fill_null(False).arg_true()
    if wide.len():  # NFKC is the slowest step and changes nothing in ASCII text
        texts = texts.scatter(wide, texts.gather(wide).str.normalize("NFKC"))
    mark = "\x00"  # a non-word mark for thousands separators, so `\b` still sees them
    return (
        texts.str.to_lowercase()
        # 1,000,000 -> 1000000; two passes, since one match can hide the next separator
        .str.replace_all(r"(\d),(\d{3})\b", "${1}" + mark + "${2}")
        .str.replace_all(r"(\d),(\d{3})\b", "${1}" + mark + "${2}")
        .str.replace_all(mark, "", literal=True)
        .str.replace_all(r"(\d)\.0+\b", "${1}")  # 27.0 -> 27, 1.00 -> 1 (not 1.05)
        .str.replace_all(r"['‘’ʼ`´]", "")  # Janet's -> janets, don't -> dont
        # everything but letters, marks and digits ($, punctuation, symbols, white space) -> one
        # space; a lone space is already right, so only other runs are replaced (3x faster)
        .str.replace_all(r"[^\p{L}\p{M}\p{N}]{2,}|[^\p{L}\p{M}\p{N} ]", " ")
        .str.strip_chars(" ")
    )


def normalize(text: str) -> str:
    """The form both rules compare: NFKC, lower case, no thousands separators, no trailing ``.0``,
    no punctuation or ``$``, single spaces. Only letters, marks, digits and single spaces remain."""
    return normalize_series(pl.Series([text], dtype=pl.Utf8))[0]


def shingle_set(words: list[str], size: int = SHINGLE) -> set[str]:
    """Word ``size``-grams (the whole text when it is shorter)."""
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def lsh_params(threshold: float, num_perm: int = NUM_PERM, recall: float = 0.995) -> tuple[int, int]:
    """LSH bands ``(b, r)``: the most rows per band that still find a pair at ``threshold`` with ``recall``."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return num_perm, 1


# --- bulk span hashing ------------------------------------------------------------------------


class _KeySet:
    """A set of 64-bit hashes with a fast bulk membership test: a bitmap on the low bits filters
    (one memory read per value) and a binary search confirms the few values that pass."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = np.unique(keys)
        bits = min(23, max(10, int(self.keys.size * 64).bit_length()))  # ~1-2% of misses pass
        self.mask = np.uint64((1 << bits) - 1)
        self.bitmap = np.zeros(1 << bits, dtype=bool)
        self.bitmap[self.keys & self.mask] = True

    def member(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(values.size, dtype=bool)
        if self.keys.size == 0 or values.size == 0:
            return found
        maybe = np.flatnonzero(self.bitmap[values & self.mask])
        at = np.searchsorted(self.keys, values[maybe])
        at[at == self.keys.size] = 0
        found[maybe] = self.keys[at] == values[maybe]
        return found


class _Spans:
    """The words of normalized texts as 64-bit hashes, with prefix sums for the hash of any span.

    The hash of words ``w[i:i+m]`` is ``sum_j h(w[i+j]) * P**j`` modulo 2**64, the same wherever
    the span stands, so spans of rows and of benchmark items compare directly.
    """

    def __init__(self, norm: pl.Series) -> None:
        lists = pl.select(pl.when(norm != "").then(norm)).to_series().str.split(" ")
        self.lengths = lists.list.len().fill_null(0).to_numpy().astype(np.int64)
        self.offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        n = int(self.offsets[-1])
        words = lists.explode().drop_nulls()
        hashes = words.hash(seed=_WORD_SEED).to_numpy() if n else np.zeros(0, dtype=np.uint64)
        powers = np.full(n, _P, dtype=np.uint64)
        inverses = np.full(n, _P_INV, dtype=np.uint64)
        if n:
            powers[0] = inverses[0] = 1
        np.cumprod(powers, out=powers)
        np.cumprod(inverses, out=inverses)
        self.prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum(hashes * powers, out=self.prefix[1:])
        self.inverses = inverses
        self.row_of = np.repeat(np.arange(self.lengths.size, dtype=np.int64), self.lengths)
        self.row_end = np.repeat(self.offsets[1:], self.lengths)  # per word: where its text ends

    def spans(self, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every run of ``m`` words inside one text: (text number, start word within it, hash)."""
        n = self.row_of.size
        if n < m:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.uint64)
        start = np.arange(n - m + 1, dtype=np.int64)
        inside = start + m <= self.row_end[: n - m + 1]
        start, rows = start[inside], self.row_of[: n - m + 1][inside]
        hashes = (self.prefix[start + m] - self.prefix[start]) * self.inverses[start]
        return rows, start - self.offsets[rows], hashes

    def whole(self, rows: np.ndarray) -> np.ndarray:
        """The hash of each listed text's whole word sequence (rows with at least one word)."""
        start, end = self.offsets[rows], self.offsets[rows + 1]
        return (self.prefix[end] - self.prefix[start]) * self.inverses[start]


# --- the benchmark index ----------------------------------------------------------------------


@dataclass
class BenchmarkIndex:
    """All benchmark items of one run, indexed for both rules. Items are numbered globally."""

    ngram: int
    threshold: float
    names: list[str]
    refs: list[tuple[int, str]]  # item -> (benchmark number, item id)
    words: list[list[str]]  # item -> its normalized words
    ngram_items: dict[str, list[int]]  # n-gram -> items that have it (items of >= n words)
    ngram_count: list[int]  # item -> distinct n-grams (0 for a short item)
    ngram_hashes: _KeySet  # hashes of all those n-grams
    short_items: dict[str, list[int]]  # whole normalized text -> items (items of < n words)
    short_hashes: dict[int, _KeySet]  # word count -> whole-text hashes of short items
    shingles: list[set[str]]
    shingle_hashes: _KeySet  # hashes of every item shingle
    lsh: Any = field(repr=False)  # datasketch.MinHashLSH
    short_words: int = 0  # cfg.short_item_words (0: no short-item edit rule)
    max_edits: int = 0  # cfg.short_max_edits
    edit_allowed: dict[int, int] = field(default_factory=dict)  # short item -> word edits it allows (>= 1)
    edit_keys: dict[str, list[int]] = field(default_factory=dict)  # word -> short items it is a rarest word of
    edit_key_hashes: _KeySet | None = None  # hashes of those words

    @staticmethod
    def build(benchmarks: list[Benchmark], cfg: DecontaminationConfig) -> BenchmarkIndex:
        n = cfg.ngram
        refs = [(b, item_id) for b, bench in enumerate(benchmarks) for item_id in bench.ids]
        texts = [text for bench in benchmarks for text in bench.texts]
        norm = normalize_series(pl.Series(texts, dtype=pl.Utf8))
        words = [t.split(" ") if t else [] for t in norm.to_list()]
        spans = _Spans(norm)

        ngram_items: dict[str, list[int]] = defaultdict(list)
        short_items: dict[str, list[int]] = defaultdict(list)
        ngram_count = [0] * len(words)
        for item, w in enumerate(words):
            if len(w) >= n:
                grams = {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}
                ngram_count[item] = len(grams)
                for gram in grams:
                    ngram_items[gram].append(item)
            elif w:
                short_items[" ".join(w)].append(item)
        _, _, gram_hashes = spans.spans(n)
        short = np.flatnonzero((spans.lengths > 0) & (spans.lengths < n))
        short_hashes = {int(m): _KeySet(spans.whole(short[spans.lengths[short] == m])) for m in np.unique(spans.lengths[short])}

        shingles = [shingle_set(w) for w in words]
        _, _, shingle_hashes = spans.spans(SHINGLE)
        tiny = np.flatnonzero((spans.lengths > 0) & (spans.lengths < SHINGLE))
        b, r = lsh_params(cfg.near_threshold)
        from datasketch import MinHash, MinHashLSH  # imported here: it loads scipy and numba (seconds)

        lsh = MinHashLSH(num_perm=NUM_PERM, params=(b, r))
        nonempty = [i for i, s in enumerate(shingles) if s]
        signatures = MinHash.bulk([[s.encode() for s in shingles[i]] for i in nonempty], num_perm=NUM_PERM, seed=MINHASH_SEED)
        with lsh.insertion_session() as session:
            for i, signature in zip(nonempty, signatures, strict=True):
                session.insert(i, signature)

        edit_allowed = {
            i: min(cfg.short_max_edits, len(w) // EDIT_WORDS_PER_EDIT)
            for i, w in enumerate(words)
            if 0 < len(w) < cfg.short_item_words and len(w) >= EDIT_WORDS_PER_EDIT
        }
        frequency = Counter(word for w in words for word in set(w))
        edit_keys: dict[str, list[int]] = defaultdict(list)
        for item, allowed in sorted(edit_allowed.items()):
            for word in sorted(set(words[item]), key=lambda x: (frequency[x], x))[: allowed + 1]:
                edit_keys[word].append(item)
        key_words = pl.Series(sorted(edit_keys), dtype=pl.Utf8)
        key_hashes = key_words.hash(seed=_WORD_SEED).to_numpy() if len(key_words) else np.zeros(0, dtype=np.uint64)
        return BenchmarkIndex(
            ngram=n,
            threshold=cfg.near_threshold,
            names=[bench.name for bench in benchmarks],
            refs=refs,
            words=words,
            ngram_items=dict(ngram_items),
            ngram_count=ngram_count,
            ngram_hashes=_KeySet(gram_hashes),
            short_items=dict(short_items),
            short_hashes=short_hashes,
            shingles=shingles,
            shingle_hashes=_KeySet(np.concatenate([shingle_hashes, spans.whole(tiny)])),
            lsh=lsh,
            short_words=cfg.short_item_words,
            max_edits=cfg.short_max_edits,
            edit_allowed=edit_allowed,
            edit_keys=dict(edit_keys),
            edit_key_hashes=_KeySet(key_hashes),
        )


@dataclass
class _Hit:
    item: int
    method: str
    column: str
    span: str
    jaccard: float | None = None
    edits: int | None = None


# --- the two rules ----------------------------------------------------------------------------


def _ngram_hits(index: BenchmarkIndex, column: str, norm: pl.Series, spans: _Spans, live: np.ndarray) -> dict[int, _Hit]:
    """Rule 1 on one chunk of one column: rows (chunk-local) that share an n-gram or hold a short item."""
    candidates: dict[int, list[tuple[int, int]]] = defaultdict(list)  # row -> [(start, length)]
    lookups = [(index.ngram, index.ngram_hashes), *index.short_hashes.items()]
    for m, keys in lookups:
        rows, starts, hashes = spans.spans(m)
        hit = keys.member(hashes) & live[rows]
        for row, start in zip(rows[hit].tolist(), starts[hit].tolist(), strict=True):
            candidates[row].append((start, m))
    found: dict[int, _Hit] = {}
    if not candidates:
        return found
    order = sorted(candidates)
    for row, text in zip(order, norm.gather(order).to_list(), strict=True):
        words = text.split(" ")
        matched: dict[int, set[str]] = defaultdict(set)
        first: dict[int, str] = {}
        for start, m in sorted(candidates[row]):
            span = " ".join(words[start : start + m])
            items = index.ngram_items.get(span) if m == index.ngram else index.short_items.get(span)
            for item in items or ():  # None: a 64-bit hash collision, not a match
                matched[item].add(span)
                first.setdefault(item, span)
        if not matched:
            continue

        def coverage(item: int, matched=matched) -> tuple[float, int, int]:
            share = len(matched[item]) / index.ngram_count[item] if index.ngram_count[item] else 1.0
            return share, len(index.words[item]), -item

        best = max(matched, key=coverage)
        found[row] = _Hit(best, "ngram", column, first[best])
    return found


def _near_hits(index: BenchmarkIndex, column: str, norm: pl.Series, spans: _Spans, live: np.ndarray) -> dict[int, _Hit]:
    """Rule 2 on one chunk of one column: rows whose shingle set is a near copy of an item's."""
    t = index.threshold
    rows, _, hashes = spans.spans(SHINGLE)
    tiny = np.flatnonzero((spans.lengths > 0) & (spans.lengths < SHINGLE))
    rows = np.concatenate([rows, tiny])
    hashes = np.concatenate([hashes, spans.whole(tiny)])
    keep = live[rows]
    rows, hashes = rows[keep], hashes[keep]
    if rows.size == 0:
        return {}
    # Distinct shingles per row, and how many of them any item has: one sort of
    # (row | top hash bits | in-benchmark bit) keys; equal shingles make equal keys.
    shared = index.shingle_hashes.member(hashes).astype(np.uint64)
    keys = (rows.astype(np.uint64) << np.uint64(64 - _ROW_BITS)) | ((hashes >> np.uint64(_ROW_BITS + 1)) << np.uint64(1)) | shared
    keys.sort()
    distinct = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    distinct_rows = (distinct >> np.uint64(64 - _ROW_BITS)).astype(np.int64)
    total = np.bincount(distinct_rows, minlength=live.size)
    in_benchmarks = np.bincount(distinct_rows, weights=(distinct & np.uint64(1)).astype(np.float64), minlength=live.size)
    # |A & B| >= t * |A | B| >= t * |A| for a near copy, and A & B lies within the benchmarks' shingles
    possible = np.flatnonzero((total > 0) & (in_benchmarks >= t * total - 1e-9))
    if possible.size == 0:
        return {}
    texts = norm.gather(possible.tolist()).to_list()
    sets = [shingle_set(text.split(" ")) for text in texts]
    from datasketch import MinHash

    signatures = MinHash.bulk([[s.encode() for s in shingle] for shingle in sets], num_perm=NUM_PERM, seed=MINHASH_SEED)
    found: dict[int, _Hit] = {}
    for row, shingle, signature in zip(possible.tolist(), sets, signatures, strict=True):
        best: tuple[float, int] | None = None
        for item in index.lsh.query(signature):
            other = index.shingles[item]
            common = len(shingle & other)
            union = len(shingle) + len(other) - common
            if common >= t * union - 1e-9 and (best is None or (common / union, -item) > (best[0], -best[1])):
                best = (common / union, item)
        if best is not None:
            jaccard, item = best
            found[row] = _Hit(item, "near_duplicate", column, " ".join(index.words[item]), round(jaccard, 4))
    return found


def _is_number(word: str) -> bool:
    return word[0].isdigit()


def word_edits(item: list[str], text: list[str], limit: int) -> tuple[int, int, int] | None:
    """The fewest word edits (insertions, deletions, substitutions) that turn some run of ``text``
    into ``item``, if at most ``limit``: ``(edits, start, end)`` of that run, else None.

    Words of ``text`` before and after the run are free. A number is never edited: each number
    of the item must be matched by the same number, and the run holds no other number."""
    far = limit + 1
    m = len(text)
    # cost[j], start[j]: the best alignment of item[:i] ending just after text word j
    cost, start = [0] * (m + 1), list(range(m + 1))
    for word in item:
        fixed = _is_number(word)
        new_cost, new_start = [far] * (m + 1), [0] * (m + 1)
        new_cost[0], new_start[0] = (far if fixed else cost[0] + 1), start[0]
        for j in range(1, m + 1):
            other = text[j - 1]
            if other == word:
                best, origin = cost[j - 1], start[j - 1]
            else:
                best, origin = (far if fixed or _is_number(other) else cost[j - 1] + 1), start[j - 1]
            if not fixed and cost[j] + 1 < best:  # the item's word deleted
                best, origin = cost[j] + 1, start[j]
            if not _is_number(other) and new_cost[j - 1] + 1 < best:  # a text word inserted
                best, origin = new_cost[j - 1] + 1, new_start[j - 1]
            new_cost[j], new_start[j] = min(best, far), origin
        cost, start = new_cost, new_start
        if min(cost) > limit:
            return None
    edits = min(cost)
    end = min(j for j in range(m + 1) if cost[j] == edits)
    return (edits, start[end], end) if edits <= limit else None


def _edit_hits(index: BenchmarkIndex, column: str, norm: pl.Series, spans: _Spans, live: np.ndarray) -> dict[int, _Hit]:
    """Rule 3 on one chunk of one column: rows that hold a short item with a few word edits."""
    if not index.edit_allowed or index.edit_key_hashes is None:
        return {}
    eligible = live & (spans.lengths > 0) & (spans.lengths <= 2 * index.short_words)
    rows, starts, hashes = spans.spans(1)
    hit = eligible[rows] & index.edit_key_hashes.member(hashes)
    positions: dict[int, list[int]] = defaultdict(list)
    for row, start in zip(rows[hit].tolist(), starts[hit].tolist(), strict=True):
        positions[row].append(start)
    found: dict[int, _Hit] = {}
    if not positions:
        return found
    order = sorted(positions)
    for row, text in zip(order, norm.gather(order).to_list(), strict=True):
        words = text.split(" ")
        candidates = {item for at in positions[row] for item in index.edit_keys.get(words[at], ())}  # none: a hash collision
        present = set(words)
        best: tuple[int, int, int, int, int] | None = None  # (edits, -item length, item, start, end)
        for item in sorted(candidates):
            item_words, allowed = index.words[item], index.edit_allowed[item]
            # cheap necessary conditions first: every number there, and each other missing word costs an edit
            missing = [w for w in set(item_words) if w not in present]
            if len(missing) > allowed or any(_is_number(w) for w in missing):
                continue
            match = word_edits(item_words, words, allowed)
            if match is not None and (best is None or (match[0], -len(item_words), item) < best[:3]):
                best = (match[0], -len(item_words), item, match[1], match[2])
        if best is not None:
            edits, _, item, begin, end = best
            found[row] = _Hit(item, "edit_distance", column, " ".join(words[begin:end]), edits=edits)
    return found


# --- the stage --------------------------------------------------------------------------------


def _detail(index: BenchmarkIndex, hit: _Hit) -> str:
    bench, item_id = index.refs[hit.item]
    detail = {
        "benchmark": index.names[bench],
        "item": item_id,
        "method": hit.method,
        "column": hit.column,
        "span": hit.span[:SPAN_CHARS],
    }
    if hit.jaccard is not None:
        detail["jaccard"] = hit.jaccard
    if hit.edits is not None:
        detail["edits"] = hit.edits
    return json.dumps(detail, ensure_ascii=False)


def decontaminate(
    rows: pl.DataFrame, benchmarks: list[Benchmark], cfg: DecontaminationConfig, *, index: BenchmarkIndex | None = None
) -> StageResult:
    """Drop the rows that hold a benchmark item (see the module docstring for the two rules).

    ``index`` reuses a :meth:`BenchmarkIndex.build` of the same benchmarks and config across calls
    (shards). ``meta["contamination_hits"]`` counts the dropped rows per benchmark.
    """
    if index is None:
        index = BenchmarkIndex.build(benchmarks, cfg)
    elif (index.ngram, index.threshold, index.short_words, index.max_edits) != (
        cfg.ngram,
        cfg.near_threshold,
        cfg.short_item_words,
        cfg.short_max_edits,
    ):
        msg = (
            f"decontaminate: the index was built for ngram={index.ngram}, near_threshold={index.threshold}, "
            f"short_item_words={index.short_words}, short_max_edits={index.max_edits}, not this config"
        )
        raise ValueError(msg)
    columns = [c for c in cfg.columns if c in rows.columns]
    for column in columns:
        if rows.schema[column] != pl.Utf8:
            msg = f"decontaminate: column {column!r} is {rows.schema[column]}, expected text"
            raise TypeError(msg)
    hits: dict[int, _Hit] = {}
    if index.refs and columns:
        for base in range(0, rows.height, _CHUNK_ROWS):
            chunk = rows.slice(base, _CHUNK_ROWS)
            live = np.ones(chunk.height, dtype=bool)
            prepared = []
            for column in columns:
                norm = normalize_series(chunk[column])
                prepared.append((column, norm, _Spans(norm)))
            for rule in (_ngram_hits, _near_hits, _edit_hits):
                for column, norm, spans in prepared:
                    for row, hit in rule(index, column, norm, spans, live).items():
                        hits[base + row] = hit
                        live[row] = False

    flagged = sorted(hits)
    if flagged:
        mask = np.ones(rows.height, dtype=bool)
        mask[flagged] = False
        kept = rows.filter(pl.Series(mask))
        rejects = rows_to_rejects(STAGE, rows[flagged], REASON, [_detail(index, hits[i]) for i in flagged])
    else:
        kept, rejects = rows, empty_rejects()
    per_benchmark = dict.fromkeys(index.names, 0)
    for hit in hits.values():
        per_benchmark[index.names[index.refs[hit.item][0]]] += 1
    dropped = {REASON: len(flagged)} if flagged else {}
    count = StageCount(STAGE, rows.height, kept.height, 1, dropped).check()
    meta = {"contamination_hits": per_benchmark, "columns_checked": columns}
    return StageResult(STAGE, kept, rejects, count, meta=meta)
