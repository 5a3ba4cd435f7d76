"""Ingest for curation, in bounded batches: the same checks and rejects as
``distillery.stages.ingest.ingest_rows``, but the input is read ``batch_rows`` rows at a time, so
memory holds one batch, never the whole file.

Each batch comes back as a :class:`~distillery.accounting.StageResult` of stage ``ingest``;
summed, their counts, kept rows and rejects are what ``ingest_rows`` returns for the whole input
(same ``row-N`` ids, same reasons and line numbers). :class:`IngestBatches` also keeps what the
manifest needs about the input (``parent``: URI, rows read, sha256 of the bytes) and the
schema of the kept rows over all batches (:attr:`IngestBatches.schema`, from the same
``ingest.ColumnTypes`` rule: a batch's frame has the types known when it was read, and
:func:`conform` casts it to the final schema, which only widens them).

Inputs: a local JSONL file (read line by line; gzip or zstd, told by its first bytes, decompressed
as it is read: ``ingest.jsonl_records``), a local Parquet file (``iter_batches``), a published
version ``STORE/NAME/vNNNN`` (one shard at a time), or an ``s3://`` file (read whole with
``uri_io.read_bytes``: streaming S3 reads are not done yet). Which format a file is, and what
makes it unreadable as a whole (:class:`~distillery.stages.ingest.UnreadableInput`), is decided
as in ``ingest`` (``resolve_format``).

Repeated ids (``duplicate_id``) are found with one 64-bit hash per kept row (8 bytes a row,
a sorted numpy array): the only state here that grows with the input.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from distillery.accounting import REJECT_SCHEMA, StageCount, StageResult
from distillery.stages.ingest import (
    DEFAULT_MAX_ROW_BYTES,
    SNIFF_BYTES,
    ColumnTypes,
    EmptyInput,
    BadRow,
    why_empty,
    arrow_rows,
    check_row,
    jsonl_records,
    parquet_error,
    resolve_format,
)

DEFAULT_BATCH_ROWS = 100_000
_ID_HASH_SEED = 7


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
        self._seen_ids = np.zeros(0, dtype=np.uint64)
        self._types = ColumnTypes()  # "line"; "row" once the input turns out Parquet or a version

    @property
    def schema(self) -> dict[str, pl.DataType]:
        """The schema of the kept rows over all batches so far (``ingest.ColumnTypes``: the one
        ``ingest_rows`` gives the whole input); ``sample_id`` and the text column before any row."""
        return self._types.schema() or {"sample_id": pl.Utf8, self.text_column: pl.Utf8}

    # -- reading ---------------------------------------------------------------------------
    def _records(self) -> Iterator[tuple[int, Any, str]]:
        from distillery.store import parse_version_uri
        from distillery.uri_io import is_s3, read_bytes

        version_ref = parse_version_uri(self.uri)
        if version_ref is not None:
            self._types.unit = "row"
            yield from self._version_records(*version_ref)
            return
        n = 0
        if is_s3(self.uri):
            data = read_bytes(self.uri)
            self.parent["sha256"] = hashlib.sha256(data).hexdigest()
            fmt = resolve_format(self.uri, self.fmt, data[:SNIFF_BYTES])
            source = io.BytesIO(data)
            if fmt == "parquet":
                self._types.unit = "row"
                for n, record in enumerate(self._parquet_records(source), start=1):
                    yield record
            else:
                yield from jsonl_records(io.BufferedReader(source, buffer_size=1 << 20), self.uri, self.max_row_bytes)
        else:
            with open(self.uri, "rb") as raw:
                fmt = resolve_format(self.uri, self.fmt, raw.read(SNIFF_BYTES))
                raw.seek(0)
                if fmt == "parquet":
                    self._types.unit = "row"
                    for n, record in enumerate(self._parquet_records(raw), start=1):
                        yield record
                    raw.seek(0)
                    self.parent["sha256"] = _file_sha256(raw)
                else:  # jsonl_records raises EmptyInput itself
                    hashing = _HashingReader(raw)
                    yield from jsonl_records(io.BufferedReader(hashing, buffer_size=1 << 20), self.uri, self.max_row_bytes)
                    self.parent["sha256"] = hashing.sha256.hexdigest()
        if fmt == "parquet" and n == 0:  # as ingest.file_records: no rows at all is a bad input, not bad rows
            raise EmptyInput(f"{self.uri}: {why_empty(b' ', fmt)}")

    def _parquet_records(self, source) -> Iterator[tuple[int, Any, str]]:
        try:
            batches = pq.ParquetFile(source).iter_batches(batch_size=self.batch_rows)
        except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
            raise parquet_error(self.uri, err) from None
        i = 0
        for batch in batches:
            yield from arrow_rows(batch, i, self.max_row_bytes)
            i += batch.num_rows

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
        checked: list[tuple[str, dict] | BadRow] = []
        for row_number, value, _ in records:
            try:
                checked.append(check_row(value, row_number, self.text_column, self.id_column))
            except BadRow as bad:
                checked.append(bad)
        repeats = self._repeated_ids([c[0] for c in checked if not isinstance(c, BadRow)])
        rows, rejects, k = [], [], 0
        for (row_number, _, raw), result in zip(records, checked, strict=True):
            if not isinstance(result, BadRow):
                sample_id, row = result
                k += 1
                if repeats[k - 1]:
                    result = BadRow("duplicate_id", f"id {sample_id} repeats")
                else:
                    try:  # in input order, after the id check, as ingest_rows does
                        rows.append(self._types.admit(row, row_number))
                        continue
                    except BadRow as bad:
                        result = bad
            rejects.append({"stage": "ingest", "reason": result.reason, "detail": result.detail, "seed_id": None, "sample_id": None, "record": raw})
        kept = self._types.frame(rows) if rows else pl.DataFrame(schema=self.schema)
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


def _file_sha256(stream) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns, in its order and types (missing ones null)."""
    if dict(frame.schema) == schema:
        return frame
    have = frame.schema  # the batch's types are ones the final schema widens (ingest.ColumnTypes): a cast each
    return frame.select(pl.col(c).cast(t) if c in have else pl.lit(None, dtype=t).alias(c) for c, t in schema.items())

