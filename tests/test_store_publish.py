"""Store and publish: versions appear only with their manifest, counts add up, shards read back."""

import hashlib
import json

import polars as pl
import pyarrow.parquet as pq
import pytest

from distillery.accounting import AccountingError, StageCount, empty_rejects
from distillery.contracts import ContractViolation, load_contract
from distillery.stages.publish import check_counts, publish_version
from distillery.store import Store


def sample_rows(n):
    return pl.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "seed_id": [f"q{i}" for i in range(n)],
            "sample_index": [0] * n,
            "question": ["q"] * n,
            "prompt": ["p"] * n,
            "completion": ["c"] * n,
            "reference_answer": ["1"] * n,
            "predicted_answer": ["1"] * n,
            "answer_source": ["answer_is"] * n,
            "correct": [True] * n,
            "finish_reason": ["stop"] * n,
            "num_tokens": [3] * n,
            "sampling_seed": [1] * n,
            "model": ["m"] * n,
            "recipe_hash": ["h"] * n,
            "code_version": ["c"] * n,
            "source": ["x"] * n,
        }
    )


META = {"recipe": {"name": "t"}, "recipe_hash": "h", "code_version": "c", "generator": {"model": "m"}, "parents": [], "flow_run_id": "r"}


def publish_demo(store, rows, stages=None, **kw):
    stages = stages or [StageCount("ingest", rows.height, rows.height)]
    return publish_version(store, "demo", rows, empty_rejects(), input_rows=stages[0].rows_in, stages=stages, run_id="r", metadata=META, shard_rows=kw.get("shard_rows", 2))


def test_publish_writes_readable_shards_with_checksums(tmp_path):
    store = Store(str(tmp_path))
    published = publish_demo(store, sample_rows(5))
    assert published.uri == f"{tmp_path}/demo/v0001"
    manifest = json.loads((tmp_path / "demo/v0001/manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [2, 2, 1]
    for shard in manifest["shards"]:
        data = (tmp_path / "demo/v0001" / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert pl.read_parquet(tmp_path / "demo/v0001/data/*.parquet").height == 5
    assert pq.read_table(tmp_path / "demo/v0001/data").num_rows == 5
    assert (tmp_path / "demo/v0001/card.md").read_text().startswith("# demo v0001")
    assert publish_demo(store, sample_rows(1)).manifest["version"] == "v0002"
    assert store.versions("demo") == ["v0001", "v0002"]


def test_version_without_manifest_is_invisible_and_never_reused(tmp_path):
    store = Store(str(tmp_path))
    assert store.claim_version("demo", "crashed-run") == "v0001"  # a publish that died here
    assert store.versions("demo") == [] and store.datasets() == []
    assert publish_demo(store, sample_rows(1)).manifest["version"] == "v0002"
    assert store.versions("demo") == ["v0002"]


def test_counts_that_do_not_add_up_stop_the_publish(tmp_path):
    store = Store(str(tmp_path))
    stages = [StageCount("ingest", 5, 4, 1, {"invalid_json": 1}), StageCount("verify", 3, 3)]
    with pytest.raises(AccountingError, match="passed on 4 rows but 'verify' took 3"):
        publish_demo(store, sample_rows(3), stages)
    with pytest.raises(AccountingError):
        check_counts(5, [StageCount("synthesize", 5, 9, 2, {"x": 0})], 9)
    assert store.children("") == []  # nothing was claimed or written


def test_contract_violation_stops_the_publish(tmp_path):
    with pytest.raises(ContractViolation, match="property 'completion' is missing"):
        publish_demo(Store(str(tmp_path)), sample_rows(2).drop("completion"))
    with pytest.raises(ContractViolation, match="'sample_id' must be unique"):
        load_contract("samples").check_table(pl.concat([sample_rows(1), sample_rows(1)]))


def test_dataset_names_cannot_escape_the_store(tmp_path):
    with pytest.raises(ValueError, match="data set name"):
        Store(str(tmp_path)).claim_version("../evil", "r")


def test_an_empty_version_meets_the_contract_and_reads_back(tmp_path):
    empty = load_contract("samples").empty_frame()
    published = publish_demo(Store(str(tmp_path)), empty, [StageCount("ingest", 2, 0, 1, {"invalid_json": 2})])
    assert published.manifest["counts"]["published"] == 0
    assert pl.read_parquet(tmp_path / "demo/v0001/data").schema == empty.schema


def test_parse_version_uri(tmp_path):
    from distillery.store import parse_version_uri

    store, name, version = parse_version_uri(f"{tmp_path}/demo/v0003")
    assert (store.root, name, version) == (str(tmp_path), "demo", "v0003")
    assert parse_version_uri(f"{tmp_path}/data.jsonl") is None
    store, name, version = parse_version_uri("s3://bucket/team/demo", default_version="latest")
    assert (store.root, name, version) == ("s3://bucket/team", "demo", "latest")


# -------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), unmounted afterwards; skipped where mounting is not
    allowed (not root, no CAP_SYS_ADMIN). ``test_a_write_past_a_file_size_limit_...`` covers a
    failed write without one."""
    import subprocess

    where = tmp_path / "small-disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _incompressible_rows(n: int, chars: int = 1000) -> pl.DataFrame:
    import os

    return sample_rows(n).with_columns(pl.Series("completion", [os.urandom(chars // 2).hex() for _ in range(n)]))


def _files(root) -> list[str]:
    from pathlib import Path

    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_files(small_disk):
    from distillery.uri_io import StorageError

    store = Store(str(small_disk))
    big = __import__("os").urandom(2 << 20)
    for exclusive in (False, True):
        with pytest.raises(StorageError, match=rf"^store {small_disk}: no space left on device \(writing demo/big\)$"):
            store.put("demo/big", big, exclusive=exclusive)
        assert _files(small_disk) == []  # no hidden temporary file, no half-written one

    with pytest.raises(StorageError, match=rf"^store {small_disk}: no space left on device \(writing demo/v0001/"):
        publish_demo(store, _incompressible_rows(3000), shard_rows=500)
    assert store.versions("demo") == []  # no visible version
    assert _files(small_disk) == ["demo/v0001/_claim"]  # what was written of it is gone; the number stays taken
    published = publish_demo(store, sample_rows(3))  # with the space back, publishing works again
    assert published.manifest["version"] == "v0002" and store.versions("demo") == ["v0002"]


def test_a_write_past_a_file_size_limit_is_the_same_clear_error(tmp_path):
    """Without a small filesystem: a real failed write (RLIMIT_FSIZE: EFBIG) in a child process."""
    import subprocess
    import sys

    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
from pathlib import Path
from distillery.store import Store
from distillery.uri_io import StorageError
store = Store({str(tmp_path)!r})
try:
    store.put("demo/big", b"x" * 200_000)
except StorageError as err:
    print(err)
print(sorted(str(p.relative_to(store.root)) for p in Path(store.root).rglob("*") if p.is_file()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [f"store {tmp_path}: no space left (file too large) (writing demo/big)", "[]"]
