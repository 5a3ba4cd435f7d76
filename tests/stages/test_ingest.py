"""Seed ingest: field mappings for real layouts, and bad rows quarantined with a reason."""

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillery.stages.ingest import ingest_seeds
from schemas.recipe import SeedsConfig

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_gsm8k_rows_map_to_seeds_with_reference_answers():
    cfg = SeedsConfig(path=str(DATA / "gsm8k" / "train.jsonl"), answer_format="gsm8k", limit=5)
    result = ingest_seeds(cfg)
    assert result.count.rows_in == 5 and result.kept.height == 5
    first = json.loads((DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    assert result.kept["question"][0] == first["question"].strip()
    assert result.kept["reference_answer"][0] == first["answer"].split("####")[-1].strip().replace(",", "")
    assert result.kept["seed_id"].n_unique() == 5
    assert result.meta["parent"]["sha256"] and result.meta["parent"]["rows"] == 5


def test_svamp_layout_needs_only_a_mapping():
    cfg = SeedsConfig(path=str(DATA / "benchmarks" / "svamp" / "test.jsonl"), fields={"question": ["Body", "Question"], "answer": "Answer"}, limit=3)
    result = ingest_seeds(cfg)
    raw = [json.loads(line) for line in (DATA / "benchmarks" / "svamp" / "test.jsonl").read_text().splitlines()[:3]]
    assert result.kept["question"].to_list() == [f"{r['Body'].strip()} {r['Question'].strip()}" for r in raw]
    assert result.kept["reference_answer"].to_list() == [str(int(r["Answer"])) if float(r["Answer"]).is_integer() else str(r["Answer"]) for r in raw]


def test_aime_layout_needs_only_a_mapping():
    cfg = SeedsConfig(path=str(DATA / "benchmarks" / "aime24" / "test.jsonl"), fields={"question": "problem", "answer": "answer"})
    result = ingest_seeds(cfg)
    assert result.kept.height == 30 and result.count.dropped == {}


def test_broken_rows_are_quarantined_with_reasons(tmp_path):
    path = _jsonl(
        tmp_path / "seeds.jsonl",
        [
            json.dumps({"question": "What is 2+2?", "answer": "#### 4"}),
            "{not json",
            json.dumps({"answer": "#### 3"}),
            json.dumps({"question": 17, "answer": "#### 3"}),
            json.dumps({"question": "What is 3+3?", "answer": ["6"]}),
            json.dumps(["a", "list"]),
            json.dumps({"question": "What is 2+2?", "answer": "#### 4"}),
            json.dumps({"question": "No final answer", "answer": "just prose"}),
            json.dumps({"question": "x" * 30000, "answer": "#### 1"}),
            json.dumps({"question": "   ", "answer": "#### 1"}),
        ],
    )
    (tmp_path / "seeds.jsonl").write_bytes((tmp_path / "seeds.jsonl").read_bytes() + b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    result = ingest_seeds(SeedsConfig(path=path, answer_format="gsm8k"))
    assert result.count.rows_in == 11
    assert result.kept.height == 1
    assert result.count.dropped == {
        "invalid_json": 1,
        "missing_field": 2,
        "wrong_type": 2,
        "not_an_object": 1,
        "duplicate_seed": 1,
        "no_reference_answer": 1,
        "too_long": 1,
        "invalid_utf8": 1,
    }
    assert result.rejects.height == 10
    assert set(result.rejects["stage"]) == {"ingest"}
    bad_json = result.rejects.filter(pl.col("reason") == "invalid_json")
    assert bad_json["record"][0] == "{not json" and "line 2" in bad_json["detail"][0]
    wrong = result.rejects.filter(pl.col("reason") == "wrong_type")["detail"].to_list()
    assert any("field 'question': expected string, got int" in d for d in wrong)


def test_parquet_seeds(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"q": ["What is 1+1?", None], "a": ["2", "3"]}), path)
    result = ingest_seeds(SeedsConfig(path=str(path), fields={"question": "q", "answer": "a"}))
    assert result.kept["question"].to_list() == ["What is 1+1?"]
    assert result.count.dropped == {"missing_field": 1}


def test_builtin_problems_are_reproducible_and_correct():
    cfg = SeedsConfig(builtin={"count": 10, "seed": 3}, fields={"id": "id"})
    a, b = ingest_seeds(cfg), ingest_seeds(cfg)
    assert a.kept.equals(b.kept) and a.kept.height == 10
    first = a.kept.row(0, named=True)
    numbers = [int(t) for t in first["question"].replace("?", " ").replace(".", " ").split() if t.isdigit()]
    start, bought, given = numbers
    assert first["reference_answer"] == str(start + bought - given)


def test_missing_seed_file_is_a_clear_error(tmp_path):
    from distillery.uri_io import StorageError

    with pytest.raises(StorageError, match="no such file"):
        ingest_seeds(SeedsConfig(path=str(tmp_path / "nope.jsonl")))


def _peak_python_memory(path, **kwargs) -> tuple[int, int]:
    import tracemalloc

    from distillery.stages.ingest import IngestBatches

    tracemalloc.start()
    try:
        rows = sum(b.count.rows_out for b in IngestBatches(str(path), text_column="completion", id_column="id", batch_rows=5_000, **kwargs))
        return rows, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_compressed_input_streams_in_bounded_memory(tmp_path):
    """curate's streaming ingest decompresses as it reads: a 7.5 MB JSONL inside a small gzip or
    zstd file costs no more Python memory than the plain file (one batch of rows, never the file:
    holding the decompressed file would add at least its 7.5 MB, 2.5 times the 3 MB allowed)."""
    import gzip

    import zstandard

    text = b"".join(json.dumps({"id": f"r{i}", "completion": f"row {i} " + "y" * 80}).encode() + b"\n" for i in range(75_000))
    assert len(text) > 7_500_000
    plain = tmp_path / "big.jsonl"
    plain.write_bytes(text)
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(text, compresslevel=1))
    (tmp_path / "big.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    del text
    rows, baseline = _peak_python_memory(plain)
    assert rows == 75_000
    for name in ("big.jsonl.gz", "big.jsonl.zst"):
        rows, peak = _peak_python_memory(tmp_path / name)
        assert rows == 75_000
        assert peak < baseline + 3_000_000, f"{name}: peak Python memory {peak:,} bytes, the plain file's {baseline:,}"


# ----------------------------------------------------- field types across rows (and shards)
def _ingest_both_ways(path: Path, batch_rows: int, **kwargs):
    """``ingest_rows`` (in memory) and ``IngestBatches`` (``batch_rows`` input rows a shard, each
    shard conformed to the final schema as ``curate`` publishes it), summed up."""
    from distillery.accounting import StageCount
    from distillery.stages.ingest import ingest_rows
    from distillery.stages.ingest import IngestBatches, conform

    whole = ingest_rows(str(path), text_column="completion", **kwargs)
    batches = IngestBatches(str(path), text_column="completion", batch_rows=batch_rows, **kwargs)
    results = list(batches)
    kept = pl.concat([conform(r.kept, batches.schema) for r in results])
    rejects = pl.concat([r.rejects for r in results])
    return whole, kept, rejects, StageCount.combine([r.count for r in results]), batches.schema


def _published_parquet_reads_back(tmp_path: Path, frame: pl.DataFrame) -> None:
    frame.write_parquet(tmp_path / "kept.parquet")  # what publish does
    assert pq.read_table(tmp_path / "kept.parquet").num_rows == frame.height  # plain pyarrow reads it
    assert pl.read_parquet(tmp_path / "kept.parquet").equals(frame)


MIXED_ROWS = [  # (row, reason or None, detail)
    ({"completion": "a", "m": [1, 2]}, None, ""),
    ({"completion": "b", "m": {"x": 1}}, "type_mismatch", "line 2: field 'm' is an object, but the column is a list of integers (from line 1)"),
    ({"completion": "c", "m": [3.5], "n": 1}, None, ""),  # integers and floats: the column becomes floats
    ({"completion": "d", "m": "text"}, "type_mismatch", "line 4: field 'm' is a string, but the column is a list of floats (from line 1)"),
    ({"completion": "e", "n": "one"}, "type_mismatch", "line 5: field 'n' is a string, but the column is an integer (from line 3)"),
    ({"completion": "f", "mixed": [1, "x"]}, "type_mismatch", "line 6: field 'mixed' is a list mixing integers and strings; a column holds one type"),
    ({"completion": "g", "mixed": [[1], 2]}, "type_mismatch", "line 7: field 'mixed' is a list mixing lists of integers and integers; a column holds one type"),
    ({"completion": "h", "empty": {}, "deep": {"e": {}, "l": [{}]}}, None, ""),  # {} is carried as null
    ({"completion": "i", "big": 2**70}, "type_mismatch", "line 9: field 'big' is an integer (1180591620717411303424) outside the 64-bit range a column holds (-2**63 to 2**63-1)"),
    ({"completion": "j", "big": 5, "s": {"a": 1}}, None, ""),
    ({"completion": "k", "s": {"b": "two"}}, None, ""),  # objects with other fields: the column's fields are their union
    ({"completion": "l", "s": {"a": "x"}}, "type_mismatch", "line 12: field 's.a' is a string, but the column holds an integer there (from line 10)"),
    ({"completion": "m", "s": [{"a": 1}]}, "type_mismatch", "line 13: field 's' is a list of objects, but the column is an object (from line 10)"),
    ({"completion": "n", "t": [{"a": 1}, {"a": True}]}, "type_mismatch", "line 14: field 't[].a' is an integer in one list element and a boolean in another; a column holds one type"),
    ({"completion": "o", "m": None, "s": None, "empty": None}, None, ""),  # null fits every column
    ({"completion": "p", "flag": True}, None, ""),
    ({"completion": "q", "flag": 1}, "type_mismatch", "line 17: field 'flag' is an integer, but the column is a boolean (from line 16)"),
]


@pytest.mark.parametrize("batch_rows", [1, 2, 5, 100])
def test_fields_whose_types_disagree_across_rows_are_quarantined_the_same_in_both_ingest_paths(tmp_path, batch_rows):
    """The column-type rule: each column's type is what its earlier kept rows made it (null fits any,
    integers widen to floats, objects gain fields); a row that does not fit, a list mixing types, or an
    integer outside int64 is ``type_mismatch`` naming the field and both types; ``{}`` is carried as null.
    Both ingest paths agree row for row at any shard size, and the kept rows write as Parquet."""
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _, _ in MIXED_ROWS))
    whole, kept, rejects, count, schema = _ingest_both_ways(path, batch_rows)
    expected = [detail for _, reason, detail in MIXED_ROWS if reason]
    assert whole.rejects["detail"].to_list() == rejects["detail"].to_list() == expected
    assert set(whole.rejects["reason"]) == set(rejects["reason"]) == {"type_mismatch"}
    assert whole.count == count and count.rows_in == len(MIXED_ROWS) and count.rows_out + len(expected) == len(MIXED_ROWS)
    assert whole.kept.equals(kept) and dict(whole.kept.schema) == schema
    assert kept["completion"].to_list() == [row["completion"] for row, reason, _ in MIXED_ROWS if not reason]
    assert schema["m"] == pl.List(pl.Float64) and schema["s"] == pl.Struct({"a": pl.Int64, "b": pl.Utf8})
    assert kept.filter(pl.col("completion") == "h").select("empty", "deep").to_dicts() == [{"empty": None, "deep": {"e": None, "l": [None]}}]
    assert rejects["record"].to_list() == [json.dumps(row) for row, reason, _ in MIXED_ROWS if reason]  # the raw row, whole
    _published_parquet_reads_back(tmp_path, kept)


