"""Seeds and stores on S3, through boto3 against a real S3-compatible server on loopback."""

import json

import polars as pl
import pytest

from distillery.stages.ingest import ingest_seeds
from distillery.store import Store
from distillery.uri_io import StorageError
from schemas.recipe import SeedsConfig
from tests.test_store_publish import publish_demo, sample_rows


def test_seeds_from_s3_with_a_broken_row(s3):
    s3.create_bucket(Bucket="seeds")
    body = "\n".join([json.dumps({"question": "What is 5+5?", "answer": "#### 10"}), "{broken", json.dumps({"question": "What is 6+6?", "answer": "#### 12"})])
    s3.put_object(Bucket="seeds", Key="math/train.jsonl", Body=body.encode())
    result = ingest_seeds(SeedsConfig(path="s3://seeds/math/train.jsonl", answer_format="gsm8k"))
    assert result.kept["reference_answer"].to_list() == ["10", "12"]
    assert result.count.dropped == {"invalid_json": 1}
    assert result.meta["parent"]["uri"] == "s3://seeds/math/train.jsonl"


def test_missing_s3_object_is_a_clear_error(s3):
    s3.create_bucket(Bucket="empty")
    with pytest.raises(StorageError, match="s3://empty/nope.jsonl: no such object"):
        ingest_seeds(SeedsConfig(path="s3://empty/nope.jsonl"))


def test_publish_to_s3_store(s3):
    s3.create_bucket(Bucket="store")
    store = Store("s3://store/team")
    first = publish_demo(store, sample_rows(3))
    assert first.uri == "s3://store/team/demo/v0001"
    assert store.claim_version("demo", "crashed") == "v0002"  # claimed, never finished
    assert publish_demo(store, sample_rows(2)).manifest["version"] == "v0003"
    assert store.versions("demo") == ["v0001", "v0003"]
    shard = store.manifest("demo", "v0001")["shards"][0]
    obj = s3.get_object(Bucket="store", Key=f"team/demo/v0001/{shard['path']}")["Body"].read()
    assert len(obj) == shard["bytes"]
    assert pl.read_parquet(obj).height == shard["rows"]
