"""Dedup: exact (normalized text hash) and near-duplicate (MinHash + LSH), within a run and
against earlier versions.

Keep policy, per cluster: rows already published in an ``against`` version win; then correct
rows, then higher ``reward``, then the earliest row (``seed_id``, ``sample_index``, input order).
Clusters are transitive (A~B and B~C puts A, B, C together), as in datatrove and NeMo Curator.

Choosing parameters (``dedup`` in the recipe): a pair with Jaccard ``s`` becomes a candidate
with probability ``1 - (1 - s**r)**b`` for ``b`` bands of ``r`` rows. More rows per band cut
false positives (pairs below the threshold that collide) and raise false negatives; more bands do
the opposite. Without a candidate check, ``b`` and ``r`` minimize the two areas equally at the threshold,
as datasketch's ``MinHashLSH`` does (0.8 with 128 permutations: 9 x 13, a pair at exactly 0.8
becomes a candidate 40% of the time). With a check (``verify_candidates``, default "exact")
false positives are removed afterwards, so misses are weighted 9:1 instead (14 x 9: 87% at
0.8, 99.9% at 0.9): recall is what banding decides and precision what the check decides.

One implementation, in bounded memory, over shards (``ShardedDedup``), like datatrove's stages;
a frame in memory is one shard (``dedup_samples``). The same code handles 10k rows here and 10M
on a cluster; only the shard count changes. Rows get ids in the order they are added:
``0 .. m-1`` are the rows of the ``against`` versions, then the input rows. Four steps:

1. ``add_shard`` (per shard): the normalized-text sha256 and the MinHash signature of each row
   (signatures, ``distillery.minhash.signatures``, datasketch-compatible, are computed by the
   caller: on Ray workers in the flows, ``tasks/dedup.py``). The shard's rows, hashes
   and signatures go to the spill folder; ``(digest, id)`` records and ``(band, band key, id)``
   records are appended to spill files partitioned by hash bucket.
2. ``resolve``, exact: bucket by bucket, rows with the same digest; the first (lowest id) is kept,
   the others are ``exact_duplicate`` (or ``duplicate_of_earlier`` if an ``against`` row has it).
3. ``resolve``, near: bucket by bucket, rows (not exact duplicates) that share a band key become
   candidate pairs exactly as ``minhash.candidate_pairs`` makes them; the pairs are checked
   (exact shingle Jaccard of the texts, read back from the spilled shards, or the signature
   estimate) and joined into clusters with connected components; each cluster keeps its lowest
   id, the others are ``near_duplicate`` (or ``duplicate_of_earlier``).
4. ``split`` (per shard): the shard's rows, with the dropped ones (``drops.parquet``, by id)
   turned into rejects and the kept ones' signature table for publishing.

A bucket file larger than ``bucket_bytes`` is split into 16 by further hash bits, again and
again, so a bucket always fits the budget, however large the input; the number of buckets grows
with the input. Memory is then one shard, one bucket, plus what grows with the *duplicates*
only: the ids of exact duplicates (8 bytes each), the checked near-duplicate pairs (16 bytes
each) and the drop table. ``against`` versions are held in memory as ``dedup.load_earlier``
loads them (their ids, hashes and signatures: about 600 bytes a row).

Keep policy, in detail: in each group the row first in keep-policy order wins
(correct rows, then higher ``reward``, then ``seed_id``/``sample_index``, then input order). For a
plain data set that is input order and the ids are used as they are. When the rows have any of
those columns, ``resolve`` sorts just those columns (about 40 bytes a row, briefly) and works on
ids renumbered in that order (16 bytes a row); the kept rows stay in input order.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from distillery import minhash
from distillery.accounting import StageCount, StageResult, empty_rejects, rows_to_rejects
from schemas.recipe import DedupConfig

_PUNCT = re.compile(r"[^\w\s]")
_SPACE = re.compile(r"\s+")


def components(pairs: np.ndarray, n: int) -> np.ndarray:
    """The connected component of each of ``n`` nodes, given edges ``pairs`` (k x 2): a cluster of
    near-duplicates, transitively (scipy's ``connected_components``, imported on first use)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = pairs.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]

def normalize_text(text: str) -> str:
    """Case, Unicode form, punctuation and white space do not make two texts different."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()


@dataclass(frozen=True)
class EarlierRows:
    """Signatures of rows published before (``signatures/`` of a version): no text needed."""

    uri: str
    sample_ids: list[str]
    text_sha256: list[str]
    signatures: np.ndarray  # (n, num_perm) uint32


def signature_params(cfg: DedupConfig) -> dict:
    return {"num_perm": cfg.num_perm, "seed": cfg.seed, "ngram": cfg.ngram, "scheme": minhash.HASH_SCHEME}


def banding(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.bands is not None:
        return cfg.bands, cfg.rows_per_band
    # Checked candidates cost little and false positives are removed by the check, so weight
    # misses 9:1 (0.8 / 128 perms: 14 x 9, P(candidate | J=0.8) = 0.87 instead of 0.40).
    weight = 0.5 if cfg.verify_candidates == "none" else 0.9
    return minhash.optimal_bands(cfg.threshold, cfg.num_perm, false_negative_weight=weight)


def near_duplicate_clusters(
    sigs: np.ndarray, cfg: DedupConfig, *, texts: pl.Series | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster rows by near-duplicate edges.

    Returns ``(labels, pairs, similarity)``: a cluster label per row, and the checked candidate
    pairs with their similarity (signature estimate, or exact shingle Jaccard when
    ``cfg.verify_candidates == "exact"``; ``texts`` is needed then).
    """
    bands, rows = banding(cfg)
    pairs = minhash.candidate_pairs(minhash.band_keys(sigs, bands, rows))
    if cfg.verify_candidates == "exact" and texts is not None and len(pairs):
        similarity = minhash.exact_jaccard(texts, pairs, ngram=cfg.ngram)
    else:
        similarity = minhash.estimated_jaccard(sigs[pairs[:, 0]], sigs[pairs[:, 1]]) if len(pairs) else np.zeros(0)
    if cfg.verify_candidates != "none":
        keep = similarity >= cfg.threshold
        pairs, similarity = pairs[keep], similarity[keep]
    return components(pairs, sigs.shape[0]), pairs, similarity


def priority_order(samples: pl.DataFrame) -> pl.DataFrame:
    """Rows in keep-policy order: correct first, then higher reward, then earliest."""
    frame = samples.with_row_index("__input_order")
    keys, descending = [], []
    if "correct" in frame.columns:
        keys.append(pl.col("correct").fill_null(False))
        descending.append(True)
    if "reward" in frame.columns:
        keys.append(pl.col("reward").fill_null(float("-inf")))
        descending.append(True)
    for name in ("seed_id", "sample_index"):
        if name in frame.columns:
            keys.append(pl.col(name))
            descending.append(False)
    keys.append(pl.col("__input_order"))
    descending.append(False)
    return frame.sort(keys, descending=descending, maintain_order=True).drop("__input_order")


def dedup_samples(
    samples: pl.DataFrame,
    cfg: DedupConfig,
    *,
    text_column: str = "completion",
    earlier: list[EarlierRows] = (),
    signature_fn: Callable[[pl.Series], np.ndarray] | None = None,
    workdir: Path | None = None,
) -> StageResult:
    """The dedup stage on one frame: ``ShardedDedup`` with the frame as its only shard.

    Drops exact and near duplicates of ``text_column`` (within the rows and against ``earlier``);
    the kept rows stay in input order. Rejects name the row they duplicate. ``meta["signatures"]``
    holds the kept rows' ids, text hashes and MinHash signatures, for publishing beside the version
    (later runs dedup against them without reading text). ``signature_fn`` lets the flow compute
    signatures on Ray. The spill folder is a temporary one under ``workdir`` (or the system's).
    """
    compute = signature_fn or (lambda t: minhash.signatures(t, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed))
    with tempfile.TemporaryDirectory(prefix="distillery-dedup-", dir=workdir) as tmp:
        spilled = ShardedDedup(cfg, text_column, Path(tmp), earlier=earlier)
        texts = samples[text_column].cast(pl.Utf8).fill_null("") if samples.height else None
        spilled.add_shard(samples, compute(texts) if samples.height else None)
        count = spilled.resolve()
        kept, rejects, table = spilled.split(0)
    meta = {"signatures": table, "signature_params": signature_params(cfg), "against": [e.uri for e in earlier]}
    return StageResult(STAGE, kept, rejects, count, meta=meta)


def earlier_from_table(uri: str, table: pl.DataFrame, params: dict, cfg: DedupConfig) -> EarlierRows:
    """Check that stored signatures were made with this run's parameters, then wrap them."""
    expected = signature_params(cfg)
    for key, value in expected.items():
        if params.get(key) != value:
            msg = f"dedup.against {uri}: its signatures use {key}={params.get(key)!r}, this recipe {key}={value!r}; they cannot be compared"
            raise ValueError(msg)
    sigs = np.array(table["minhash"].to_list(), dtype=np.uint32).reshape(table.height, cfg.num_perm)
    return EarlierRows(uri, table["sample_id"].to_list(), table["text_sha256"].to_list(), sigs)


def load_earlier(uri: str, cfg: DedupConfig) -> EarlierRows:
    """The signatures of a published version, ``STORE/NAME/vNNNN`` (or ``STORE/NAME`` for its latest)."""
    from distillery.stages.publish import read_shards
    from distillery.store import open_version

    store, manifest = open_version(uri, what="dedup.against")
    if "signatures" not in manifest:
        msg = f"dedup.against {uri}: version {manifest['version']} was published without MinHash signatures"
        raise ValueError(msg)
    params = {k: v for k, v in manifest["signatures"].items() if k != "shards"}
    return earlier_from_table(store.uri(f"{manifest['dataset']}/{manifest['version']}"), read_shards(store, manifest, "signatures"), params, cfg)


# -- the stage over shards, in bounded memory ----------------------------------------

STAGE = "dedup"
EXACT_RECORD = np.dtype([("digest", "<u8", (4,)), ("id", "<i8")])
BAND_RECORD = np.dtype([("key", "<u8"), ("band", "<i8"), ("id", "<i8")])
FANOUT_BITS = 4  # 16 buckets, and 16 sub-buckets for a bucket over budget
DEFAULT_BUCKET_BYTES = 8 << 20
MAX_BUCKET = 64  # as minhash.candidate_pairs: larger band buckets connect to their first member only
PRIORITY_COLUMNS = ("correct", "reward", "seed_id", "sample_index")  # what priority_order sorts by
PAIR_CHUNK = 100_000  # candidate pairs checked at a time (bounds the texts read back)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_EXACT, _NEAR, _EARLIER_EXACT, _EARLIER_NEAR = 0, 1, 2, 3  # reason codes of the drop table
REASONS = ("exact_duplicate", "near_duplicate", "duplicate_of_earlier", "duplicate_of_earlier")


def _bucket_of(keys: np.ndarray, level: int) -> np.ndarray:
    """Bucket (0..15) of each 64-bit key at split level ``level`` (0 first, then 1, ...)."""
    mixed = keys.astype(np.uint64) * _MIX
    shift = np.uint64(64 - FANOUT_BITS * (level + 1))
    return ((mixed >> shift) & np.uint64((1 << FANOUT_BITS) - 1)).astype(np.int64)


def spill_by_bucket(records: np.ndarray, keys: np.ndarray, folder: Path, level: int = 0) -> None:
    buckets = _bucket_of(keys, level)
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange((1 << FANOUT_BITS) + 1))
    for b in range(1 << FANOUT_BITS):
        part = records[order[bounds[b] : bounds[b + 1]]]
        if part.size:
            with open(folder / f"{b:02d}.bin", "ab") as f:
                part.tofile(f)


