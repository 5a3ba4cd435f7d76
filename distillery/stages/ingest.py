"""Ingest: read seeds (JSONL or Parquet, local or s3://), map fields, check the seed contract.

Bad input never stops the run: a line that is not JSON or not UTF-8, a row over the size
limit (``too_large``: ``seeds.max_row_bytes``, 1 MiB by default, checked before the line is
parsed), a row that is not an object, a missing or mistyped field, an over-long question or a
repeated seed is quarantined as a reject with the reason and the raw row (the whole row, also
when it is too large), and counted in the manifest.

An input with no rows at all (an empty file, only blank lines, a Parquet file without rows) is
not bad rows but a bad input: :class:`EmptyInput` (a ValueError) says so, and nothing is
published. :func:`preflight_input` checks that a file exists and is not empty before a flow
starts, so the CLI fails in a second, not after Prefect and Ray start.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from distillery.accounting import REJECT_SCHEMA, StageCount, StageResult
from distillery.contracts import load_contract
from distillery.stages.builtin_seeds import arithmetic_problems
from distillery.stages.verify import reference_answer
from distillery.uri_io import read_bytes
from schemas.recipe import SeedsConfig

SEED_SCHEMA = {
    "seed_id": pl.Utf8,
    "question": pl.Utf8,
    "reference_answer": pl.Utf8,
    "source": pl.Utf8,
    "source_row": pl.Int64,
}


DEFAULT_MAX_ROW_BYTES = 1 << 20  # 1 MiB: GSM8K rows are under 2 KB, the seed contract's question at most 20,000 characters


class EmptyInput(ValueError):
    """The input has no rows at all; the message names it."""


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _source_uri(cfg: SeedsConfig) -> str:
    if cfg.builtin is not None:
        return f"builtin:{cfg.builtin.kind}?count={cfg.builtin.count}&seed={cfg.builtin.seed}"
    return cfg.path


def raw_records(cfg: SeedsConfig, data: bytes | None = None) -> Iterator[tuple[int, Any, str]]:
    """``(row number, parsed value or _Bad, raw text)`` for every input row, bad ones included."""
    if cfg.builtin is not None:
        for i, row in enumerate(arithmetic_problems(cfg.builtin.count, seed=cfg.builtin.seed, kind=cfg.builtin.kind)):
            yield i, row, json.dumps(row)
        return
    yield from file_records(cfg.path, cfg.format, read_bytes(cfg.path) if data is None else data, cfg.max_row_bytes)


def file_records(path: str, fmt: str, data: bytes, max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, Any, str]]:
    """Rows of a JSONL or Parquet file's bytes; a line that is not UTF-8 or not JSON, or a row over
    ``max_row_bytes``, is a ``_Bad``. Raises :class:`EmptyInput` if the file has no rows."""
    if fmt == "auto":
        fmt = "parquet" if path.endswith((".parquet", ".pq")) else "jsonl"
    n = 0
    if fmt == "parquet":
        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            n += 1
            raw = json.dumps(row, default=str)
            if max_row_bytes is not None and len(raw.encode()) > max_row_bytes:
                yield i, _Bad("too_large", f"row {i + 1}: {len(raw.encode()):,} bytes as JSON, more than max_row_bytes ({max_row_bytes:,})"), raw
                continue
            yield i, row, raw
    else:
        for i, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue  # blank lines (and the final newline) are layout, not rows
            n += 1
            yield parse_jsonl_line(i, line, max_row_bytes)
    if n == 0:
        raise EmptyInput(f"{path}: {_why_empty(data, fmt)}")


def _why_empty(data: bytes, fmt: str) -> str:
    if not data:
        return "the input is empty (0 bytes): no rows to read"
    if fmt == "parquet":
        return "the Parquet file has no rows"
    return "the input has only blank lines: no rows to read"


def parse_jsonl_line(i: int, line: bytes, max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> tuple[int, Any, str]:
    """One JSONL line (number ``i`` from 0, without its newline) -> ``(i, value or _Bad, raw text)``.

    A line over ``max_row_bytes`` is ``too_large`` and is not parsed (a 5 GB line costs no JSON
    objects); its raw text is still kept whole for the rejects."""
    if max_row_bytes is not None and len(line) > max_row_bytes:
        return i, _Bad("too_large", f"line {i + 1}: {len(line):,} bytes, more than max_row_bytes ({max_row_bytes:,})"), line.decode("utf-8", "replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return i, _Bad("invalid_utf8", f"line {i + 1}: not UTF-8 ({err.reason} at byte {err.start})"), line.decode("utf-8", "replace")
    try:
        return i, json.loads(text), text
    except json.JSONDecodeError as err:
        return i, _Bad("invalid_json", f"line {i + 1}: {err.msg} at column {err.colno}"), text


def preflight_input(uri: str) -> None:
    """Fail fast, before any flow starts: the input file must exist and hold something.

    A local file: it exists, is a file, and is not empty (or only blank lines, for small
    files). An ``s3://`` object: it exists (one HEAD request, which also checks the endpoint
    and the credentials) and is not 0 bytes. Raises :class:`~distillery.uri_io.StorageError`
    or :class:`EmptyInput`. A published version (``STORE/NAME/vNNNN``) is checked by reading it."""
    from distillery.store import parse_version_uri
    from distillery.uri_io import StorageError, check_uri, is_s3, s3_client, s3_error, split_s3

    check_uri(uri)
    if parse_version_uri(uri) is not None:
        return
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            size = s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
        except Exception as err:
            raise s3_error(uri, err) from err
        if size == 0:
            raise EmptyInput(f"{uri}: {_why_empty(b'', 'jsonl')}")
        return
    path = Path(uri).expanduser()
    if not path.exists():
        raise StorageError(f"{uri}: no such file")
    if not path.is_file():
        raise StorageError(f"{uri}: is a folder, expected a file")
    size = path.stat().st_size
    if size == 0 or (size < 1 << 16 and path.suffix.lower() not in (".parquet", ".pq") and not path.read_bytes().strip()):
        raise EmptyInput(f"{uri}: {_why_empty(b'' if size == 0 else b' ', 'jsonl')}")


def check_row(value: Any, row_number: int, text_column: str, id_column: str | None) -> tuple[str, dict]:
    """One input row -> ``(sample_id, row)``, or :class:`_Bad` with the reason (``ingest_rows``' checks)."""
    if isinstance(value, _Bad):
        raise value
    if not isinstance(value, dict):
        raise _Bad("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    text = _field(value, text_column)
    if not isinstance(text, str):
        raise _Bad("wrong_type", f"field '{text_column}': expected string, got {type(text).__name__}")
    sample_id = str(_field(value, id_column)) if id_column else str(value.get("sample_id") or f"row-{row_number:09d}")
    return sample_id, {**value, "sample_id": sample_id}


def ingest_rows(uri: str, *, text_column: str, id_column: str | None = None, fmt: str = "auto", max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> StageResult:
    """Ingest an existing data set for curation: any columns, but ``text_column`` must be a string.

    ``uri`` is a JSONL/Parquet file (local or s3://) or a published version ``STORE/NAME/vNNNN``.
    Rows get a ``sample_id`` (the ``id_column``, an existing ``sample_id``, or ``row-N``).
    """
    from distillery.stages.publish import read_shards
    from distillery.store import parse_version_uri

    version_ref = parse_version_uri(uri)
    if version_ref is not None:
        store, name, version = version_ref
        manifest = store.manifest(name, version)
        table = read_shards(store, manifest)
        records = ((i, row, json.dumps(row, default=str)) for i, row in enumerate(table.to_dicts()))
        parent = {"uri": store.uri(f"{name}/{version}"), "rows": table.height, "sha256": hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()}
    else:
        data = read_bytes(uri)
        records = file_records(uri, fmt, data, max_row_bytes)
        parent = {"uri": uri, "rows": None, "sha256": hashlib.sha256(data).hexdigest()}
    rows, rejects, seen = [], [], set()
    n_in = 0
    for row_number, value, raw in records:
        n_in += 1
        try:
            sample_id, row = check_row(value, row_number, text_column, id_column)
            if sample_id in seen:
                raise _Bad("duplicate_id", f"id {sample_id} repeats")
        except _Bad as bad:
            rejects.append({"stage": "ingest", "reason": bad.reason, "detail": bad.detail, "seed_id": None, "sample_id": None, "record": raw})
            continue
        seen.add(sample_id)
        rows.append(row)
    parent["rows"] = n_in
    kept = pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame({"sample_id": [], text_column: []}, schema={"sample_id": pl.Utf8, text_column: pl.Utf8})
    dropped = dict(Counter(r["reason"] for r in rejects))
    return StageResult(
        "ingest", kept, pl.DataFrame(rejects, schema=REJECT_SCHEMA), StageCount("ingest", n_in, kept.height, 1, dropped).check(), meta={"parent": parent}
    )


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise _Bad("missing_field", f"field '{name}' is missing")
    return row[name]


def map_seed(row: Any, cfg: SeedsConfig, source: str, row_number: int) -> dict[str, Any]:
    """One input row -> one normalized seed, or :class:`_Bad` with the reason."""
    if not isinstance(row, dict):
        raise _Bad("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    parts = []
    for name in cfg.fields.question_fields:
        value = _field(row, name)
        if not isinstance(value, str):
            raise _Bad("wrong_type", f"field '{name}': expected string, got {type(value).__name__}")
        parts.append(value.strip())
    question = " ".join(p for p in parts if p)
    reference = None
    if cfg.fields.answer is not None:
        raw_answer = _field(row, cfg.fields.answer)
        if isinstance(raw_answer, bool) or not isinstance(raw_answer, (str, int, float)):
            raise _Bad("wrong_type", f"field '{cfg.fields.answer}': expected string or number, got {type(raw_answer).__name__}")
        if isinstance(raw_answer, float) and raw_answer.is_integer():
            raw_answer = int(raw_answer)  # SVAMP stores 27 as 27.0
        reference = reference_answer(str(raw_answer), answer_format=cfg.answer_format)
        if reference is None:
            raise _Bad("no_reference_answer", f"field '{cfg.fields.answer}': no final answer found ({cfg.answer_format} format)")
    if cfg.fields.id is not None:
        seed_id = str(_field(row, cfg.fields.id))
    else:
        seed_id = hashlib.sha256(question.encode()).hexdigest()[:16]
    return {"seed_id": seed_id, "question": question, "reference_answer": reference, "source": source, "source_row": row_number}


def ingest_seeds(cfg: SeedsConfig, data: bytes | None = None) -> StageResult:
    """Read, map and contract-check the seeds. ``data`` skips the read (tests, pre-fetched bytes).

    ``meta["parent"]`` describes the input for the manifest: its URI, rows read and checksum.
    """
    contract = load_contract("seeds")
    source = _source_uri(cfg)
    if cfg.path is not None and data is None:
        data = read_bytes(cfg.path)
    checksum = hashlib.sha256(data).hexdigest() if data is not None else None
    seeds: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    n_in = 0
    for row_number, value, raw in raw_records(cfg, data):
        if cfg.limit is not None and n_in >= cfg.limit:
            break
        n_in += 1
        try:
            if isinstance(value, _Bad):
                raise value
            seed = map_seed(value, cfg, source, row_number)
            problems = contract.row_violations(seed)
            if problems:
                raise _Bad(problems[0][0], "; ".join(detail for _, detail in problems))
            if seed["seed_id"] in seen:
                raise _Bad("duplicate_seed", f"seed_id {seed['seed_id']} repeats row {seen[seed['seed_id']]}")
        except _Bad as bad:
            rejects.append({"stage": "ingest", "reason": bad.reason, "detail": bad.detail, "seed_id": None, "sample_id": None, "record": raw})
            continue
        seen[seed["seed_id"]] = row_number
        seeds.append(seed)
    kept = pl.DataFrame(seeds, schema=SEED_SCHEMA)
    dropped = dict(Counter(r["reason"] for r in rejects))
    return StageResult(
        "ingest",
        kept,
        pl.DataFrame(rejects, schema=REJECT_SCHEMA),
        StageCount("ingest", n_in, kept.height, 1, dropped).check(),
        meta={"parent": {"uri": source, "rows": n_in, "sha256": checksum}},
    )
