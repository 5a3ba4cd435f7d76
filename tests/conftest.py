"""Shared fixtures: a real S3-compatible server (moto's) on loopback, and the reference data.

The settings the tests run with live here, not in the Makefile, so that plain ``pytest`` and
``make test`` run the tests the same way (tests/test_test_env.py compares the two). They are
applied when this file is imported, before any test module imports Prefect (which reads its
settings once); a value already in the environment wins.
"""

import os
import socket
from pathlib import Path

import pytest

from distillery import apply_run_env

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# What the tests add to the run settings (distillery.RUN_ENV: offline model hubs, Prefect's
# start-up timeout). Prefect's home: one folder per checkout (created here: Prefect creates it
# without its parents). Tests that run the CLI give each run a PREFECT_HOME of its own.
TEST_ENV = {
    "PREFECT_HOME": str(ROOT / ".cache" / "prefect"),
    "PREFECT_LOGGING_LEVEL": "INFO",
}
for _key, _value in TEST_ENV.items():
    os.environ.setdefault(_key, _value)
apply_run_env()
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server over real HTTP on 127.0.0.1 (boto3 talks to it like any S3 endpoint)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A boto3 client on the loopback server, with the environment pointed at it."""
    import boto3

    from distillery.uri_io import s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_client.cache_clear()
    yield boto3.client("s3")
    s3_client.cache_clear()


def pytest_sessionfinish(session, exitstatus):
    """Leave no child behind: the interpreter's exit joins multiprocessing children (a vLLM
    engine core left running would hang it), and a local Ray cluster is stopped here."""
    import multiprocessing

    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    for child in multiprocessing.active_children():
        child.join(5)  # one that was just stopped exits by itself
        if not child.is_alive():
            continue
        print(f"\nconftest: stopping leftover child process {child.name} (pid {child.pid})")
        child.terminate()
        child.join(10)
        if child.is_alive():
            child.kill()
