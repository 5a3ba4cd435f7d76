"""The bad-input suite (issue 6): every kind of bad input, each with its exact message or
quarantine reason, and the row accounting that proves nothing was lost.

| bad input | what happens | where it is tested |
| --- | --- | --- |
| a line that is not JSON | reject `invalid_json`, "line N: <json error> at column C" | curate run + seed ingest below |
| non-UTF-8 bytes | reject `invalid_utf8`, "line N: not UTF-8 (invalid start byte at byte B)" | curate run + seed ingest |
| a wrong type | reject `wrong_type`, "field 'F': expected string, got int" | curate run + seed ingest |
| a missing field | reject `missing_field`, "field 'F' is missing" | curate run + seed ingest |
| not an object | reject `not_an_object`, "expected a JSON object, got list" | curate run + seed ingest |
| an enormous row (5 MB) | reject `too_large` before parsing, kept whole | curate run + seed ingest (`seeds.max_row_bytes`) |
| empty input | exit 1, "PATH: the input is empty (0 bytes): no rows to read", nothing published | CLI (`curate`, `run`) + stage functions |
| unknown recipe keys | exit 2, "field 'K': unknown field; did you mean ...?" | CLI (`curate`, `run`) |
| a missing model path | exit 1, "model.path: model folder PATH not found ...", no version | CLI (`run`) |
| unreachable Ray | exit 1 in seconds, "RAY_ADDRESS=...: no Ray cluster reachable at ..." | CLI (`curate`), `check_ray_address` against a real Ray GCS |
| unreachable S3 | exit 1 in seconds, "...: the S3 endpoint URL cannot be reached ..." | CLI (`curate`), a silent endpoint bounded by the read timeout |
| wrong S3 credentials | exit 1, "... (check the credentials)", no secret shown | `tests/test_s3_store.py::test_wrong_credentials_are_a_clear_error_that_shows_no_secret` (store API, `datasets show`); `curate` here |
| JSON nested 100,000 levels deep (or more than 64) | reject `invalid_json`, "line N: nested too deeply to parse (at most 64 levels)" / "nested more than 64 levels deep" | curate run (gzip input) + both ingest paths + seed ingest |
| an escaped lone surrogate (`"\ud800"`) in a value or key | reject `invalid_utf8`, "line N: a string holds a lone surrogate (\ud800), which is not UTF-8" | curate run + both ingest paths + seed ingest |
| field types that disagree across rows (a list then an object, an int then a string, `[1, "x"]`, an int over int64) | reject `type_mismatch`, "line N: field 'F' is an object, but the column is a list of integers (from line K)"; `{}` carried as null | curate run + both ingest paths at several shard sizes (`tests/stages/test_ingest.py`), sharded vs in-memory publish (`tests/flows/test_curate_streaming.py`) |
| a UTF-8 byte-order mark | skipped; the first row is kept | curate run + seed ingest |
| gzip / zstd input (any name) | decompressed as a stream, same rows, parent sha256 of the stored bytes | curate run + both ingest paths + seed ingest; memory: `tests/stages/test_ingest.py` |
| unreadable as a whole (ZIP, tar, bzip2, xz, an image, UTF-16, truncated gzip/zstd, no line decodes) | exit 1, "PATH: a PNG image, not JSONL or Parquet (...)", nothing published | CLI (`curate`: by magic before Prefect starts; "no line decodes" in the flow) + stage functions |
| a store on a full disk | exit 1, "store PATH: no space left on device (writing KEY)", no traceback, no version, no temporary files | CLI (`curate`) on a real 1 MiB tmpfs; `tests/test_store_publish.py` |

A run of the whole flow costs a Prefect start, so the bad rows share one `distillery curate` run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillery.accounting import StageCount
from distillery.stages.ingest import DEFAULT_MAX_ROW_BYTES, EmptyInput, ingest_rows, ingest_seeds
from distillery.uri_io import s3_client
from schemas.recipe import SeedsConfig
from tests.conftest import free_port
from tests.test_s3_store import authenticating_s3  # noqa: F401  (a fixture: a moto server that checks credentials)
from tests.test_store_publish import small_disk  # noqa: F401  (a fixture: a real 1 MiB filesystem)

ROOT = Path(__file__).resolve().parents[1]
BIG = 5_000_000  # a 5 MB text: five times the default row limit (1 MiB)


@pytest.fixture(autouse=True)
def _own_prefect_home(tmp_path, monkeypatch, shared_prefect):
    """Each CLI run here gets its own Prefect home: Prefect creates the folder without its
    parents, so an inherited PREFECT_HOME may not be usable. The runs report to the session's
    ``prefect server`` (``shared_prefect``) rather than each starting a temporary one."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


def _error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("distillery: error: ")]
    assert lines, out.stderr[-3000:]
    return lines[-1].removeprefix("distillery: error: ")


def _nothing_published(store: Path) -> bool:
    return not list(store.glob("*/v*/manifest.json"))


def _text(i: int) -> str:
    a, b = 3 * i + 7, 5 * i + 11
    return f"Worker {i} packs {a} boxes before lunch and {b} after it on day {i}. So {a} + {b} = {a + b} boxes for item {i}."


