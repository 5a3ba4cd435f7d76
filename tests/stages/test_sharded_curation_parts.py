"""The curation stages over shards: ingest at any batch size adds up to the whole input as one
batch (``ingest_rows``), and the spilled n-gram statistics equal a plain ``Counter`` over the
same words at any batch size and bucket budget."""

import json
from collections import Counter

import polars as pl
import pytest

from distillery.accounting import StageCount, StageResult
from distillery.stages import collapse
from distillery.stages.collapse import collapse_report, ngram_statistics
from distillery.stages.dedup import normalize_text
from distillery.stages.ingest import IngestBatches, ingest_rows
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


def _counter_statistics(texts, sizes, top_k):
    """The oracle: every n-gram counted in a Counter (ties: first seen first, as most_common)."""
    counters = {n: Counter() for n in sizes}
    for text in texts:
        words = normalize_text(text or "").split()
        for n, counter in counters.items():
            counter.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    stats = {"texts": len(texts)}
    for n, counter in counters.items():
        total, top = sum(counter.values()), counter.most_common(max(top_k, collapse.TOP_SHOWN))
        stats[f"n{n}"] = {
            "total": total,
            "unique": len(counter),
            "distinct_n": len(counter) / total if total else 0.0,
            "top_k_share": sum(c for _, c in top[:top_k]) / total if total else 0.0,
            "top": [[g, c] for g, c in top[: collapse.TOP_SHOWN]],
        }
    return stats


@pytest.mark.parametrize(("batch_texts", "bucket_bytes"), [(7, 256), (10_000, 16 << 20)])
def test_ngram_statistics_equal_a_counter_at_any_batch_and_bucket_size(tmp_path, monkeypatch, batch_texts, bucket_bytes):
    monkeypatch.setattr(collapse, "BATCH_TEXTS", batch_texts)
    monkeypatch.setattr(collapse, "BUCKET_BYTES", bucket_bytes)  # 256: over-budget buckets split
    texts = [f"Tom has {i % 13} apples and {i % 7} pears, so the answer is {i % 13 + i % 7}." for i in range(60)]
    texts += ["", None, "Café ﬁne-tuning déjà vu!", "one", "a b", "the answer is the answer is the answer"]
    for sizes, top_k in [((1, 2, 3), 100), ((2,), 3), ((1, 4), 1)]:
        expected = _counter_statistics(texts, sizes, top_k)
        assert ngram_statistics(texts, ngram_sizes=sizes, top_k=top_k) == expected
        assert ngram_statistics(lambda: iter(texts), ngram_sizes=sizes, top_k=top_k, workdir=tmp_path) == expected  # two passes
    assert not list(tmp_path.iterdir())  # the spill is removed
    cfg = CollapseConfig(top_k=5, max_top_k_share=0.01)
    report = collapse_report(lambda: iter(texts[:30]), lambda: iter(texts), cfg)
    assert report == collapse_report(texts[:30], texts, cfg) and not report["gate"]["passed"]
    assert report["output"] == _counter_statistics(texts[:30], collapse.report_sizes(cfg), 5)


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