def read_buckets(folder: Path, dtype: np.dtype, key, budget: int, level: int = 0):
    """The records of each bucket, one bucket at a time; an over-budget bucket is split first."""
    for path in sorted(folder.glob("*.bin")):
        if path.stat().st_size <= budget or level >= 64 // FANOUT_BITS - 1:
            yield np.fromfile(path, dtype=dtype)
            continue
        sub = folder / f"{path.stem}.split"
        sub.mkdir()
        step = max(1, budget // dtype.itemsize)
        with open(path, "rb") as f:
            while (chunk := np.fromfile(f, dtype=dtype, count=step)).size:
                spill_by_bucket(chunk, key(chunk), sub, level + 1)
        path.unlink()
        yield from read_buckets(sub, dtype, key, budget, level + 1)


def _exact_key(records: np.ndarray) -> np.ndarray:
    return records["digest"][:, 0]


def _band_key(records: np.ndarray) -> np.ndarray:
    return records["key"] ^ records["band"].astype(np.uint64)


@dataclass
class _Shard:
    offset: int  # id of its first row
    rows: int
    path: Path  # its folder in the spill


class ShardedDedup:
    """Exact and near dedup of shards added one by one, in a spill folder (removed by ``close``)."""

    def __init__(self, cfg: DedupConfig, text_column: str, workdir: Path, *, earlier: list[EarlierRows] = (), bucket_bytes: int | None = None) -> None:
        self.cfg, self.text_column = cfg, text_column
        self.budget = bucket_bytes or DEFAULT_BUCKET_BYTES
        self.workdir = Path(workdir)
        self.bands, self.band_rows = banding(cfg)
        self.earlier = list(earlier)
        self.old_refs = [(e.uri, sid) for e in self.earlier for sid in e.sample_ids]
        self.m = len(self.old_refs)
        self.old_sigs = np.vstack([e.signatures for e in self.earlier]) if self.m else np.zeros((0, cfg.num_perm), dtype=np.uint32)
        self.shards: list[_Shard] = []
        self.n = 0
        self.rank_of: np.ndarray | None = None  # input row -> its place in keep-policy order
        self.row_of: np.ndarray | None = None  # and back
        self.dropped: dict[str, int] = {}
        self.stats = {"exact_buckets": 0, "band_buckets": 0, "candidate_pairs": 0, "near_pairs": 0}  # for the log
        for name in ("exact", "bands", "shards"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        if self.m:
            digests = np.array([bytes.fromhex(h) for e in self.earlier for h in e.text_sha256], dtype="S32").view("<u8").reshape(-1, 4)
            self._spill_records(np.arange(self.m, dtype=np.int64), digests, self.old_sigs)

    @property
    def ids_end(self) -> int:
        return self.m + self.n

    # -- 1. per shard --------------------------------------------------------------------------
    def add_shard(self, rows: pl.DataFrame, signatures: np.ndarray | None) -> None:
        """Spill one shard of rows (in keep-policy order) with its signatures ``(rows, num_perm)``."""
        if signatures is None:
            signatures = np.zeros((rows.height, self.cfg.num_perm), dtype=np.uint32)
        texts = rows[self.text_column].cast(pl.Utf8).fill_null("").to_list()
        digests_hex = [text_hash(t) for t in texts]
        folder = self.workdir / "shards" / f"{len(self.shards):05d}"
        folder.mkdir()
        rows.write_ipc(folder / "rows.arrow", compat_level=pl.CompatLevel.oldest())  # large_string: pyarrow takes from it in place
        priority = [c for c in PRIORITY_COLUMNS if c in rows.columns]
        if priority:
            rows.select(priority).write_ipc(folder / "priority.arrow")
        pl.DataFrame({"text_sha256": digests_hex}, schema={"text_sha256": pl.Utf8}).write_ipc(folder / "hashes.arrow")
        np.save(folder / "signatures.npy", signatures)
        ids = np.arange(self.ids_end, self.ids_end + rows.height, dtype=np.int64)
        digests = np.array([bytes.fromhex(h) for h in digests_hex], dtype="S32").view("<u8").reshape(-1, 4) if texts else np.zeros((0, 4), np.uint64)
        self._spill_records(ids, digests, signatures)
        self.shards.append(_Shard(self.ids_end, rows.height, folder))
        self.n += rows.height

    def _spill_records(self, ids: np.ndarray, digests: np.ndarray, signatures: np.ndarray) -> None:
        if not ids.size:
            return
        exact = np.empty(ids.size, dtype=EXACT_RECORD)
        exact["digest"], exact["id"] = digests, ids
        spill_by_bucket(exact, _exact_key(exact), self.workdir / "exact")
        keys = minhash.band_keys(signatures, self.bands, self.band_rows)  # (rows, bands)
        bands = np.empty(keys.size, dtype=BAND_RECORD)
        bands["key"] = keys.ravel()
        bands["band"] = np.tile(np.arange(self.bands, dtype=np.int64), ids.size)
        bands["id"] = np.repeat(ids, self.bands)
        spill_by_bucket(bands, _band_key(bands), self.workdir / "bands")

    # -- 2 and 3. duplicates ---------------------------------------------------------------------
    def resolve(self) -> StageCount:
        """Find every duplicate; writes ``drops.parquet`` (id, reason, detail) and returns the counts."""
        self._rank_rows()
        drop_ids, drop_reason, drop_ref = [], [], []
        if self.cfg.exact:
            for records in read_buckets(self.workdir / "exact", EXACT_RECORD, _exact_key, self.budget):
                self.stats["exact_buckets"] += 1
                records["id"] = self._ranked(records["id"])
                ids, reasons, refs = _exact_duplicates(records, self.m)
                drop_ids.append(ids), drop_reason.append(reasons), drop_ref.append(refs)
        exact_ids = np.sort(np.concatenate(drop_ids)) if drop_ids else np.zeros(0, dtype=np.int64)
        if self.cfg.near and self.n:
            ids, reasons, refs = self._near_duplicates(exact_ids)
            drop_ids.append(ids), drop_reason.append(reasons), drop_ref.append(refs)
        ids = np.concatenate(drop_ids) if drop_ids else np.zeros(0, dtype=np.int64)
        reasons = np.concatenate(drop_reason) if drop_reason else np.zeros(0, dtype=np.int8)
        refs = np.concatenate(drop_ref) if drop_ref else np.zeros(0, dtype=np.int64)
        details = self._details(ids, reasons, refs)
        ids = self._unranked(ids)
        order = np.argsort(ids, kind="stable")
        ids, reasons, details = ids[order], reasons[order], [details[k] for k in order.tolist()]
        pl.DataFrame(
            {"id": ids, "reason": [REASONS[r] for r in reasons.tolist()], "detail": details}, schema={"id": pl.Int64, "reason": pl.Utf8, "detail": pl.Utf8}
        ).write_parquet(self.workdir / "drops.parquet")
        self.dropped = dict(Counter(REASONS[r] for r in reasons.tolist()))
        return StageCount(STAGE, self.n, self.n - int(ids.size), 1, self.dropped).check()

    def _near_duplicates(self, exact_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        edges = []  # checked pairs, as codes i * ids_end + j; only near duplicates stay in memory
        for records in read_buckets(self.workdir / "bands", BAND_RECORD, _band_key, self.budget):
            records["id"] = self._ranked(records["id"])
            records = records[~np.isin(records["id"], exact_ids, assume_unique=False)]
            pairs = _band_pairs(records)
            self.stats["band_buckets"] += 1
            if not len(pairs):
                continue
            codes = np.unique(pairs[:, 0] * self.ids_end + pairs[:, 1])  # a pair can share several bands
            self.stats["candidate_pairs"] += int(codes.size)  # (a pair from two buckets counts twice)
            for start in range(0, codes.size, PAIR_CHUNK):
                chunk = codes[start : start + PAIR_CHUNK]
                edges.append(chunk[self._check(np.stack([chunk // self.ids_end, chunk % self.ids_end], axis=1))])
        codes = np.unique(np.concatenate(edges)) if edges else np.zeros(0, dtype=np.int64)
        self.stats["near_pairs"] = int(codes.size)
        if not codes.size:
            return np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64)
        edges = np.stack([codes // self.ids_end, codes % self.ids_end], axis=1)
        nodes, local = np.unique(edges, return_inverse=True)
        local = local.reshape(-1, 2)
        labels = components(local, nodes.size)
        clusters, first = np.unique(labels, return_index=True)  # nodes ascend: a cluster's lowest id wins
        winner_of = np.empty(clusters.size, dtype=np.int64)
        winner_of[clusters] = nodes[first]
        winners = winner_of[labels]
        losers = (nodes != winners) & (nodes >= self.m)
        ids, refs = nodes[losers], winners[losers]
        reasons = np.where(refs < self.m, _EARLIER_NEAR, _NEAR).astype(np.int8)
        return ids, reasons, refs

    def _check(self, pairs: np.ndarray) -> np.ndarray:
        """Which candidate pairs are near duplicates (``near_duplicate_clusters``' check)."""
        cfg = self.cfg
        if cfg.verify_candidates == "none":
            return np.ones(len(pairs), dtype=bool)
        if cfg.verify_candidates == "exact" and not self.m:
            docs, inverse = np.unique(pairs, return_inverse=True)
            texts = self._column(docs, self.text_column)
            similarity = minhash.exact_jaccard(texts, inverse.reshape(-1, 2).astype(np.int64), ngram=cfg.ngram)
        else:
            similarity = minhash.estimated_jaccard(self._signatures(pairs[:, 0]), self._signatures(pairs[:, 1]))
        return similarity >= cfg.threshold

    # -- keep-policy order -------------------------------------------------------------------
    def _rank_rows(self) -> None:
        """Number the input rows in keep-policy order, when they have a column that sets it."""
        files = [(s, s.path / "priority.arrow") for s in self.shards]
        if not any(path.exists() for _, path in files):
            return
        keys = pl.concat(
            [pl.read_ipc(path) if path.exists() else pl.DataFrame({"__none": [None] * s.rows}) for s, path in files], how="diagonal_relaxed"
        )
        self.row_of = priority_order(keys.with_row_index("__row"))["__row"].to_numpy().astype(np.int64)
        self.rank_of = np.empty_like(self.row_of)
        self.rank_of[self.row_of] = np.arange(self.row_of.size)

    def _ranked(self, ids: np.ndarray) -> np.ndarray:
        """Ids in input order -> ids in keep-policy order (``against`` rows, below m, stay)."""
        if self.rank_of is None:
            return ids
        new = ids >= self.m
        return np.where(new, self.m + self.rank_of[np.where(new, ids - self.m, 0)], ids)

    def _unranked(self, ids: np.ndarray) -> np.ndarray:
        if self.row_of is None:
            return ids
        new = ids >= self.m
        return np.where(new, self.m + self.row_of[np.where(new, ids - self.m, 0)], ids)

    # -- reading spilled rows back by id -------------------------------------------------------
    def _by_shard(self, ids: np.ndarray):
        """``(shard, positions in ids, row numbers in the shard)`` for the input ids (>= m, keep-policy ids)."""
        ids = self._unranked(ids)
        offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        which = np.searchsorted(offsets, ids, side="right") - 1
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            yield self.shards[k], at, ids[at] - self.shards[k].offset

    def _column(self, ids: np.ndarray, column: str, file: str = "rows.arrow") -> pl.Series:
        """Values of one spilled column for input ids, in the order given."""
        parts, positions = [], []
        for shard, at, local in self._by_shard(ids):
            with pa.memory_map(str(shard.path / file)) as source:  # zero-copy: only the rows taken are read
                taken = pa.ipc.open_file(source).read_all().column(column).take(pa.array(local))
            parts.append(pl.Series(column, taken).cast(pl.Utf8))
            positions.append(at)
        if not parts:
            return pl.Series(column, [], dtype=pl.Utf8)
        return pl.concat(parts).gather(np.argsort(np.concatenate(positions)))

    def _signatures(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((ids.size, self.cfg.num_perm), dtype=np.uint32)
        old = ids < self.m
        out[old] = self.old_sigs[ids[old]]
        new = np.flatnonzero(~old)
        for shard, at, local in self._by_shard(ids[new]):
            out[new[at]] = np.load(shard.path / "signatures.npy", mmap_mode="r")[local]
        return out

    def _details(self, ids: np.ndarray, reasons: np.ndarray, refs: np.ndarray) -> list[str]:
        """The detail text of each drop (the row it duplicates, and the estimated Jaccard)."""
        near = (reasons == _NEAR) | (reasons == _EARLIER_NEAR)
        estimates = np.zeros(ids.size)
        if near.any():
            estimates[near] = minhash.estimated_jaccard(self._signatures(ids[near]), self._signatures(refs[near]))
        new_refs = refs >= self.m
        ref_ids = [None] * ids.size
        if new_refs.any():
            for position, value in zip(np.flatnonzero(new_refs).tolist(), self._column(refs[new_refs], "sample_id").to_list(), strict=True):
                ref_ids[position] = value
        details = []
        for k, (reason, ref) in enumerate(zip(reasons.tolist(), refs.tolist(), strict=True)):
            if reason == _EXACT:
                details.append(f"duplicates sample {ref_ids[k]}")
            elif reason == _NEAR:
                details.append(f"duplicates sample {ref_ids[k]} (J~{estimates[k]:.2f})")
            elif reason == _EARLIER_NEAR:
                uri, sid = self.old_refs[ref]
                details.append(f"near copy (J~{estimates[k]:.2f}) of {uri} sample {sid}")
            else:
                uri, sid = self.old_refs[ref]
                details.append(f"same text as {uri} sample {sid}")
        return details

    # -- 4. per shard, again ---------------------------------------------------------------------
    def split(self, k: int) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
        """Shard ``k``'s kept rows, its rejects, and the kept rows' signature table."""
        shard = self.shards[k]
        rows = pl.read_ipc(shard.path / "rows.arrow")
        drops = (
            pl.scan_parquet(self.workdir / "drops.parquet")
            .filter(pl.col("id").is_between(shard.offset, shard.offset + shard.rows - 1))
            .collect()
        )
        local = (drops["id"] - shard.offset).to_numpy()
        keep = np.ones(rows.height, dtype=bool)
        keep[local] = False
        kept = rows.filter(pl.Series(keep))
        rejects = rows_to_rejects(STAGE, rows[local.tolist()], drops["reason"].to_list(), drops["detail"].to_list()) if local.size else empty_rejects()
        kept_idx = np.flatnonzero(keep)
        signatures = np.load(shard.path / "signatures.npy")[kept_idx]
        hashes = pl.read_ipc(shard.path / "hashes.arrow")["text_sha256"].gather(kept_idx)
        table = pl.DataFrame(
            {
                "sample_id": kept["sample_id"].cast(pl.Utf8),
                "text_sha256": hashes,
                "minhash": pl.Series("minhash", signatures).cast(pl.List(pl.UInt32)) if kept_idx.size else pl.Series("minhash", [], dtype=pl.List(pl.UInt32)),
            }
        )
        return kept, rejects, table

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _exact_duplicates(records: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within one bucket: every input row whose digest an earlier-id row (or an ``against`` row) has."""
    d = records["digest"]
    order = np.lexsort((records["id"], d[:, 3], d[:, 2], d[:, 1], d[:, 0]))
    d, ids = d[order], records["id"][order]
    new_group = np.r_[True, (d[1:] != d[:-1]).any(axis=1)]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    first = ids[starts][group]
    # a hash in an against version names that version's row (the last one with it)
    is_old = ids < m
    last_old = np.full(starts.size, -1, dtype=np.int64)
    np.maximum.at(last_old, group[is_old], ids[is_old])
    old_ref = last_old[group]
    drop = (ids >= m) & ((old_ref >= 0) | (ids != first))
    reasons = np.where(old_ref[drop] >= 0, _EARLIER_EXACT, _EXACT).astype(np.int8)
    refs = np.where(old_ref[drop] >= 0, old_ref[drop], first[drop])
    return ids[drop], reasons, refs


def _band_pairs(records: np.ndarray) -> np.ndarray:
    """``minhash.candidate_pairs`` for the (band, key) groups of one bucket: ids, not row numbers."""
    if records.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    order = np.lexsort((records["id"], records["key"], records["band"]))
    band, key, ids = records["band"][order], records["key"][order], records["id"][order]
    n = ids.size
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
    sizes = np.diff(np.r_[starts, n])
    found = []
    for size in np.unique(sizes[sizes > 1]):
        members = ids[starts[sizes == size][:, None] + np.arange(size)]  # ascending ids per group
        if size <= MAX_BUCKET:
            i, j = np.triu_indices(size, k=1)
            found.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
        else:
            found.append(np.stack([np.repeat(members[:, 0], size - 1), members[:, 1:].ravel()], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
