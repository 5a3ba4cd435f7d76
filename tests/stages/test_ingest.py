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