def test_a_type_first_seen_in_a_later_shard_is_judged_against_the_earlier_shards(tmp_path):
    """Shard 1 fixes a column as a list of integers; shard 2 brings objects, strings, floats and a
    new column: what fits is kept (the column widens), what does not is quarantined, as in memory."""
    rows = [{"completion": f"r{i}", "m": [i]} for i in range(4)]  # shard 1 (4 rows a shard)
    rows += [
        {"completion": "s1", "m": {"x": 1}},
        {"completion": "s2", "m": [0.5], "late": {"k": [1]}},
        {"completion": "s3", "m": "oops", "late": {"k": ["a"]}},
        {"completion": "s4", "late": {"k": [2], "j": {}}},
        {"completion": "s5", "m": [2**64]},  # shard 3
    ]
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    whole, kept, rejects, count, schema = _ingest_both_ways(path, 4)
    assert whole.rejects["detail"].to_list() == rejects["detail"].to_list() == [
        "line 5: field 'm' is an object, but the column is a list of integers (from line 1)",
        "line 7: field 'm' is a string, but the column is a list of floats (from line 1)",
        "line 9: field 'm[]' is an integer (18446744073709551616) outside the 64-bit range a column holds (-2**63 to 2**63-1)",
    ]
    assert whole.count == count and count.dropped == {"type_mismatch": 3} and count.rows_out == 6
    assert whole.kept.equals(kept) and schema == {"completion": pl.Utf8, "m": pl.List(pl.Float64), "sample_id": pl.Utf8, "late": pl.Struct({"k": pl.List(pl.Int64), "j": pl.Null})}
    assert kept["m"].to_list() == [[0.0], [1.0], [2.0], [3.0], [0.5], None]
    _published_parquet_reads_back(tmp_path, kept)


