"""Tags: `latest` follows the newest version, user tags point at one version until moved; no
data is copied. The same on a local folder and on S3 (moto's server on loopback, via boto3)."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from distillery.store import Store, VersionNotFound, parse_version_uri
from tests.test_store_publish import publish_demo, sample_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    s3 = request.getfixturevalue("s3")
    bucket = f"tags-{uuid.uuid4().hex[:12]}"  # the server lives for the session: a bucket per test
    s3.create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/team")


def _keys(store: Store) -> set[str]:
    if store.root.startswith("s3://"):
        import boto3

        return {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=store.bucket)["Contents"]}
    return {str(p.relative_to(store.root)) for p in Path(store.root).rglob("*") if p.is_file()}


def test_tags_move_without_copying_data(store):
    publish_demo(store, sample_rows(3))
    assert store.tag("demo", "stable", "v0001") == "v0001"
    before = _keys(store)
    publish_demo(store, sample_rows(2))
    # latest moved to the new version by itself; the user tag stayed
    assert store.manifest("demo")["version"] == "v0002"
    assert store.manifest("demo", "stable")["version"] == "v0001"
    assert store.tags("demo") == {"stable": "v0001"}
    # moving a tag rewrites one small object and nothing else
    after_publish = _keys(store)
    assert store.tag("demo", "stable", "latest") == "v0002"
    assert _keys(store) == after_publish and len(after_publish - before) > 0
    assert store.manifest("demo", "stable")["counts"]["published"] == 2
    # a tag can be named through another tag, and removed
    assert store.tag("demo", "candidate", "stable") == "v0002"
    store.untag("demo", "candidate")
    assert store.tags("demo") == {"stable": "v0002"}
    with pytest.raises(VersionNotFound, match="no version or tag 'candidate'"):
        store.manifest("demo", "candidate")


def test_bad_tags_are_refused(store):
    publish_demo(store, sample_rows(1))
    for bad in ("latest", "v0001", "../escape", "Has Space"):
        with pytest.raises(ValueError, match="tag"):
            store.tag("demo", bad, "v0001")
    with pytest.raises(VersionNotFound):
        store.tag("demo", "future", "v0009")  # only complete versions can be tagged
    assert store.claim_version("demo", "crashed") == "v0002"  # claimed, never published
    with pytest.raises(VersionNotFound):
        store.tag("demo", "half", "v0002")


def test_tag_uris_resolve(tmp_path):
    store = Store(str(tmp_path / "store"))
    publish_demo(store, sample_rows(2))
    publish_demo(store, sample_rows(4))
    store.tag("demo", "gold", "v0001")
    root, name, ref = parse_version_uri(f"{store.root}/demo@gold")
    assert (root.root, name, ref) == (store.root, "demo", "gold")
    assert root.manifest(name, ref)["version"] == "v0001"
    assert parse_version_uri(f"{store.root}/demo/v0002")[2] == "v0002"


def test_cli_tag_and_show_by_tag(tmp_path):
    store = Store(str(tmp_path / "store"))
    publish_demo(store, sample_rows(2))
    publish_demo(store, sample_rows(4))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "distillery.cli", "datasets", "--store", store.root, *args], capture_output=True, text=True, cwd=ROOT)

    out = cli("tag", "demo", "prod", "v0001")
    assert out.returncode == 0 and "demo@prod -> v0001" in out.stdout
    listing = cli("tags", "demo")
    assert listing.stdout.splitlines() == ["latest -> v0002", "prod -> v0001"]
    shown = cli("show", "demo", "prod", "--json")
    assert '"version": "v0001"' in shown.stdout
    bad = cli("tag", "demo", "latest")
    assert bad.returncode == 1 and "not 'latest'" in bad.stderr
    missing = cli("show", "demo", "nope")
    assert missing.returncode == 1 and "no version or tag 'nope'" in missing.stderr
