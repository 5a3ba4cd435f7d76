"""Ingest: read seeds (JSONL or Parquet, local or s3://), map fields, check the seed contract.

Bad input never stops the run: a line that is not JSON or not UTF-8, a row over the size
limit (``too_large``: ``seeds.max_row_bytes``, 1 MiB by default, checked before the line is
parsed), a row that is not an object, a missing or mistyped field, an over-long question or a
repeated seed is quarantined as a reject with the reason and the raw row (the whole row, also
when it is too large), and counted in the manifest.

A row that parses but could not be carried through the pipeline is quarantined the same way:
JSON nested more than ``MAX_NESTING`` (64) levels deep is ``invalid_json`` (Python's parser gives
up at about 1,000 levels, and polars crashes on a few hundred), and a string (or key) holding an
escaped lone surrogate (``"\\ud800"``: valid JSON, but no UTF-8 can encode it) is ``invalid_utf8``.
:func:`parse_jsonl_line` and the Parquet row reader make these checks, so ``distillery run``'s
seed ingest and curation's (``IngestBatches``) agree.

Curation keeps every field of a row, so each field must fit one column type (:class:`ColumnTypes`):
a column's type is what the earlier kept rows made it (null fits any; integers and floats make
floats; objects take the union of their fields; lists merge their elements). A row with a field
that does not fit (``line 7: field 'm' is an object, but the column is a list of integers (from
line 1)``), a list mixing types (``[1, "x"]``), an integer outside int64 or a decimal of more than
38 digits is ``type_mismatch``. An empty object ``{}`` (Parquet cannot store one) is carried as
null, a Parquet map as a list of ``{key, value}`` objects, and nanosecond times as microseconds.
The rule reads rows in input order, so both ingest paths decide the same at any shard size.

What the file is, is read from its first bytes, not its name (:func:`sniff`): gzip (``1f 8b``) and
zstd (``28 b5 2f fd``) are decompressed as a stream, Parquet (``PAR1``) is read as Parquet under
``format: auto``, and a UTF-8 byte-order mark is skipped. An input that is unreadable as a whole
is :class:`UnreadableInput` (a ValueError; the CLI exits 1 naming the file, nothing is
published): a container distillery does not read (ZIP, tar, bzip2, xz, 7z, LZ4, an image, a
PDF, UTF-16/32 text, ...), a truncated or corrupt gzip/zstd stream, a file that is not Parquet
where Parquet is expected, or a JSONL file in which no line decodes as JSON (every row would be
``invalid_utf8``/``invalid_json``: a binary file, or text that is not JSONL).

An input with no rows at all (an empty file, only blank lines, a Parquet file without rows) is
not bad rows but a bad input: :class:`EmptyInput` (a ValueError) says so, and nothing is
published. :func:`preflight_input` checks that a file exists, is not empty and is not of a kind
refused above before a flow starts, so the CLI fails in a second, not after Prefect and Ray start.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
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


MAX_NESTING = 64  # levels of objects/arrays in one row; deeper is `invalid_json`


class EmptyInput(ValueError):
    """The input has no rows at all; the message names it."""


class UnreadableInput(ValueError):
    """The input cannot be read as a whole (see the module's docstring); the message names it."""


class BadRow(Exception):
    """A row's quarantine reason. ``unreadable``: the row did not even decode (bytes or JSON syntax)."""

    def __init__(self, reason: str, detail: str, *, unreadable: bool = False) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.unreadable = reason, detail, unreadable


# -- what the bytes are ------------------------------------------------------------------------
GZIP_MAGIC, ZSTD_MAGIC, PARQUET_MAGIC, UTF8_BOM = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"PAR1", b"\xef\xbb\xbf"
SNIFF_BYTES = 512  # enough for a tar header's "ustar" at offset 257
_REFUSED = (  # first bytes -> what the file is; none of these is read as rows
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "a ZIP archive"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"\x04\x22\x4d\x18", "LZ4-compressed"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"ARROW1", "an Arrow IPC file"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x00\x00\xfe\xff", "UTF-32 text (byte-order mark 00 00 FE FF); save it as UTF-8"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (byte-order mark FF FE 00 00); save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 text (byte-order mark FF FE); save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text (byte-order mark FE FF); save it as UTF-8"),
)
_BZIP2 = re.compile(rb"^BZh[1-9]1AY&SY")
SUPPORTED = "distillery reads JSONL (UTF-8; plain, gzip- or zstd-compressed) and Parquet"