def _check_counts_add_up(manifest: dict) -> None:
    counts = manifest["counts"]
    stages = counts["stages"]
    assert stages[0]["rows_in"] == counts["input"] and stages[-1]["rows_out"] == counts["published"]
    for before, after in zip(stages, stages[1:]):
        assert after["rows_in"] == before["rows_out"], (before, after)
    for s in stages:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values()), s


# -------------------------------------------------------------------- bad rows: one curate run
def test_curate_quarantines_every_bad_row_with_its_reason_and_loses_nothing(tmp_path):
    good = [json.dumps({"id": f"ok-{i}", "completion": _text(i)}).encode() for i in range(3)]
    big = json.dumps({"id": "big", "completion": "x" * BIG}).encode()
    bad = {  # the line as bytes -> (reason, detail)
        b"{not json": ("invalid_json", "Expecting property name enclosed in double quotes at column 2"),
        b'{"id": "latin1", "completion": "caf\xe9 au lait is nice to drink"}': ("invalid_utf8", "not UTF-8 (invalid continuation byte at byte 35)"),
        json.dumps({"id": "wrong-type", "completion": 17}).encode(): ("wrong_type", "field 'completion': expected string, got int"),
        json.dumps({"id": "no-text", "question": "where is the completion?"}).encode(): ("missing_field", "field 'completion' is missing"),
        json.dumps({"id": "null-text", "completion": None}).encode(): ("missing_field", "field 'completion' is missing"),
        json.dumps(["a", "list"]).encode(): ("not_an_object", "expected a JSON object, got list"),
        json.dumps("a string").encode(): ("not_an_object", "expected a JSON object, got str"),
        big: ("too_large", f"{len(big):,} bytes, more than max_row_bytes ({DEFAULT_MAX_ROW_BYTES:,})"),
        json.dumps({"id": "ok-1", "completion": _text(1) + " (again)"}).encode(): ("duplicate_id", "id ok-1 repeats"),
    }
    lines = [good[0], b"", *list(bad)[:4], b"   ", good[1], *list(bad)[4:], good[2]]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    store = tmp_path / "store"
    started = time.monotonic()
    out = _cli("curate", str(path), "--name", "bad-input", "--store", str(store), "--set", "id_column=id", "--set", "dedup.near=false")
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())

    rows = [line for line in lines if line.strip()]
    assert manifest["counts"]["input"] == len(rows) == 12  # blank lines are layout, not rows
    _check_counts_add_up(manifest)
    ingest = manifest["counts"]["stages"][0]
    expected: dict[str, int] = {}
    for reason, _ in bad.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert ingest["stage"] == "ingest"
    assert ingest["dropped"] == expected, "curate's ingest must quarantine these (a row over max_row_bytes: too_large, via distillery.stages.ingest.parse_jsonl_line)"
    assert ingest["rows_out"] == 3 and manifest["counts"]["published"] == 3

    published = pl.concat([pl.read_parquet(uri / s["path"]) for s in manifest["shards"]])
    assert sorted(published["sample_id"]) == ["ok-0", "ok-1", "ok-2"]
    rejects = pl.concat([pl.read_parquet(uri / s["path"]) for s in manifest["reject_shards"]])
    # nothing lost: every input row is published or in rejects/, once
    assert published.height + rejects.height == len(rows)
    assert manifest["counts"]["rejected"] == rejects.height == sum(expected.values())
    line_numbers = {line: n + 1 for n, line in enumerate(lines)}
    for line, (reason, detail) in bad.items():
        raw = line.decode("utf-8", "replace")
        found = rejects.filter(pl.col("record") == raw)
        assert found.height == 1, f"{reason}: the raw record is not in rejects/ exactly once"
        assert found["stage"][0] == "ingest" and found["reason"][0] == reason
        if reason in ("invalid_json", "invalid_utf8", "too_large"):
            assert found["detail"][0] == f"line {line_numbers[line]}: {detail}"
        else:
            assert found["detail"][0] == detail
    big_reject = rejects.filter(pl.col("reason") == "too_large")["record"][0]
    assert len(big_reject) == len(big)  # kept whole: quarantined, not truncated
    print(f"curate over {len(rows)} rows incl. a {len(big):,}-byte row: {elapsed:.1f}s")


