"""The versioned store on S3, through boto3 against real S3-compatible servers on loopback
(moto's): concurrent publishers, a publisher killed before its manifest, checksums on read,
and wrong credentials."""

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from distillery.stages.publish import read_shards
from distillery.store import Store
from distillery.uri_io import StorageError, s3_client
from tests.conftest import free_port
from tests.test_store_publish import publish_demo, sample_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bucket(s3):
    name = f"store-{uuid.uuid4().hex[:12]}"  # the server lives for the session: a bucket per test
    s3.create_bucket(Bucket=name)
    return name


def test_concurrent_publishers_get_different_versions_and_overwrite_nothing(bucket):
    store = Store(f"s3://{bucket}/team")
    start = threading.Barrier(4)
    results, errors = {}, []

    def publisher(n: int) -> None:
        try:
            start.wait()
            results[n] = publish_demo(store, sample_rows(n + 1))  # publisher n publishes n+1 rows
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    versions = sorted(r.manifest["version"] for r in results.values())
    assert versions == ["v0001", "v0002", "v0003", "v0004"]  # four claims, four numbers
    assert store.versions("demo") == versions
    for n, published in results.items():  # each version holds what its own publisher wrote
        manifest = store.manifest("demo", published.manifest["version"])
        assert read_shards(store, manifest).height == n + 1


def test_a_publisher_killed_before_its_manifest_leaves_no_visible_version(bucket, s3_endpoint):
    store = Store(f"s3://{bucket}/team")
    publish_demo(store, sample_rows(2))
    # A real process, killed (os._exit, no clean-up) right when it is about to write its manifest.
    child = textwrap.dedent(
        f"""
        import os
        from distillery.store import Store
        from tests.test_store_publish import publish_demo, sample_rows
        real_put = Store.put
        def put(self, key, data, **kw):
            if key.endswith("manifest.json"):
                os._exit(137)
            return real_put(self, key, data, **kw)
        Store.put = put
        publish_demo(Store("s3://{bucket}/team"), sample_rows(5))
        """
    )
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 137, out.stderr
    keys = {o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert any(k.startswith("team/demo/v0002/data/") for k in keys)  # it got as far as its shards
    assert "team/demo/v0002/manifest.json" not in keys
    assert store.versions("demo") == ["v0001"] and store.manifest("demo")["version"] == "v0001"
    # the next run succeeds, with a new number (the dead one's is never reused)
    assert publish_demo(store, sample_rows(3)).manifest["version"] == "v0003"
    assert store.versions("demo") == ["v0001", "v0003"]


def test_a_shard_changed_on_s3_fails_its_checksum(bucket):
    store = Store(f"s3://{bucket}/team")
    manifest = publish_demo(store, sample_rows(3)).manifest
    assert read_shards(store, manifest).height == 3
    shard = manifest["shards"][0]["path"]
    s3_client().put_object(Bucket=bucket, Key=f"team/demo/v0001/{shard}", Body=b"not the published bytes")
    with pytest.raises(ValueError, match=f"s3://{bucket}/team/demo/v0001/{shard}: checksum mismatch"):
        read_shards(store, manifest)


@pytest.fixture
def authenticating_s3(monkeypatch):
    """A second moto server that checks credentials (as real S3 does), in its own process."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_client.cache_clear()
    yield endpoint
    s3_client.cache_clear()
    server.terminate()
    server.wait(10)


def test_wrong_credentials_are_a_clear_error_that_shows_no_secret(authenticating_s3):
    store = Store("s3://team-bucket/datasets")
    with pytest.raises(StorageError, match="check the credentials") as err:
        store.versions("demo")
    assert "s3://team-bucket/datasets" in str(err.value)
    assert "wrong-secret-do-not-print" not in str(err.value)
    # the CLI says the same, with exit code 1 and no traceback
    out = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "datasets", "--store", "s3://team-bucket/datasets", "show", "demo"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1, out.stderr
    assert "check the credentials" in out.stderr and "Traceback" not in out.stderr
    assert "wrong-secret-do-not-print" not in out.stderr + out.stdout


def test_datasets_list_show_diff_and_tag_on_s3(bucket, s3_endpoint):
    store = Store(f"s3://{bucket}/team")
    publish_demo(store, sample_rows(2))
    publish_demo(store, sample_rows(5))
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "distillery.cli", "datasets", "--store", store.root, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    listing = cli("list").splitlines()
    assert [line.split()[:2] for line in listing[1:]] == [["demo", "v0001"], ["demo", "v0002"]]
    assert f"s3://{bucket}/team/demo/v0002" in listing[2]
    assert "# demo v0002" in cli("show", "demo")
    diff = cli("diff", "demo", "v0001", "v0002")
    assert "rows: 2 -> 5 (+3 added, -0 removed, 2 in both)" in diff
    cli("tag", "demo", "stable", "v0001")
    assert "# demo v0001" in cli("show", "demo", "stable")
