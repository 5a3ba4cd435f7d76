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
from tests.conftest import _free_port
from tests.test_s3_store import authenticating_s3  # noqa: F401  (a fixture: a moto server that checks credentials)

ROOT = Path(__file__).resolve().parents[1]
BIG = 5_000_000  # a 5 MB text: five times the default row limit (1 MiB)


@pytest.fixture(autouse=True)
def _own_prefect_home(tmp_path, monkeypatch):
    """Each CLI run here gets its own Prefect home (the embedded server's SQLite database): Prefect
    creates the folder without its parents, so an inherited PREFECT_HOME may not be usable."""
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
    return _free_port()  # bound, then closed: nothing listens there


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