def sniff(head: bytes) -> str | None:
    """What a file's first bytes say it is: ``"gzip"``, ``"zstd"``, ``"parquet"``, or None (text,
    as far as they tell). A kind that is never read as rows is :class:`UnreadableInput`'s message
    (without the file's name) in a ValueError."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    for magic, what in _REFUSED:
        if head.startswith(magic):
            raise ValueError(what)
    if _BZIP2.match(head):
        raise ValueError("bzip2-compressed")
    if head[257:262] == b"ustar":
        raise ValueError("a tar archive")
    return None


def _sniff(uri: str, head: bytes, inside: str = "") -> str | None:
    try:
        return sniff(head)
    except ValueError as err:
        what, _, hint = str(err).partition("; ")
        what = f"{inside} data that is {what}" if inside else what
        raise UnreadableInput(f"{uri}: {what}, not JSONL or Parquet ({SUPPORTED}){'; ' + hint if hint else ''}") from None


def resolve_format(uri: str, fmt: str, head: bytes) -> str:
    """``"jsonl"`` or ``"parquet"`` for a file whose first bytes are ``head``: under ``auto`` the
    content decides (Parquet's ``PAR1``; gzip/zstd are compressed JSONL), then the name."""
    kind = _sniff(uri, head)
    if fmt == "auto":
        if kind == "parquet":
            return "parquet"
        if kind in ("gzip", "zstd") or not uri.endswith((".parquet", ".pq")):
            return "jsonl"
        fmt = "parquet"
    if not head and fmt == "parquet":
        raise EmptyInput(f"{uri}: {why_empty(b'', 'jsonl')}")
    if fmt == "jsonl" and kind == "parquet":
        raise UnreadableInput(f"{uri}: a Parquet file, but the format is jsonl; set the format to parquet (or auto)")
    if fmt == "parquet" and kind != "parquet":
        shown = f"{kind}-compressed data" if kind else "no Parquet magic bytes (PAR1)"
        raise UnreadableInput(f"{uri}: not a Parquet file ({shown}), but the format is parquet ({SUPPORTED})")
    return fmt


def _peek(stream, n: int = SNIFF_BYTES) -> bytes:
    head = stream.peek(n)[:n]
    while len(head) < n:  # peek gives what one read buffered; a short one is not the end
        more = stream.peek(n)
        if len(more) <= len(head):
            break
        head = more[:n]
    return head


class _ZstdReader(io.RawIOBase):
    """A zstd stream (one frame or several) decompressed as it is read; a truncated or corrupt one
    is an error (zstandard's own stream reader ends quietly at a truncation). Input is fed 4 KiB
    at a time, so one read holds at most what 4 KiB expand to."""

    def __init__(self, source) -> None:
        import zstandard

        self.source, self._zstd = source, zstandard
        self.obj = zstandard.ZstdDecompressor().decompressobj()
        self.pending, self.started, self.done = b"", False, False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending and not self.done:
            chunk = self.source.read(4096)
            if not chunk:
                if self.started:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                self.done = True
                break
            self.started = True
            try:
                out = self.obj.decompress(chunk)
                while self.obj.eof:  # a frame ended: the rest may start another one
                    rest = self.obj.unused_data
                    self.obj = self._zstd.ZstdDecompressor().decompressobj()
                    self.started = bool(rest)
                    if not rest:
                        break
                    out += self.obj.decompress(rest)
            except self._zstd.ZstdError as err:
                raise zlib.error(str(err)) from None
            self.pending = out
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n


_DECODE_ERRORS = (EOFError, OSError, zlib.error)  # gzip.BadGzipFile is an OSError


def jsonl_records(raw: BinaryIO, uri: str, max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, Any, str]]:
    """``(line number from 0, parsed value or BadRow, raw text)`` for every non-blank line of a JSONL
    byte stream, decompressed as it is read when its first bytes say gzip or zstd, after a UTF-8
    byte-order mark. Raises :class:`EmptyInput` for no rows, :class:`UnreadableInput` for an input
    unreadable as a whole (the module's docstring says which)."""
    stream = raw if hasattr(raw, "peek") else io.BufferedReader(raw, buffer_size=1 << 20)
    container = _sniff(uri, _peek(stream))
    n = unreadable = 0
    first_problem = ""
    i = -1
    try:
        if container == "gzip":
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        elif container == "zstd":
            stream = io.BufferedReader(_ZstdReader(stream), buffer_size=1 << 20)
        if container:
            inner = _sniff(uri, _peek(stream), inside=f"{container}-compressed")
            if inner:
                raise UnreadableInput(f"{uri}: {container}-compressed {inner} data, not JSONL ({SUPPORTED}; Parquet compresses its own columns)")
        any_bytes = bool(_peek(stream, 3))
        if _peek(stream, 3) == UTF8_BOM:
            stream.read(3)
        for i, line in enumerate(stream):
            line = line.removesuffix(b"\n")
            if not line.strip():
                continue  # blank lines (and the final newline) are layout, not rows
            n += 1
            record = parse_jsonl_line(i, line, max_row_bytes)
            if isinstance(record[1], BadRow) and record[1].unreadable:
                unreadable += 1
                first_problem = first_problem or record[1].detail
            yield record
    except _DECODE_ERRORS as err:
        where = f" after line {i + 1}" if i >= 0 else ""
        raise UnreadableInput(f"{uri}: the {container or 'file'} data is corrupt or truncated{where} ({err}); nothing is published from it") from None
    if n == 0:
        if container:
            raise EmptyInput(f"{uri}: the {container}-compressed input holds {'only blank lines' if any_bytes else 'nothing'}: no rows to read")
        raise EmptyInput(f"{uri}: {why_empty(b' ' if any_bytes else b'', 'jsonl')}")
    if unreadable == n:
        raise UnreadableInput(
            f"{uri}: no line of the file decodes as JSON ({n:,} line(s), every one invalid_utf8 or invalid_json; {first_problem}): "
            f"not JSONL ({SUPPORTED})"
        )


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # in raw JSON text: where a lone surrogate can come from
_SURROGATE = re.compile("[\ud800-\udfff]")


