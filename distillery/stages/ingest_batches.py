"""Ingest for curation, in bounded batches: the same checks and rejects as
``distillery.stages.ingest.ingest_rows``, but the input is read ``batch_rows`` rows at a time, so
memory holds one batch, never the whole file.

Each batch comes back as a :class:`~distillery.accounting.StageResult` of stage ``ingest``;
summed, their counts, kept rows and rejects are what ``ingest_rows`` returns for the whole input
(same ``row-N`` ids, same reasons and line numbers). :class:`IngestBatches` also keeps what the
manifest needs about the input (``parent``: URI, rows read, sha256 of the bytes) and the
schema of the kept rows over all batches (:attr:`IngestBatches.schema`).

Inputs: a local JSONL file (read line by line), a local Parquet file (``iter_batches``), a
published version ``STORE/NAME/vNNNN`` (one shard at a time), or an ``s3://`` file (read whole
with ``uri_io.read_bytes``: streaming S3 reads are not done yet).

Repeated ids (``duplicate_id``) are found with one 64-bit hash per kept row (8 bytes a row,
a sorted numpy array): the only state here that grows with the input.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from distillery.accounting import REJECT_SCHEMA, StageCount, StageResult
from distillery.stages.ingest import DEFAULT_MAX_ROW_BYTES, EmptyInput, _Bad, _why_empty, check_row, parse_jsonl_line

DEFAULT_BATCH_ROWS = 100_000
_ID_HASH_SEED = 7


def _jsonl_lines(stream: io.BufferedIOBase, max_row_bytes: int | None) -> Iterator[tuple[int, Any, str]]:
    """``(line number, parsed value or _Bad, raw text)``: ``ingest.file_records`` for a stream."""
    for i, line in enumerate(stream):
        line = line.removesuffix(b"\n")
        if line.strip():  # blank lines (and the final newline) are layout, not rows
            yield parse_jsonl_line(i, line, max_row_bytes)


class _HashingReader(io.RawIOBase):
    """A file read through once, hashing every byte on the way (the parent's sha256)."""

    def __init__(self, raw) -> None:
        self.raw, self.sha256 = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n


class IngestBatches:
    """Iterate the input as ``ingest`` StageResults of at most ``batch_rows`` input rows each."""

    def __init__(
        self,
        uri: str,
        *,
        text_column: str,
        id_column: str | None = None,
        fmt: str = "auto",
        batch_rows: int = DEFAULT_BATCH_ROWS,
        max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES,
    ) -> None:
        self.uri, self.text_column, self.id_column, self.fmt, self.batch_rows = uri, text_column, id_column, fmt, batch_rows
        self.max_row_bytes = max_row_bytes
        self.parent: dict = {"uri": uri, "rows": None, "sha256": None}
        self.schema: dict[str, pl.DataType] = {"sample_id": pl.Utf8, text_column: pl.Utf8}
        self._seen_ids = np.zeros(0, dtype=np.uint64)
        self._schema_seen = False

    # -- reading ---------------------------------------------------------------------------
    def _records(self) -> Iterator[tuple[int, Any, str]]:
        from distillery.store import parse_version_uri
        from distillery.uri_io import is_s3, read_bytes

        version_ref = parse_version_uri(self.uri)
        if version_ref is not None:
            yield from self._version_records(*version_ref)
            return
        fmt = self.fmt
        if fmt == "auto":
            fmt = "parquet" if self.uri.endswith((".parquet", ".pq")) else "jsonl"
        n = 0
        if is_s3(self.uri):
            data = read_bytes(self.uri)
            size, self.parent["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            source = io.BytesIO(data)
            for n, record in enumerate(self._parquet_records(source) if fmt == "parquet" else _jsonl_lines(source, self.max_row_bytes), start=1):
                yield record
        else:
            with open(self.uri, "rb") as raw:
                size = os.fstat(raw.fileno()).st_size
                if fmt == "parquet":
                    for n, record in enumerate(self._parquet_records(raw), start=1):
                        yield record
                    raw.seek(0)
                    self.parent["sha256"] = _file_sha256(raw)
                else:
                    hashing = _HashingReader(raw)
                    for n, record in enumerate(_jsonl_lines(io.BufferedReader(hashing, buffer_size=1 << 20), self.max_row_bytes), start=1):
                        yield record
                    self.parent["sha256"] = hashing.sha256.hexdigest()
        if n == 0:  # as ingest.file_records: no rows at all is a bad input, not bad rows
            raise EmptyInput(f"{self.uri}: {_why_empty(b'' if size == 0 else b' ', fmt)}")

    def _parquet_records(self, source) -> Iterator[tuple[int, Any, str]]:
        i = 0
        for batch in pq.ParquetFile(source).iter_batches(batch_size=self.batch_rows):
            for row in batch.to_pylist():
                raw = json.dumps(row, default=str)
                size = len(raw.encode())
                if self.max_row_bytes is not None and size > self.max_row_bytes:
                    yield i, _Bad("too_large", f"row {i + 1}: {size:,} bytes as JSON, more than max_row_bytes ({self.max_row_bytes:,})"), raw
                else:
                    yield i, row, raw
                i += 1

    def _version_records(self, store, name: str, version: str) -> Iterator[tuple[int, Any, str]]:
        manifest = store.manifest(name, version)
        self.parent.update(
            uri=store.uri(f"{name}/{version}"), sha256=hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
        )
        i = 0
        for shard in manifest["shards"]:  # as publish.read_shards, one shard at a time
            key = f"{name}/{version}/{shard['path']}"
            data = store.get(key)
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                msg = f"{store.uri(key)}: checksum mismatch (the shard changed after publishing)"
                raise ValueError(msg)
            for row in pl.read_parquet(io.BytesIO(data)).to_dicts():
                yield i, row, json.dumps(row, default=str)
                i += 1

    # -- batches ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StageResult]:
        n_in = 0
        batch: list[tuple[int, Any, str]] = []
        for record in self._records():
            batch.append(record)
            n_in += 1
            if len(batch) == self.batch_rows:
                yield self._batch(batch)
                batch = []
        if batch or n_in == 0:
            yield self._batch(batch)
        self.parent["rows"] = n_in

    def _batch(self, records: list[tuple[int, Any, str]]) -> StageResult:
        checked: list[tuple[str, dict] | _Bad] = []
        for row_number, value, _ in records:
            try:
                checked.append(check_row(value, row_number, self.text_column, self.id_column))
            except _Bad as bad:
                checked.append(bad)
        repeats = self._repeated_ids([c[0] for c in checked if not isinstance(c, _Bad)])
        rows, rejects, k = [], [], 0
        for (_, _, raw), result in zip(records, checked, strict=True):
            if not isinstance(result, _Bad):
                sample_id, row = result
                k += 1
                if not repeats[k - 1]:
                    rows.append(row)
                    continue
                result = _Bad("duplicate_id", f"id {sample_id} repeats")
            rejects.append({"stage": "ingest", "reason": result.reason, "detail": result.detail, "seed_id": None, "sample_id": None, "record": raw})
        kept = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame(schema=self.schema)
        self._merge_schema(kept)
        dropped = dict(Counter(r["reason"] for r in rejects))
        count = StageCount("ingest", len(records), kept.height, 1, dropped).check()
        return StageResult("ingest", kept, pl.DataFrame(rejects, schema=REJECT_SCHEMA), count, meta={"parent": self.parent})

    def _repeated_ids(self, ids: list[str]) -> np.ndarray:
        """For each id, in order: did an earlier row (this batch or before) have it?"""
        if not ids:
            return np.zeros(0, dtype=bool)
        hashes = pl.Series(ids, dtype=pl.Utf8).hash(seed=_ID_HASH_SEED).to_numpy()
        _, first = np.unique(hashes, return_index=True)
        repeated = np.ones(len(ids), dtype=bool)
        repeated[first] = False
        if self._seen_ids.size:
            at = np.searchsorted(self._seen_ids, hashes).clip(max=self._seen_ids.size - 1)
            repeated |= self._seen_ids[at] == hashes
        self._seen_ids = np.union1d(self._seen_ids, hashes[~repeated])
        return repeated

    def _merge_schema(self, kept: pl.DataFrame) -> None:
        """The schema ``ingest_rows`` would infer over every kept row: columns in order of first
        appearance, each the supertype of what the batches inferred."""
        if kept.height == 0:
            return
        if not self._schema_seen:
            self.schema, self._schema_seen = dict(kept.schema), True
            return
        merged = pl.concat([pl.DataFrame(schema=self.schema), pl.DataFrame(schema=kept.schema)], how="diagonal_relaxed")
        self.schema = dict(merged.schema)


def _file_sha256(stream) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns, in its order and types (missing ones null)."""
    if dict(frame.schema) == schema:
        return frame
    return pl.concat([pl.DataFrame(schema=schema), frame], how="diagonal_relaxed").select(list(schema)).cast(schema)