def test_parquet_input_with_types_python_rows_cannot_hold_is_ingested_in_both_paths(tmp_path):
    """A Parquet map column (rows of (key, value) pairs) is carried as a list of {key, value}
    objects, as polars reads a map; nanosecond timestamps (pandas' default) as microseconds."""
    import datetime

    table = pa.table(
        {
            "completion": ["a", "b", "c"],
            "tags": pa.array([[("k", 1)], None, [("j", 2), ("i", 3)]], pa.map_(pa.string(), pa.int64())),
            "at": pa.array([1_600_000_000_000_000_123, None, 0], pa.timestamp("ns")),
            "when": pa.array([datetime.datetime(2020, 1, 1)] * 3, pa.timestamp("us", "UTC")),
        }
    )
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    whole, kept, rejects, count, schema = _ingest_both_ways(path, 2)
    assert whole.rejects.height == rejects.height == 0 and whole.count == count and count.rows_out == 3
    assert whole.kept.equals(kept)
    assert kept["tags"].to_list() == [[{"key": "k", "value": 1}], None, [{"key": "j", "value": 2}, {"key": "i", "value": 3}]]
    assert kept["at"].to_list()[0] == datetime.datetime(2020, 9, 13, 12, 26, 40)
    assert schema["when"] == pl.Datetime("us", "UTC")
    _published_parquet_reads_back(tmp_path, kept)