# -------------------------------------------------------------------- the run path: seed ingest
def test_seed_ingest_quarantines_every_bad_row_with_its_reason(tmp_path):
    big = json.dumps({"question": "y" * BIG, "answer": "#### 1"}).encode()
    long = json.dumps({"question": "z" * 30_000, "answer": "#### 1"}).encode()
    lines = [
        json.dumps({"question": "What is 2+2?", "answer": "#### 4"}).encode(),
        b"{not json",
        b'{"question": "caf\xe9?", "answer": "#### 1"}',
        json.dumps({"question": 17, "answer": "#### 3"}).encode(),
        json.dumps({"answer": "#### 3"}).encode(),
        json.dumps([1, 2]).encode(),
        big,
        long,
        json.dumps({"question": "What is 2+2?", "answer": "#### 4"}).encode(),
        json.dumps({"question": "What is 3+3?", "answer": "six"}).encode(),
        json.dumps({"question": "What is 5+5?", "answer": "#### 10"}).encode(),
    ]
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"\n".join(lines))
    result = ingest_seeds(SeedsConfig(path=str(path), answer_format="gsm8k"))
    expected = {
        1: ("invalid_json", "line 2: Expecting property name enclosed in double quotes at column 2"),
        2: ("invalid_utf8", "line 3: not UTF-8 (invalid continuation byte at byte 17)"),
        3: ("wrong_type", "field 'question': expected string, got int"),
        4: ("missing_field", "field 'question' is missing"),
        5: ("not_an_object", "expected a JSON object, got list"),
        6: ("too_large", f"line 7: {len(big):,} bytes, more than max_row_bytes ({DEFAULT_MAX_ROW_BYTES:,})"),
        7: ("too_long", "field 'question': 30000 characters, at most 20000"),
        8: ("duplicate_seed", None),
        9: ("no_reference_answer", "field 'answer': no final answer found (gsm8k format)"),
    }
    assert result.count.rows_in == len(lines)
    assert result.kept["reference_answer"].to_list() == ["4", "10"]
    assert result.count.rows_out == result.count.rows_in * result.count.fanout - sum(result.count.dropped.values())
    assert isinstance(result.count.check(), StageCount)
    assert result.rejects.height == len(expected) == sum(result.count.dropped.values())
    for n, (reason, detail) in expected.items():
        found = result.rejects.filter(pl.col("record") == lines[n].decode("utf-8", "replace"))
        assert found.height >= 1 and found["reason"].to_list()[-1] == reason, (n, reason, found)
        if detail is not None:
            assert found["detail"].to_list()[-1] == detail
    assert result.rejects.filter(pl.col("reason") == "duplicate_seed")["detail"][0].endswith("repeats row 0")

    # the limit is a recipe setting: seeds.max_row_bytes (at least 1 KiB)
    small = ingest_seeds(SeedsConfig(path=str(path), answer_format="gsm8k", max_row_bytes=2048))
    assert small.count.dropped["too_large"] == 2 and "too_long" not in small.count.dropped
    assert "more than max_row_bytes (2,048)" in small.rejects.filter(pl.col("reason") == "too_large")["detail"][0]
    # and a Parquet row is measured as JSON
    pq_path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": ["What is 1+1?", "w" * 4000], "answer": ["#### 2", "#### 3"]}), pq_path)
    parquet = ingest_seeds(SeedsConfig(path=str(pq_path), answer_format="gsm8k", max_row_bytes=2048))
    assert parquet.count.dropped == {"too_large": 1} and parquet.rejects["detail"][0].startswith("row 2: 4,")


def test_row_limit_must_be_sensible_in_the_recipe(tmp_path):
    out = _cli("run", "recipes/gsm8k-cot.yaml", "--set", "seeds.path=x.jsonl", "--set", "seeds.max_row_bytes=10", "--store", str(tmp_path / "s"))
    assert out.returncode == 2
    assert "field 'seeds.max_row_bytes': Input should be greater than or equal to 1024 (got 10)" in out.stderr


# -------------------------------------------------------------------- empty input
def test_empty_input_is_a_clear_error_and_publishes_nothing(tmp_path):
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n  \n\n")
    store = tmp_path / "store"
    out = _cli("curate", str(empty), "--name", "empty", "--store", str(store))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out) == f"{empty}: the input is empty (0 bytes): no rows to read"
    out = _cli("run", "recipes/gsm8k-cot.yaml", "--set", f"seeds.path={blank}", "--store", str(store))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out) == f"{blank}: the input has only blank lines: no rows to read"
    assert _nothing_published(store)

    # inside the flows (a deployment that skips the CLI's checks) the stage says the same
    with pytest.raises(EmptyInput, match=r"empty\.jsonl: the input is empty \(0 bytes\): no rows to read"):
        ingest_seeds(SeedsConfig(path=str(empty)))
    with pytest.raises(EmptyInput, match="the input has only blank lines"):
        ingest_rows(str(blank), text_column="completion")
    no_rows = tmp_path / "none.parquet"
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), no_rows)
    with pytest.raises(EmptyInput, match="none.parquet: the Parquet file has no rows"):
        ingest_seeds(SeedsConfig(path=str(no_rows)))


