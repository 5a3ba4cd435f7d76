"""The parts of sharded curation against the in-memory functions they replace: batched ingest
(``ingest_batches``) against ``ingest_rows``, and spilled n-gram statistics (``collapse_external``)
against ``collapse.ngram_statistics`` / ``collapse_report``."""

import json

import polars as pl
import pytest

from distillery.accounting import StageCount, StageResult
from distillery.stages import collapse_external
from distillery.stages.collapse import collapse_report, ngram_statistics
from distillery.stages.ingest import ingest_rows
from distillery.stages.ingest_batches import IngestBatches
from schemas.recipe import CollapseConfig

LINES = [
    json.dumps({"id": "a", "completion": "The first answer is 4.", "extra": 1}),
    "",
    "{not json",
    json.dumps({"id": "b", "completion": "Second row, with a float.", "extra": 2.5}),
    json.dumps([1, 2]),
    json.dumps({"id": "c", "completion": 7}),
    json.dumps({"id": "a", "completion": "A repeated id."}),
    json.dumps({"id": "d", "completion": "Last row", "meta": {"k": "v"}}),
]


def _combined(batches: IngestBatches) -> StageResult:
    results = list(batches)
    kept = pl.concat([r.kept for r in results if r.kept.height], how="diagonal_relaxed")
    return StageResult("ingest", kept, pl.concat([r.rejects for r in results]), StageCount.combine([r.count for r in results]))


@pytest.mark.parametrize("batch_rows", [1, 2, 3, 100])
def test_ingest_batches_add_up_to_ingest_rows(tmp_path, batch_rows):
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(LINES) + "\n").encode() + b'{"id": "bad", "completion": "\xff\xfe"}\n')
    reference = ingest_rows(str(path), text_column="completion", id_column="id")
    batches = IngestBatches(str(path), text_column="completion", id_column="id", batch_rows=batch_rows)
    got = _combined(batches)
    assert got.count == reference.count
    assert reference.count.dropped == {"invalid_json": 1, "not_an_object": 1, "wrong_type": 1, "duplicate_id": 1, "invalid_utf8": 1}
    assert got.rejects.equals(reference.rejects)
    assert got.kept.select(reference.kept.columns).cast(reference.kept.schema).equals(reference.kept)
    assert batches.schema == dict(reference.kept.schema)
    assert batches.parent == reference.meta["parent"]


def test_ingest_batches_read_parquet_in_batches(tmp_path):
    path = tmp_path / "in.parquet"
    pl.DataFrame({"completion": [f"row {i} text" for i in range(25)], "n": list(range(25))}).write_parquet(path)
    reference = ingest_rows(str(path), text_column="completion")
    batches = IngestBatches(str(path), text_column="completion", batch_rows=10)
    results = list(batches)
    assert [r.count.rows_in for r in results] == [10, 10, 5]
    assert pl.concat([r.kept for r in results]).equals(reference.kept)
    assert batches.parent == reference.meta["parent"] and reference.meta["parent"]["rows"] == 25


def test_sharded_ngram_statistics_equal_the_counter(tmp_path, monkeypatch):
    monkeypatch.setattr(collapse_external, "BATCH_TEXTS", 7)
    monkeypatch.setattr(collapse_external, "BUCKET_BYTES", 256)  # forces over-budget buckets to split
    texts = [f"Tom has {i % 13} apples and {i % 7} pears, so the answer is {i % 13 + i % 7}." for i in range(60)]
    texts += ["", None, "Café ﬁne-tuning déjà vu!", "one", "a b", "the answer is the answer is the answer"]
    for sizes, top_k in [((1, 2, 3), 100), ((2,), 3), ((1, 4), 1)]:
        expected = ngram_statistics(texts, ngram_sizes=sizes, top_k=top_k)
        got = collapse_external.ngram_statistics_sharded(lambda: iter(texts), tmp_path / f"s{top_k}", ngram_sizes=sizes, top_k=top_k)
        assert got == expected
    cfg = CollapseConfig(top_k=5, max_top_k_share=0.01)
    report = collapse_external.collapse_report_sharded(lambda: iter(texts[:30]), lambda: iter(texts), cfg, tmp_path / "r")
    assert report == collapse_report(texts[:30], texts, cfg) and not report["gate"]["passed"]


def test_ingest_batches_quarantine_too_large_rows_and_refuse_empty_input(tmp_path):
    from distillery.stages.ingest import EmptyInput

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "big", "completion": "x" * 5000}) + "\n" + json.dumps({"id": "ok", "completion": "fine"}) + "\n")
    reference = ingest_rows(str(path), text_column="completion", id_column="id", max_row_bytes=1024)
    got = _combined(IngestBatches(str(path), text_column="completion", id_column="id", batch_rows=1, max_row_bytes=1024))
    assert got.count == reference.count and got.count.dropped == {"too_large": 1}
    assert got.rejects.equals(reference.rejects)
    for content in ("", "\n\n"):
        path.write_text(content)
        with pytest.raises(EmptyInput) as raised:
            list(IngestBatches(str(path), text_column="completion"))
        with pytest.raises(EmptyInput) as expected:
            ingest_rows(str(path), text_column="completion")
        assert str(raised.value) == str(expected.value)