def test_seed_ingest_ignores_the_types_of_fields_it_does_not_map(tmp_path):
    """``distillery run``'s seed ingest keeps only mapped, type-checked fields: other fields of any
    type, in any mix, cannot break it."""
    rows = [
        {"question": "What is 1+1?", "answer": "#### 2", "m": [1, 2]},
        {"question": "What is 2+2?", "answer": "#### 4", "m": {"x": 1}, "e": {}},
        {"question": "What is 3+3?", "answer": "#### 6", "m": [1, "x", [2]], "big": 2**70},
    ]
    result = ingest_seeds(SeedsConfig(path=_jsonl(tmp_path / "seeds.jsonl", [json.dumps(r) for r in rows]), answer_format="gsm8k"))
    assert result.count.rows_out == 3 and result.rejects.height == 0
    result.kept.write_parquet(tmp_path / "seeds.parquet")


def test_builtin_problems_carry_their_computed_answers():
    """Each built-in kind's answer is what its question computes (parsed back from the text)."""
    import re

    from distillery.stages.builtin_seeds import arithmetic_problems

    for row in arithmetic_problems(200, kind="one-step-word"):
        a, b = map(int, re.findall(r"\d+", row["question"]))
        plus = re.search(r" (buys|finds|gets) ", row["question"]) is not None
        assert int(row["answer"]) == (a + b if plus else a - b) and int(row["answer"]) > 0, row
        assert row["id"].startswith("word-0-")
    for row in arithmetic_problems(200, kind="one-step"):
        a, op, b = re.fullmatch(r"What is (\d) ([+-]) (\d)\?", row["question"]).groups()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert list(arithmetic_problems(5, kind="one-step-word", seed=3)) == list(arithmetic_problems(5, kind="one-step-word", seed=3))