def value_problem(value: Any, raw: str, where: str) -> BadRow | None:
    """Why a parsed row cannot go on (nested more than ``MAX_NESTING`` deep: ``invalid_json``; a
    lone surrogate in a string or key: ``invalid_utf8``), or None. ``raw`` is its JSON text: a row
    with few brackets and no ``\\uD8..``-``\\uDF..`` escape is not walked at all."""
    deep = raw.count("{") + raw.count("[") > MAX_NESTING
    if not deep and not _SURROGATE_ESCAPE.search(raw):
        return None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return BadRow("invalid_utf8", f"{where}: a string holds a lone surrogate (\\u{ord(found.group()):04x}), which is not UTF-8")
        elif isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return BadRow("invalid_json", f"{where}: nested more than {MAX_NESTING} levels deep (at most {MAX_NESTING})")
            if isinstance(item, dict):
                stack.extend((k, depth) for k in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


def parquet_row(i: int, row: dict, max_row_bytes: int | None) -> tuple[int, Any, str]:
    """One Parquet row (number ``i`` from 0) -> ``(i, row or BadRow, its JSON text)``."""
    try:
        raw = json.dumps(row, default=str)
    except RecursionError:
        return i, BadRow("invalid_json", f"row {i + 1}: nested too deeply to write as JSON (at most {MAX_NESTING} levels)"), repr(row)[:1 << 20]
    size = len(raw.encode())
    if max_row_bytes is not None and size > max_row_bytes:
        return i, BadRow("too_large", f"row {i + 1}: {size:,} bytes as JSON, more than max_row_bytes ({max_row_bytes:,})"), raw
    bad = value_problem(row, raw, f"row {i + 1}")
    return i, (bad if bad is not None else row), raw


def _python_type(t):
    """``t`` with nanosecond times as microseconds (Python's datetime has no nanoseconds, and
    pyarrow refuses to convert them), inside lists, structs and maps too; None if unchanged."""
    import pyarrow as pa

    if (pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time64(t)) and t.unit == "ns":
        return pa.timestamp("us", t.tz) if pa.types.is_timestamp(t) else pa.duration("us") if pa.types.is_duration(t) else pa.time64("us")
    if pa.types.is_map(t):
        key, item = _python_type(t.key_type), _python_type(t.item_type)
        return pa.map_(key or t.key_type, item or t.item_type) if key or item else None
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _python_type(t.value_type)
        if inner is None:
            return None
        field = t.value_field.with_type(inner)
        return pa.list_(field, t.list_size) if pa.types.is_fixed_size_list(t) else pa.large_list(field) if pa.types.is_large_list(t) else pa.list_(field)
    if pa.types.is_struct(t):
        fields = [t.field(i) for i in range(t.num_fields)]
        new = [_python_type(f.type) for f in fields]
        return pa.struct([f.with_type(n) if n else f for f, n in zip(fields, new, strict=True)]) if any(new) else None
    return None


def arrow_rows(batch, first: int, max_row_bytes: int | None) -> Iterator[tuple[int, Any, str]]:
    """The rows of a pyarrow Table or RecordBatch (numbered from ``first``) as :func:`parquet_row`
    records. Nanosecond times are read as microseconds; a row pyarrow still cannot turn into Python
    values is ``type_mismatch`` with pyarrow's reason (its record: the row as pyarrow prints it)."""
    import pyarrow as pa

    new = [_python_type(f.type) for f in batch.schema]
    if any(new):
        schema = pa.schema([f.with_type(n) if n else f for f, n in zip(batch.schema, new, strict=True)])
        batch = batch.cast(schema, safe=False)  # safe=False: sub-microsecond digits are dropped
    try:
        rows = batch.to_pylist()
    except (ValueError, TypeError, OverflowError, NotImplementedError):  # pyarrow.ArrowInvalid is a ValueError
        rows = None
    for k in range(batch.num_rows):
        if rows is not None:
            yield parquet_row(first + k, rows[k], max_row_bytes)
            continue
        one = batch.slice(k, 1)
        try:
            yield parquet_row(first + k, one.to_pylist()[0], max_row_bytes)
        except (ValueError, TypeError, OverflowError, NotImplementedError) as err:
            yield first + k, BadRow("type_mismatch", f"row {first + k + 1}: a value pyarrow cannot convert ({err})"), str(one)[: 1 << 20]


def parquet_error(uri: str, err: Exception) -> UnreadableInput:
    return UnreadableInput(f"{uri}: not a readable Parquet file ({err}); {SUPPORTED}")


def _source_uri(cfg: SeedsConfig) -> str:
    if cfg.builtin is not None:
        return f"builtin:{cfg.builtin.kind}?count={cfg.builtin.count}&seed={cfg.builtin.seed}"
    return cfg.path


def raw_records(cfg: SeedsConfig, data: bytes | None = None) -> Iterator[tuple[int, Any, str]]:
    """``(row number, parsed value or BadRow, raw text)`` for every input row, bad ones included."""
    if cfg.builtin is not None:
        for i, row in enumerate(arithmetic_problems(cfg.builtin.count, seed=cfg.builtin.seed, kind=cfg.builtin.kind)):
            yield i, row, json.dumps(row)
        return
    yield from file_records(cfg.path, cfg.format, read_bytes(cfg.path) if data is None else data, cfg.max_row_bytes)


def file_records(path: str, fmt: str, data: bytes, max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> Iterator[tuple[int, Any, str]]:
    """Rows of a JSONL (maybe compressed) or Parquet file's bytes; a line that is not UTF-8 or not
    JSON, or a row over ``max_row_bytes``, is a ``BadRow``. Raises :class:`EmptyInput` if the file
    has no rows, :class:`UnreadableInput` if it cannot be read as a whole."""
    fmt = resolve_format(path, fmt, data[:SNIFF_BYTES])
    if fmt == "parquet":
        try:
            table = pq.read_table(io.BytesIO(data))
        except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
            raise parquet_error(path, err) from None
        yield from arrow_rows(table, 0, max_row_bytes)
        if table.num_rows == 0:
            raise EmptyInput(f"{path}: {why_empty(data, fmt)}")
        return
    yield from jsonl_records(io.BufferedReader(io.BytesIO(data), buffer_size=1 << 20), path, max_row_bytes)


def why_empty(data: bytes, fmt: str) -> str:
    if not data:
        return "the input is empty (0 bytes): no rows to read"
    if fmt == "parquet":
        return "the Parquet file has no rows"
    return "the input has only blank lines: no rows to read"


def parse_jsonl_line(i: int, line: bytes, max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> tuple[int, Any, str]:
    """One JSONL line (number ``i`` from 0, without its newline) -> ``(i, value or BadRow, raw text)``.

    A line over ``max_row_bytes`` is ``too_large`` and is not parsed (a 5 GB line costs no JSON
    objects); its raw text is still kept whole for the rejects."""
    if max_row_bytes is not None and len(line) > max_row_bytes:
        return i, BadRow("too_large", f"line {i + 1}: {len(line):,} bytes, more than max_row_bytes ({max_row_bytes:,})"), line.decode("utf-8", "replace")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return i, BadRow("invalid_utf8", f"line {i + 1}: not UTF-8 ({err.reason} at byte {err.start})", unreadable=True), line.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return i, BadRow("invalid_json", f"line {i + 1}: {err.msg} at column {err.colno}", unreadable=True), text
    except RecursionError:
        return i, BadRow("invalid_json", f"line {i + 1}: nested too deeply to parse (at most {MAX_NESTING} levels)", unreadable=True), text
    except ValueError as err:  # an integer of more than 4,300 digits (Python's int parsing limit)
        return i, BadRow("invalid_json", f"line {i + 1}: {err}".split("; use sys.")[0], unreadable=True), text
    bad = value_problem(value, text, f"line {i + 1}")
    return i, (bad if bad is not None else value), text


def preflight_input(uri: str) -> None:
    """Fail fast, before any flow starts: the input file must exist and hold something.

    A local file: it exists, is a file, and is not empty (or only blank lines, for small
    files). An ``s3://`` object: it exists (one HEAD request, which also checks the endpoint
    and the credentials) and is not 0 bytes. Raises :class:`~distillery.uri_io.StorageError`,
    :class:`EmptyInput` or :class:`UnreadableInput`. A published version (``STORE/NAME/vNNNN``) is checked by reading it."""
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
            raise EmptyInput(f"{uri}: {why_empty(b'', 'jsonl')}")
        return
    path = Path(uri).expanduser()
    if not path.exists():
        raise StorageError(f"{uri}: no such file")
    if not path.is_file():
        raise StorageError(f"{uri}: is a folder, expected a file")
    size = path.stat().st_size
    if size == 0 or (size < 1 << 16 and path.suffix.lower() not in (".parquet", ".pq") and not path.read_bytes().strip()):
        raise EmptyInput(f"{uri}: {why_empty(b'' if size == 0 else b' ', 'jsonl')}")
    with path.open("rb") as f:
        _sniff(uri, f.read(SNIFF_BYTES))  # a ZIP, an image, UTF-16 text...: refused in a second



# -- column types: one type per column, whatever the rows bring ------------------------------
# A type is a tuple: ("null",), ("bool",), ("int",), ("float",), ("str",), ("list", inner),
# ("struct", {field: type}) or ("leaf", polars dtype) for what only Parquet brings (dates, bytes...).
_NULL, _BOOL, _INT, _FLOAT, _STR = ("null",), ("bool",), ("int",), ("float",), ("str",)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SCALARS = {bool: _BOOL, float: _FLOAT, str: _STR}
_LEAVES: dict[tuple, Any] = {}  # (Python type, time zone or decimal exponent) -> polars dtype


class _Mismatch(Exception):
    """A value that fits no column type (``where``: ``within`` one value, or against the column)."""

    def __init__(self, path: str, column: tuple | None, found: tuple | None, *, within: bool = False, why: str = "") -> None:
        super().__init__(path)
        self.path, self.column, self.found, self.within, self.why = path, column, found, within, why


def _describe(t: tuple, plural: bool = False) -> str:
    kind = t[0]
    if kind == "list":
        if t[1] == _NULL:
            return "empty lists" if plural else "an empty list"
        return f"{'lists' if plural else 'a list'} of {_describe(t[1], True)}"
    if kind == "leaf":
        return f"{t[1]} values" if plural else f"a {t[1]} value"
    one, many = {"null": ("null", "nulls"), "bool": ("a boolean", "booleans"), "int": ("an integer", "integers"),
                 "float": ("a float", "floats"), "str": ("a string", "strings"), "struct": ("an object", "objects")}[kind]  # fmt: skip
    return many if plural else one


def _check_int(v: int, path: str) -> None:
    if not _INT64_MIN <= v <= _INT64_MAX:
        digits = str(v) if abs(v) < 10**40 else f"{len(str(abs(v))):,} digits"
        raise _Mismatch(path, None, None, why=f"field '{path}' is an integer ({digits}) outside the 64-bit range a column holds (-2**63 to 2**63-1)")


def _leaf_type(v: Any, path: str) -> tuple:
    if hasattr(v, "as_tuple") and len(v.as_tuple().digits) > 38:  # a Decimal: polars holds 38 digits
        raise _Mismatch(path, None, None, why=f"field '{path}' is a decimal of {len(v.as_tuple().digits)} digits, more than a column holds (38)")
    key = (type(v), str(getattr(v, "tzinfo", None)), v.as_tuple().exponent if hasattr(v, "as_tuple") else None)
    dtype = _LEAVES.get(key)
    if dtype is None:
        try:
            dtype = pl.Series([v]).dtype
        except Exception:  # noqa: BLE001 (polars raises several kinds)
            dtype = pl.Object
        if dtype == pl.Object or isinstance(dtype, pl.Object):
            raise _Mismatch(path, None, None, why=f"field '{path}' is a {type(v).__name__} value, which no column type holds")
        _LEAVES[key] = dtype
    return ("leaf", dtype)


def _value_type(v: Any, path: str, fix: list) -> tuple:
    """The column type of one value; a list mixing types or an integer outside int64 is a
    :class:`_Mismatch`. ``fix`` gets an entry if the value must be carried differently
    (``{}`` as null, a Parquet map's ``(key, value)`` pairs as objects: :func:`_carried`)."""
    t = type(v)
    if t is str:
        return _STR
    if v is None:
        return _NULL
    if t is int:
        _check_int(v, path)
        return _INT
    scalar = _SCALARS.get(t)
    if scalar is not None:
        return scalar
    if t is list:
        if not v:
            return ("list", _NULL)
        kinds = set(map(type, v))
        if kinds == {str}:
            return ("list", _STR)
        if kinds <= {int, float}:  # numbers only: checked without a Python loop per element
            ints = [x for x in v if type(x) is int] if float in kinds else v
            if ints:
                _check_int(min(ints), f"{path}[]")
                _check_int(max(ints), f"{path}[]")
            return ("list", _FLOAT if float in kinds else _INT)
        inner, element = _NULL, f"{path}[]"
        for x in v:
            inner = _merge(inner, _value_type(x, element, fix), element, within=True)
        return ("list", inner)
    if t is dict:
        if not v:
            fix.append(path)
            return _NULL
        return ("struct", {k: _value_type(x, f"{path}.{k}", fix) for k, x in v.items()})
    if t is tuple and len(v) == 2:  # a Parquet map's entry, as pyarrow gives it
        fix.append(path)
        return ("struct", {"key": _value_type(v[0], f"{path}.key", fix), "value": _value_type(v[1], f"{path}.value", fix)})
    return _leaf_type(v, path)


def _merge(a: tuple, b: tuple, path: str, *, within: bool = False, since: dict | None = None) -> tuple:
    """The one type holding ``a`` and ``b`` (null fits any, integers widen to floats, objects
    take the union of their fields, lists merge their elements), or :class:`_Mismatch`.
    ``since`` gets each path that stops being null here."""
    if a == b or b == _NULL:
        return a
    if a == _NULL:
        if since is not None:
            since.setdefault(path, True)
        return b
    ka, kb = a[0], b[0]
    if ka == kb == "list":
        inner = _merge(a[1], b[1], f"{path}[]", within=within, since=since)
        return a if inner is a[1] else ("list", inner)
    if ka == kb == "struct":
        fields, changed = a[1], False
        for name, t in b[1].items():
            old = fields.get(name)
            new = t if old is None else _merge(old, t, f"{path}.{name}", within=within, since=since)
            if old is None and since is not None and new != _NULL:
                since.setdefault(f"{path}.{name}", True)
            if new is not old:
                if not changed:
                    fields, changed = dict(fields), True
                fields[name] = new
        return ("struct", fields) if changed else a
    if {ka, kb} == {"int", "float"}:
        return _FLOAT
    raise _Mismatch(path, a, b, within=within)


def _to_polars(t: tuple) -> pl.DataType:
    kind = t[0]
    if kind == "list":
        return pl.List(_to_polars(t[1]))
    if kind == "struct":
        return pl.Struct({name: _to_polars(f) for name, f in t[1].items()})
    if kind == "leaf":
        return t[1]
    return {"null": pl.Null, "bool": pl.Boolean, "int": pl.Int64, "float": pl.Float64, "str": pl.Utf8}[kind]()


def _carried(v: Any) -> Any:
    """``v`` as its column holds it: ``{}`` as null, a ``(key, value)`` pair as ``{"key", "value"}``."""
    if isinstance(v, dict):
        return {k: _carried(x) for k, x in v.items()} if v else None
    if isinstance(v, list):
        return [_carried(x) for x in v]
    if isinstance(v, tuple) and len(v) == 2:
        return {"key": _carried(v[0]), "value": _carried(v[1])}
    return v


class ColumnTypes:
    """The type of each column of the kept rows, decided row by row in input order.

    The rule (the same at any batch size of ``IngestBatches``):
    a column's type is what the earlier kept rows made it. Null (or a missing field) fits every
    column; integers and floats make floats; objects make an object whose fields are the union
    of theirs; lists merge their elements the same way. A row with a field that does not fit
    (a string where the column is an integer, an object where it is a list...), a list mixing
    types (``[1, "x"]``, ``[[1], 2]``), an integer outside int64, or a value no column can hold
    is quarantined as ``type_mismatch`` naming the field and both types; it changes no column.
    An empty object ``{}`` (which Parquet cannot store) is carried as null, and a Parquet map's
    entries as ``{key, value}`` objects (as polars reads a map). The state is one type per column
    path, whatever the number of rows.
    """

    def __init__(self, unit: str = "line") -> None:
        self.unit = unit  # "line" (JSONL) or "row" (Parquet, a published version), for the details
        self.types: dict[str, tuple] = {}
        self.since: dict[str, int] = {}  # path -> the row (from 0) that first gave it a type

    def admit(self, row: dict, row_number: int) -> dict:
        """``row`` as the columns carry it, the column types widened to hold it; or :class:`BadRow`."""
        fix: list = []
        changed: dict[str, tuple] = {}
        since: dict[str, bool] = {}
        name = ""
        try:
            for name, value in row.items():
                found = _value_type(value, name, fix)
                old = self.types.get(name)
                if old is None:
                    changed[name] = found
                    if found != _NULL:
                        since[name] = True
                    continue
                new = _merge(old, found, name, since=since)
                if new is not old:
                    changed[name] = new
        except _Mismatch as err:
            raise BadRow("type_mismatch", f"{self.unit} {row_number + 1}: {self._detail(err, err.path == name)}") from None
        self.types.update(changed)
        for path in since:
            self.since.setdefault(path, row_number)
        return {k: _carried(v) for k, v in row.items()} if fix else row

    def _detail(self, err: _Mismatch, top: bool) -> str:
        if err.why:
            return err.why
        a, b = _describe(err.column), _describe(err.found)
        if err.within:
            if err.path.endswith("[]"):
                return f"field '{err.path[:-2]}' is a list mixing {_describe(err.column, True)} and {_describe(err.found, True)}; a column holds one type"
            return f"field '{err.path}' is {a} in one list element and {b} in another; a column holds one type"
        path = err.path
        while path and path not in self.since:  # a nested path: the row that typed its nearest ancestor
            path = path[:-2] if path.endswith("[]") else path.rpartition(".")[0]
        origin = f" (from {self.unit} {self.since[path] + 1})" if path in self.since else ""
        where = f"the column is {a}" if top else f"the column holds {a} there"
        return f"field '{err.path}' is {b}, but {where}{origin}"

    def schema(self) -> dict[str, pl.DataType]:
        """The polars schema of the kept rows so far: columns in order of first appearance."""
        return {name: _to_polars(t) for name, t in self.types.items()}

    def frame(self, rows: list[dict]) -> pl.DataFrame:
        """Admitted rows as a frame of :meth:`schema`."""
        return pl.DataFrame(rows, schema=self.schema())


def check_row(value: Any, row_number: int, text_column: str, id_column: str | None) -> tuple[str, dict]:
    """One input row -> ``(sample_id, row)``, or :class:`BadRow` with the reason (``ingest_rows``' checks)."""
    if isinstance(value, BadRow):
        raise value
    if not isinstance(value, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    text = _field(value, text_column)
    if not isinstance(text, str):
        raise BadRow("wrong_type", f"field '{text_column}': expected string, got {type(text).__name__}")
    sample_id = str(_field(value, id_column)) if id_column else str(value.get("sample_id") or f"row-{row_number:09d}")
    return sample_id, {**value, "sample_id": sample_id}


def ingest_rows(uri: str, *, text_column: str, id_column: str | None = None, fmt: str = "auto", max_row_bytes: int | None = DEFAULT_MAX_ROW_BYTES) -> StageResult:
    """Ingest a whole data set for curation, as one batch of :class:`IngestBatches` (which see)."""
    batches = IngestBatches(uri, text_column=text_column, id_column=id_column, fmt=fmt, batch_rows=None, max_row_bytes=max_row_bytes)
    (result,) = list(batches)
    result.meta["parent"] = batches.parent
    return result


def _field(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise BadRow("missing_field", f"field '{name}' is missing")
    return row[name]


def map_seed(row: Any, cfg: SeedsConfig, source: str, row_number: int) -> dict[str, Any]:
    """One input row -> one normalized seed, or :class:`BadRow` with the reason."""
    if not isinstance(row, dict):
        raise BadRow("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    parts = []
    for name in cfg.fields.question_fields:
        value = _field(row, name)
        if not isinstance(value, str):
            raise BadRow("wrong_type", f"field '{name}': expected string, got {type(value).__name__}")
        parts.append(value.strip())
    question = " ".join(p for p in parts if p)
    reference = None
    if cfg.fields.answer is not None:
        raw_answer = _field(row, cfg.fields.answer)
        if isinstance(raw_answer, bool) or not isinstance(raw_answer, (str, int, float)):
            raise BadRow("wrong_type", f"field '{cfg.fields.answer}': expected string or number, got {type(raw_answer).__name__}")
        if isinstance(raw_answer, float) and raw_answer.is_integer():
            raw_answer = int(raw_answer)  # SVAMP stores 27 as 27.0
        reference = reference_answer(str(raw_answer), answer_format=cfg.answer_format)
        if reference is None:
            raise BadRow("no_reference_answer", f"field '{cfg.fields.answer}': no final answer found ({cfg.answer_format} format)")
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
            if isinstance(value, BadRow):
                raise value
            seed = map_seed(value, cfg, source, row_number)
            problems = contract.row_violations(seed)
            if problems:
                raise BadRow(problems[0][0], "; ".join(detail for _, detail in problems))
            if seed["seed_id"] in seen:
                raise BadRow("duplicate_seed", f"seed_id {seed['seed_id']} repeats row {seen[seed['seed_id']]}")
        except BadRow as bad:
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


# -- ingest for curation, in bounded batches --------------------------------------------------

DEFAULT_BATCH_ROWS = 100_000
PARQUET_BATCH = 65_536  # rows decoded from Parquet at a time
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
    """Iterate the input as ``ingest`` StageResults of at most ``batch_rows`` input rows each
    (``None``: the whole input as one batch, what ``ingest_rows`` returns).

    The input is read ``batch_rows`` rows at a time, so memory holds one batch, never the whole
    file. Each batch comes back as a :class:`~distillery.accounting.StageResult` of stage
    ``ingest``; summed, their counts, kept rows and rejects are the same at any batch size (same
    ``row-N`` ids, same reasons and line numbers). :class:`IngestBatches` also keeps what the
    manifest needs about the input (``parent``: URI, rows read, sha256 of the bytes) and the
    schema of the kept rows over all batches (:attr:`IngestBatches.schema`, from the same
    ``ingest.ColumnTypes`` rule: a batch's frame has the types known when it was read, and
    :func:`conform` casts it to the final schema, which only widens them).

    Inputs: a local JSONL file (read line by line; gzip or zstd, told by its first bytes, decompressed
    as it is read: ``ingest.jsonl_records``), a local Parquet file (``iter_batches``), a published
    version ``STORE/NAME/vNNNN`` (one shard at a time), or an ``s3://`` file (read whole with
    ``uri_io.read_bytes``: streaming S3 reads are not done yet). Which format a file is, and what
    makes it unreadable as a whole (:class:`UnreadableInput`), is decided by ``resolve_format``.

    Repeated ids (``duplicate_id``) are found with one 64-bit hash per kept row (8 bytes a row,
    a sorted numpy array): the only state here that grows with the input.
    """

    def __init__(
        self,
        uri: str,
        *,
        text_column: str,
        id_column: str | None = None,
        fmt: str = "auto",
        batch_rows: int | None = DEFAULT_BATCH_ROWS,
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
            batches = pq.ParquetFile(source).iter_batches(batch_size=min(self.batch_rows or PARQUET_BATCH, PARQUET_BATCH))
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