# -------------------------------------------------------------------- unknown recipe keys
def test_unknown_recipe_keys_are_named_with_exit_code_2(tmp_path):
    store = tmp_path / "store"
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\nseeds: {path: x.jsonl}\ngeneraton: {temperature: 0.5}\n")
    out = _cli("run", str(recipe), "--store", str(store))
    assert out.returncode == 2
    assert f"recipe {recipe} is invalid:" in out.stderr
    assert "field 'generaton': unknown field; did you mean 'generation'?" in out.stderr

    out = _cli("run", "recipes/gsm8k-cot.yaml", "--set", "seeds.path=x.jsonl", "--set", "seeds.fields.questoin=q", "--store", str(store))
    assert out.returncode == 2 and "field 'seeds.fields.questoin': unknown field; did you mean 'question'?" in out.stderr

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": _text(1)}) + "\n")
    out = _cli("curate", str(data), "--name", "typo", "--store", str(store), "--set", "dedupp.threshold=0.5", "--set", "zzz=1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "field 'dedupp': unknown field; did you mean 'dedup'?" in out.stderr
    assert "field 'zzz': unknown field; known fields here: name, description, format, text_column, id_column, quality" in out.stderr
    assert not store.exists()


# -------------------------------------------------------------------- a missing model
def test_missing_model_path_names_the_path_and_publishes_nothing(tmp_path):
    store = tmp_path / "store"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    for model in (tmp_path / "no-such-model", tmp_path):  # missing, and a folder that is not a model
        out = _cli("run", "recipes/gsm8k-cot.yaml", "--set", f"seeds.path={seeds}", "--set", f"model.path={model}", "--store", str(store))
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert _error_line(out) == f"model.path: model folder {model} not found or has no config.json"
    assert not store.exists() and _nothing_published(tmp_path)  # nothing claimed, nothing written


# -------------------------------------------------------------------- unreachable Ray
def _closed_port() -> int:
    return free_port()  # bound, then closed: nothing listens there


class _SilentServer:
    """A TCP server on loopback that accepts connections and never says anything."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_unreachable_ray_is_a_fast_clear_error_naming_ray_address(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": _text(1)}) + "\n")
    store = tmp_path / "store"
    port = _closed_port()
    started = time.monotonic()
    out = _cli("curate", str(data), "--name", "ray", "--store", str(store), env={"RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=120)
    elapsed = time.monotonic() - started
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out).startswith(f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster reachable at 127.0.0.1:{port} (Connection refused)")
    assert elapsed < 60, f"took {elapsed:.0f}s"  # ray.init alone retries for minutes; this is the interpreter's start-up
    assert _nothing_published(store)


def test_ray_address_check_accepts_a_real_cluster_and_refuses_a_stranger(monkeypatch):
    from distillery.engine import Unreachable, check_ray_address

    head = subprocess.Popen(  # a real Ray cluster (GCS, raylet), stopped when its driver exits
        [sys.executable, "-c", "import ray, sys; ray.init(include_dashboard=False, num_cpus=1); print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    silent = _SilentServer()
    try:
        address = head.stdout.readline().strip()
        assert address, "the Ray head did not start"
        monkeypatch.setenv("RAY_ADDRESS", address)
        check_ray_address()  # a real GCS answers: no error
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{silent.port}")
        started = time.monotonic()
        with pytest.raises(Unreachable, match=rf"RAY_ADDRESS=127\.0\.0\.1:{silent.port}: something listens at 127\.0\.0\.1:{silent.port}, but it does not answer like a Ray cluster \(no gRPC answer in 2s\)"):
            check_ray_address(timeout=2)
        assert time.monotonic() - started < 10
        monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1")  # the client port, 10001, by default
        with pytest.raises(Unreachable, match=r"ray://127\.0\.0\.1: no Ray cluster reachable at 127\.0\.0\.1:10001"):
            check_ray_address()
        monkeypatch.setenv("RAY_ADDRESS", "my-cluster:port")
        with pytest.raises(Unreachable, match="expected host:port"):
            check_ray_address()
    finally:
        silent.close()
        head.stdin.close()
        head.wait(60)


# -------------------------------------------------------------------- unreachable S3
def test_s3_client_is_bounded():
    s3_client.cache_clear()
    try:
        config = s3_client().meta.config
        assert config.connect_timeout == 10 and config.read_timeout == 60
        assert config.retries == {"mode": "standard", "total_max_attempts": 3}  # the first try and 2 retries
    finally:
        s3_client.cache_clear()


def test_unreachable_s3_is_a_fast_clear_error(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": _text(1)}) + "\n")
    port = _closed_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    hint = f"the S3 endpoint http://127.0.0.1:{port} cannot be reached (check AWS_ENDPOINT_URL and the network)"
    started = time.monotonic()
    out = _cli("curate", str(data), "--name", "s3", "--store", "s3://team/store", env=env, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out) == f"s3://team/store/: {hint}"
    out = _cli("curate", "s3://team/in/rows.jsonl", "--name", "s3", "--store", str(tmp_path / "store"), env=env, timeout=120)
    assert out.returncode == 1 and _error_line(out) == f"s3://team/in/rows.jsonl: {hint}"
    assert time.monotonic() - started < 90  # two interpreter start-ups; no Prefect, no retries for minutes
    assert not (tmp_path / "store").exists()

    # an endpoint that accepts connections and never answers: bounded by the read timeout and 3 attempts
    silent = _SilentServer()
    try:
        started = time.monotonic()
        out = _cli(
            "datasets", "--store", "s3://team/store", "list",
            env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.port}", "DISTILLERY_S3_READ_TIMEOUT": "1"}, timeout=120,
        )
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out) == f"s3://team/store/: the S3 endpoint http://127.0.0.1:{silent.port} did not answer in time"
    assert elapsed < 45, f"took {elapsed:.0f}s"


# -------------------------------------------------------------------- wrong credentials
def test_wrong_credentials_stop_curate_before_it_starts(authenticating_s3, tmp_path):  # noqa: F811
    """The store API and `datasets show` are tested in tests/test_s3_store.py; here `curate`."""
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": _text(1)}) + "\n")
    started = time.monotonic()
    out = _cli("curate", str(data), "--name", "creds", "--store", "s3://team-bucket/store", timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert _error_line(out) == "s3://team-bucket/store/: the access key is not known to the server (check the credentials)"
    assert "wrong-secret-do-not-print" not in out.stdout + out.stderr
    assert time.monotonic() - started < 60  # the check runs before Prefect starts


def test_stage_reads_of_bytes_report_their_own_errors(tmp_path):
    """A folder or a missing file as the seeds: clear, before any row is read."""
    from distillery.uri_io import StorageError

    with pytest.raises(StorageError, match=f"{tmp_path}: is a folder, expected a file"):
        ingest_seeds(SeedsConfig(path=str(tmp_path)))
    out = _cli("curate", str(tmp_path / "nope.jsonl"), "--name", "x", "--store", str(tmp_path / "store"))
    assert out.returncode == 1 and _error_line(out) == f"{tmp_path / 'nope.jsonl'}: no such file"


# -------------------------------------------------------------------- rows that parse but cannot go on; compressed input
def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _deep_json(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def test_curate_of_gzip_input_with_a_bom_a_deep_row_and_a_lone_surrogate_curates_every_good_row(tmp_path):
    """One `distillery curate` run: a gzip-compressed file named .jsonl, starting with a UTF-8 BOM,
    with a JSON line nested 100,000 levels deep, one nested 65 levels, a lone surrogate in a value
    and in a key, among good rows: the bad ones are quarantined at ingest, every good row (the
    first one too) is curated, the counts add up."""
    good = [json.dumps({"id": f"ok-{i}", "completion": _text(i)}).encode() for i in range(4)]
    bad = {  # line -> (reason, detail without "line N: ")
        _deep_json(100_000): ("invalid_json", "nested too deeply to parse (at most 64 levels)"),
        json.dumps({"id": "deep-65", "completion": _text(9), "meta": json.loads(_deep_json(64))}).encode(): (
            "invalid_json",
            "nested more than 64 levels deep (at most 64)",
        ),
        b'{"id": "surrogate", "completion": "a lone \\ud800 surrogate in a long enough completion text"}': (
            "invalid_utf8",
            "a string holds a lone surrogate (\\ud800), which is not UTF-8",
        ),
        b'{"id": "surrogate-key", "completion": "' + _text(8).encode() + b'", "k\\udfff": 1}': (
            "invalid_utf8",
            "a string holds a lone surrogate (\\udfff), which is not UTF-8",
        ),
    }
    lines = [good[0], *list(bad)[:2], good[1], good[2], *list(bad)[2:], good[3]]
    path = tmp_path / "rows.jsonl"  # gzip by content, not by name
    path.write_bytes(_gzip(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"))
    store = tmp_path / "store"
    started = time.monotonic()
    out = _cli("curate", str(path), "--name", "hardened", "--store", str(store), "--set", "id_column=id", "--set", "dedup.near=false")
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())
    assert manifest["counts"]["input"] == len(lines) == 8
    _check_counts_add_up(manifest)
    ingest = manifest["counts"]["stages"][0]
    assert ingest["dropped"] == {"invalid_json": 2, "invalid_utf8": 2} and ingest["rows_out"] == 4
    assert manifest["counts"]["published"] == 4
    published = pl.concat([pl.read_parquet(uri / s["path"]) for s in manifest["shards"]])
    assert sorted(published["sample_id"]) == ["ok-0", "ok-1", "ok-2", "ok-3"]  # ok-0 follows the BOM: kept
    rejects = pl.concat([pl.read_parquet(uri / s["path"]) for s in manifest["reject_shards"]])
    assert published.height + rejects.height == len(lines)  # nothing lost, nothing doubled
    for line, (reason, detail) in bad.items():
        found = rejects.filter(pl.col("record") == line.decode())
        assert found.height == 1 and found["reason"][0] == reason, reason
        assert found["detail"][0] == f"line {lines.index(line) + 1}: {detail}"
    assert manifest["parents"][0]["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()  # of the file as stored
    print(f"curate of gzip input with 4 bad rows: {elapsed:.1f}s")


def _both_ingests(path: Path, **kwargs):
    """``ingest_rows`` (in memory) and ``IngestBatches`` (streaming, 2 rows a batch), summed up."""
    from distillery.stages.ingest import IngestBatches

    whole = ingest_rows(str(path), text_column="completion", **kwargs)
    batches = list(IngestBatches(str(path), text_column="completion", batch_rows=2, **kwargs))
    kept = pl.concat([b.kept for b in batches], how="diagonal_relaxed")
    rejects = pl.concat([b.rejects for b in batches])
    dropped: dict[str, int] = {}
    for b in batches:
        for reason, n in b.count.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
    return whole, (kept, rejects, dropped, sum(b.count.rows_in for b in batches))


def test_rows_that_parse_but_cannot_be_carried_are_quarantined_in_every_ingest_path(tmp_path):
    """The shared row check (``parse_jsonl_line`` -> ``value_problem``): the in-memory ingest of
    `distillery run` (seeds) and `curate --recipe` agree with the streaming one of `curate`, and
    the kept rows can be written as Parquet (no UnicodeEncodeError, no polars crash)."""
    rows = [
        json.dumps({"completion": "kept: 64 levels is the limit", "x": json.loads(_deep_json(63))}).encode(),  # 64 with the row itself
        json.dumps({"completion": "refused: 65 levels", "x": json.loads(_deep_json(64))}).encode(),
        _deep_json(3_000),  # parses in no Python JSON parser: RecursionError
        b'{"completion": "x", "nested": {"list": ["fine", "lone \\udc12 surrogate"]}}',
        b'{"completion": "a pair is fine: \\ud83d\\ude00 and brackets in text are too: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',
        b'{"completion": "an escaped backslash is not an escape: \\\\ud800"}',
        b'{"completion": "a number of 5,000 digits", "n": ' + b"7" * 5000 + b"}",  # Python's int parsing refuses it: ValueError
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    whole, (kept, rejects, dropped, rows_in) = _both_ingests(path)
    expected = {"invalid_json": 3, "invalid_utf8": 1}
    assert whole.count.dropped == dropped == expected and whole.count.rows_in == rows_in == len(rows)
    assert whole.kept.height == kept.height == 3
    assert sorted(whole.rejects["detail"].to_list()) == sorted(rejects["detail"].to_list()) == [
        "line 2: nested more than 64 levels deep (at most 64)",
        "line 3: nested too deeply to parse (at most 64 levels)",
        "line 4: a string holds a lone surrogate (\\udc12), which is not UTF-8",
        "line 7: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits",
    ]
    for frame in (whole.kept, whole.rejects, kept, rejects):
        frame.write_parquet(tmp_path / "out.parquet")  # what publish does: no UnicodeEncodeError

    # the run path (seed ingest) quarantines the same rows with the same reasons
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(
        b"\xef\xbb\xbf"
        + b"\n".join(
            [
                json.dumps({"question": "What is 2+2?", "answer": "#### 4"}).encode(),
                _deep_json(100_000),
                b'{"question": "What is \\ud800?", "answer": "#### 1"}',
                json.dumps({"question": "What is 3+3?", "answer": "#### 6", "x": json.loads(_deep_json(80))}).encode(),
                json.dumps({"question": "What is 5+5?", "answer": "#### 10"}).encode(),
            ]
        )
    )
    result = ingest_seeds(SeedsConfig(path=str(seeds), answer_format="gsm8k"))
    assert result.count.rows_in == 5 and result.count.dropped == {"invalid_json": 2, "invalid_utf8": 1}
    assert result.kept["reference_answer"].to_list() == ["4", "10"]  # the first row, after the BOM, is kept
    result.kept.write_parquet(tmp_path / "seeds.parquet")
    result.rejects.write_parquet(tmp_path / "seed-rejects.parquet")

    # a Parquet row nested too deeply is refused the same way ("row N"; structs: Parquet itself
    # refuses a schema over 100 levels, and a list takes three)
    deep: object = "leaf"
    for _ in range(70):
        deep = {"a": deep}
    table = pa.table({"completion": ["a Parquet row", "a deep Parquet row"], "x": pa.array([None, deep])})
    pq_path = tmp_path / "deep.parquet"
    pq.write_table(table, pq_path)
    whole, (kept, rejects, dropped, _) = _both_ingests(pq_path)
    assert whole.count.dropped == dropped == {"invalid_json": 1} and whole.kept.height == kept.height == 1
    assert whole.rejects["detail"].to_list() == rejects["detail"].to_list() == ["row 2: nested more than 64 levels deep (at most 64)"]


def test_compressed_jsonl_is_read_by_content_as_a_stream(tmp_path, monkeypatch):
    """gzip and zstd (one member/frame or several), named .jsonl, .gz, .zst or nothing, a BOM
    inside: the same rows as the plain file, in both ingest paths; the streaming one never reads
    the file whole; the parent checksum is that of the file as stored."""
    import hashlib

    import distillery.uri_io
    from distillery.stages.ingest import IngestBatches

    lines = [json.dumps({"id": f"r{i}", "completion": _text(i)}).encode() for i in range(7)] + [b"{broken"]
    text = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n"
    half = text.index(b"\n", len(text) // 2) + 1
    variants = {
        "plain.jsonl": text,
        "gzip.jsonl": _gzip(text),
        "gzip.jsonl.gz": _gzip(text),
        "gzip-members": _gzip(text[:half]) + _gzip(text[half:]),
        "zstd.jsonl": _zstd(text),
        "zstd.zst": _zstd(text),
        "zstd-frames.jsonl": _zstd(text[:half]) + _zstd(text[half:]),
    }
    reference = None
    for name, data in variants.items():
        path = tmp_path / name
        path.write_bytes(data)
        whole, (kept, rejects, dropped, rows_in) = _both_ingests(path, id_column="id")
        assert whole.count.rows_in == rows_in == 8, name
        assert whole.count.dropped == dropped == {"invalid_json": 1}, name
        assert whole.kept["sample_id"].to_list() == kept["sample_id"].to_list() == [f"r{i}" for i in range(7)], name
        assert whole.meta["parent"]["sha256"] == hashlib.sha256(data).hexdigest(), name
        reference = reference if reference is not None else whole.kept
        assert whole.kept.equals(reference), name
        seeds = ingest_seeds(SeedsConfig(path=str(path), fields={"question": "completion", "answer": None, "id": "id"}))
        assert seeds.kept.height == 7 and seeds.count.dropped == {"invalid_json": 1}, name

    def no_whole_reads(uri):
        raise AssertionError(f"read whole: {uri}")

    monkeypatch.setattr(distillery.uri_io, "read_bytes", no_whole_reads)
    batches = IngestBatches(str(tmp_path / "zstd-frames.jsonl"), text_column="completion", batch_rows=3)
    assert sum(b.count.rows_out for b in batches) == 7 and batches.parent["sha256"] == hashlib.sha256(variants["zstd-frames.jsonl"]).hexdigest()


def _zip(data: bytes) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("rows.jsonl", data)
    return buf.getvalue()


def _tar(data: bytes) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("rows.jsonl")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_inputs_unreadable_as_a_whole_are_errors_naming_the_file(tmp_path):
    """Not a successful empty version: a container distillery does not read, a truncated or
    corrupt compressed stream, or a file no line of which decodes as JSON is UnreadableInput
    (the message names the file and what it is) in both ingest paths and the seed ingest."""
    import bz2
    import lzma

    from distillery.stages.ingest import UnreadableInput
    from distillery.stages.ingest import IngestBatches

    rows = b"\n".join(json.dumps({"completion": _text(i)}).encode() for i in range(200)) + b"\n"
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    buf = __import__("io").BytesIO()
    pq.write_table(pa.table({"completion": ["x"]}), buf)
    cases = {
        "zip.jsonl": (_zip(rows), "a ZIP archive, not JSONL or Parquet"),
        "tar.jsonl": (_tar(rows), "a tar archive, not JSONL or Parquet"),
        "bz2.jsonl": (bz2.compress(rows), "bzip2-compressed, not JSONL or Parquet"),
        "xz.jsonl": (lzma.compress(rows), "xz-compressed, not JSONL or Parquet"),
        "image.jsonl": (png, "a PNG image, not JSONL or Parquet"),
        "utf16.jsonl": (rows.decode().encode("utf-16"), "UTF-16 text (byte-order mark FF FE), not JSONL or Parquet"),
        "truncated.jsonl.gz": (_gzip(rows)[:-40], "the gzip data is corrupt or truncated"),
        "corrupt.jsonl.gz": (_gzip(rows)[:20] + bytes(200), "the gzip data is corrupt or truncated"),
        "truncated.jsonl.zst": (_zstd(rows)[:-10], "the zstd data is corrupt or truncated"),
        "corrupt.jsonl.zst": (_zstd(rows)[:6] + bytes(range(256)), "the zstd data is corrupt or truncated"),
        "binary.jsonl": (bytes(range(1, 256)) * 64, "no line of the file decodes as JSON"),
        "csv.jsonl": (b"a,b\n1,2\n3,4\n", "no line of the file decodes as JSON (3 line(s), every one invalid_utf8 or invalid_json; line 1:"),
        "utf16-no-bom.jsonl": (rows.decode().encode("utf-16-le"), "no line of the file decodes as JSON"),
        "parquet.gz": (_gzip(buf.getvalue()), "gzip-compressed parquet data, not JSONL"),
        "not-parquet.parquet": (rows, "not a Parquet file (no Parquet magic bytes (PAR1)), but the format is parquet"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        for read in (
            lambda: ingest_rows(str(path), text_column="completion"),
            lambda: list(IngestBatches(str(path), text_column="completion", batch_rows=50)),
            lambda: ingest_seeds(SeedsConfig(path=str(path), fields={"question": "completion", "answer": None})),
        ):
            with pytest.raises(UnreadableInput) as err:
                read()
            assert str(err.value).startswith(f"{path}: ") and message in str(err.value), (name, str(err.value))
    # a JSONL file in which some line decodes is rows, not a bad file: one good row is enough
    some = tmp_path / "some.jsonl"
    some.write_bytes(bytes(range(1, 256)) + b"\n" + json.dumps({"completion": _text(1)}).encode() + b"\n")
    assert ingest_rows(str(some), text_column="completion").count.dropped == {"invalid_json": 1, "invalid_utf8": 1}  # bytes 1-255 hold a newline


def test_the_cli_refuses_unreadable_inputs_with_exit_1_and_publishes_nothing(tmp_path):
    """A container refused by its first bytes fails before Prefect starts (seconds); one found
    out only by reading it (no line decodes) fails the run: exit 1, one line naming the file, no version."""
    store = tmp_path / "store"
    image = tmp_path / "photo.jsonl"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    started = time.monotonic()
    out = _cli("curate", str(image), "--name", "image", "--store", str(store), timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert _error_line(out).startswith(f"{image}: a PNG image, not JSONL or Parquet")
    assert time.monotonic() - started < 60  # before Prefect starts

    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(1, 256)) * 300)
    out = _cli("curate", str(binary), "--name", "blob", "--store", str(store))
    assert out.returncode == 1, out.stderr[-3000:]
    assert _error_line(out).startswith(f"{binary}: no line of the file decodes as JSON")
    assert _nothing_published(store)
    assert "published 0 rows" not in out.stderr


# -------------------------------------------------------------------- a store on a full disk
def test_curate_into_a_full_store_is_one_line_and_leaves_no_version_or_temporary_files(small_disk, tmp_path):  # noqa: F811
    """A store on a real 1 MiB filesystem, a data set of ~3 MB: exit 1 with one line naming the
    store and "no space left", no traceback, no visible version, nothing but the claim left."""
    import os

    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(3000):
            words = " ".join(os.urandom(4).hex() for _ in range(110))
            f.write(json.dumps({"id": f"r{i}", "completion": f"Row {i}: {words}"}) + "\n")
    started = time.monotonic()
    out = _cli("curate", str(path), "--name", "full", "--store", str(small_disk), "--set", "id_column=id", "--set", "dedup.near=false")
    assert out.returncode == 1, out.stderr[-4000:]
    assert _error_line(out).startswith(f"store {small_disk}: no space left on device (writing full/v0001/")
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    assert _nothing_published(small_disk)
    left = sorted(str(p.relative_to(small_disk)) for p in small_disk.rglob("*") if p.is_file())
    assert not [name for name in left if "/." in f"/{name}"], left  # no hidden temporary file
    assert [name for name in left if not name.startswith("_lineage/")] == ["full/v0001/_claim"], left  # no half a version
    assert any(name.endswith("-curate-FAIL.json") for name in left)  # the lineage says the run failed
    print(f"curate into a full store: {time.monotonic() - started:.1f}s")


def test_curate_of_rows_whose_field_types_disagree_quarantines_the_misfits_and_publishes_the_rest(tmp_path):
    """One `distillery curate` run over rows whose other fields polars cannot put in one column as
    they are (a list then an object, an object then a string, a mixed list, `{}`, an int then a
    string, an integer over int64): exit 0, each misfit a `type_mismatch` naming the field and both
    types, `{}` carried as null, the published Parquet readable by plain pyarrow, the counts add up."""
    rows = [
        ({"id": "r0", "completion": _text(0), "m": [1, 2], "o": {"x": 1}, "n": 1, "e": {}}, None),
        ({"id": "r1", "completion": _text(1), "m": {"x": 1}}, "line 2: field 'm' is an object, but the column is a list of integers (from line 1)"),
        ({"id": "r2", "completion": _text(2), "o": "flat"}, "line 3: field 'o' is a string, but the column is an object (from line 1)"),
        ({"id": "r3", "completion": _text(3), "mix": [1, "x"]}, "line 4: field 'mix' is a list mixing integers and strings; a column holds one type"),
        ({"id": "r4", "completion": _text(4), "mix": [[1], 2]}, "line 5: field 'mix' is a list mixing lists of integers and integers; a column holds one type"),
        ({"id": "r5", "completion": _text(5), "n": "two"}, "line 6: field 'n' is a string, but the column is an integer (from line 1)"),
        ({"id": "r6", "completion": _text(6), "n": 2**70}, "line 7: field 'n' is an integer (1180591620717411303424) outside the 64-bit range a column holds (-2**63 to 2**63-1)"),
        ({"id": "r7", "completion": _text(7), "m": [2.5], "o": {"y": "z"}, "n": 3.5, "e": {"k": {}}}, None),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row, _ in rows))
    store = tmp_path / "store"
    out = _cli("curate", str(path), "--name", "mixed-types", "--store", str(store), "--set", "id_column=id", "--set", "dedup.near=false")
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())
    _check_counts_add_up(manifest)
    expected = [detail for _, detail in rows if detail]
    assert manifest["counts"]["input"] == len(rows) and manifest["counts"]["stages"][0]["dropped"] == {"type_mismatch": len(expected)}
    published = pa.concat_tables([pq.read_table(uri / s["path"]) for s in manifest["shards"]])  # plain pyarrow reads it
    rejects = pl.concat([pl.read_parquet(uri / s["path"]) for s in manifest["reject_shards"]])
    assert published.num_rows + rejects.height == manifest["counts"]["input"] == manifest["counts"]["published"] + rejects.height
    assert sorted(published.column("sample_id").to_pylist()) == ["r0", "r7"]
    assert sorted(rejects["detail"].to_list()) == sorted(expected) and set(rejects["reason"]) == {"type_mismatch"}
    assert sorted(rejects["record"].to_list()) == sorted(json.dumps(row) for row, detail in rows if detail)
    kept = pl.from_arrow(published).sort("sample_id")
    assert kept["m"].to_list() == [[1.0, 2.0], [2.5]] and kept["n"].to_list() == [1.0, 3.5]
    assert kept["o"].to_list() == [{"x": 1, "y": None}, {"x": None, "y": "z"}] and kept["e"].to_list() == [None, {"k": None}]
