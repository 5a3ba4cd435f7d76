"""Dedup: exact (normalized text hash) and near-duplicate (MinHash + LSH), within a run and
against earlier versions.

The near-duplicate path is built to scale past one process, like datatrove's three stages:
1. signatures: ``distillery.minhash.signatures`` (datasketch-compatible, one numba kernel),
   computed per shard (on Ray workers in the flow: ``tasks/dedup.py``);
2. buckets: LSH band keys as a polars table, grouped to candidate pairs (no Python dict of all
   signatures);
3. clusters: candidate pairs checked (signature agreement, or exact shingle Jaccard) and joined
   into clusters with scipy's connected components (union-find).
The same code handles 10k rows here and 10M on a cluster; only the shard count changes.

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
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from distillery import minhash
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
    n = sigs.shape[0]
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n), dtype=np.int8)
    _, labels = connected_components(graph, directed=False)
    return labels, pairs, similarity


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
) -> StageResult:
    """Drop exact and near duplicates of ``text_column`` (within the rows and against ``earlier``).

    Rejects name the row they duplicate. ``meta["signatures"]`` holds the kept rows' ids, text
    hashes and MinHash signatures, for publishing beside the version (later runs dedup against
    them without reading text). ``signature_fn`` lets the flow compute signatures on Ray.
    """
    ordered = priority_order(samples)
    n = ordered.height
    ids = ordered["sample_id"].cast(pl.Utf8).to_list()
    texts = ordered[text_column].fill_null("").to_list()
    hashes = [text_hash(t) for t in texts]
    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n

    earlier_hash = {h: (e.uri, sid) for e in earlier for h, sid in zip(e.text_sha256, e.sample_ids, strict=True)}
    first_with_hash: dict[str, int] = {}
    if cfg.exact:
        for i, h in enumerate(hashes):
            if h in earlier_hash:
                uri, sid = earlier_hash[h]
                reason[i], detail[i] = "duplicate_of_earlier", f"same text as {uri} sample {sid}"
            elif h in first_with_hash:
                reason[i], detail[i] = "exact_duplicate", f"duplicates sample {ids[first_with_hash[h]]}"
            else:
                first_with_hash[h] = i

    compute = signature_fn or (lambda t: minhash.signatures(t, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed))
    sigs = compute(pl.Series(texts, dtype=pl.Utf8)) if n else np.zeros((0, cfg.num_perm), dtype=np.uint32)
    if cfg.near and n:
        live = np.array([i for i in range(n) if reason[i] is None], dtype=np.int64)
        old_sigs = [e.signatures for e in earlier if len(e.sample_ids)]
        old_refs = [(e.uri, sid) for e in earlier for sid in e.sample_ids]
        stacked = np.vstack([*old_sigs, sigs[live]]) if old_sigs else sigs[live]
        m = len(old_refs)
        stacked_texts = None if m else pl.Series(texts, dtype=pl.Utf8).gather(live)
        labels, _, _ = near_duplicate_clusters(stacked, cfg, texts=stacked_texts)
        winner: dict[int, int] = {}  # cluster -> stacked index of its keeper (earlier rows first, then priority)
        for k in range(len(stacked)):
            winner.setdefault(int(labels[k]), k)
        for k in range(m, len(stacked)):
            w = winner[int(labels[k])]
            if w == k:
                continue
            i = int(live[k - m])
            estimate = float(minhash.estimated_jaccard(stacked[k : k + 1], stacked[w : w + 1])[0])
            if w < m:
                uri, sid = old_refs[w]
                reason[i], detail[i] = "duplicate_of_earlier", f"near copy (J~{estimate:.2f}) of {uri} sample {sid}"
            else:
                reason[i], detail[i] = "near_duplicate", f"duplicates sample {ids[int(live[w - m])]} (J~{estimate:.2f})"

    dropped_idx = [i for i in range(n) if reason[i] is not None]
    keep_mask = np.array([r is None for r in reason], dtype=bool)
    kept = ordered.filter(pl.Series(keep_mask)) if n else ordered
    rejects = (
        rows_to_rejects("dedup", ordered[dropped_idx], [reason[i] for i in dropped_idx], [detail[i] for i in dropped_idx])
        if dropped_idx
        else empty_rejects()
    )
    counts: dict[str, int] = {}
    for i in dropped_idx:
        counts[reason[i]] = counts.get(reason[i], 0) + 1
    kept_idx = np.flatnonzero(keep_mask)
    signature_table = pl.DataFrame(
        {
            "sample_id": [ids[i] for i in kept_idx],
            "text_sha256": [hashes[i] for i in kept_idx],
            "minhash": pl.Series(sigs[kept_idx].tolist() if len(kept_idx) else [], dtype=pl.List(pl.UInt32)),
        }
    )
    meta = {"signatures": signature_table, "signature_params": signature_params(cfg), "against": [e.uri for e in earlier]}
    return StageResult("dedup", kept, rejects, StageCount("dedup", samples.height, kept.height, 1, counts).check(), meta=meta)


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
