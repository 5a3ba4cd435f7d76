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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the tests in parallel workers (pytest-xdist): each its own Prefect home,
    # so that two embedded servers never share one SQLite database.
    os.environ["PREFECT_HOME"] = str(Path(os.environ["PREFECT_HOME"]) / os.environ["PYTEST_XDIST_WORKER"])
apply_run_env()
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """One real ``prefect server`` for this test session (each xdist worker its own), started on
    first use; its API URL. The CLI runs of the modules that ask for it (``shared_prefect``) talk
    to it, as a user's runs with ``PREFECT_API_URL`` set do, instead of each starting a temporary
    server on a new database (6 to 10 s of every run on 2 cores). The embedded default keeps its
    own end-to-end runs (the complete run of tests/flows/test_synthesize_flow.py, the
    credential-leak check of tests/test_security.py, the fast tier's in-process flows)."""
    from tests.prefect_server import serve, stop

    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    proc = serve(port, env, tmp / "server.log", "--no-services")  # runs need the API only
    yield f"http://127.0.0.1:{port}/api"
    stop(proc)


@pytest.fixture
def shared_prefect(prefect_server, monkeypatch) -> str:
    """This test's CLI runs use the session's ``prefect_server`` (``PREFECT_API_URL``)."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    return prefect_server


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


# The longest modules, slowest first (each several minutes with the real engine: see the
# durations `make test` prints). With `make test`'s two workers and whole modules per worker
# (--dist loadfile --no-loadscope-reorder), starting these first lets the many short modules
# fill in around them, so that both workers finish at about the same time.
SLOWEST_FIRST = (
    "tests/flows/test_rewards_flow.py",
    "tests/flows/test_chaos.py",
    "tests/flows/test_served_backend.py",
    "tests/flows/test_actor_failure.py",
    "tests/flows/test_synthesize_flow.py",
    "tests/test_deployments.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the slowest modules first, then the other modules with a slow test, then the rest
    (each group in collection order)."""

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        if path in SLOWEST_FIRST:
            return SLOWEST_FIRST.index(path)
        return len(SLOWEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    modules: dict[str, int] = {}
    for item in items:  # a module's rank is its best test's, so that a module stays together
        path = item.nodeid.split("::")[0]
        modules[path] = min(modules.get(path, 99), rank(item))
    items.sort(key=lambda item: modules[item.nodeid.split("::")[0]])
