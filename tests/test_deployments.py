"""Scheduled deployments end to end: a real `prefect server` on loopback with API auth,
`distillery deploy`, a real process worker, a deployment run of the synthesize flow on the CPU
vLLM engine, and the version it published.

Slow (a few minutes on 2 cores): deselect with `-m "not slow"`.
"""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.prefect_server import serve, start, stop, tail

ROOT = Path(__file__).resolve().parents[1]
AUTH = "distillery:s3cret-for-tests"
pytestmark = pytest.mark.slow
TINY = ["seeds.builtin.count=2", "generation.samples_per_problem=1", "generation.max_tokens=32", "verify.keep=all"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME (SQLite) and basic auth."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(
        PREFECT_HOME=str(tmp / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    server_env = {**base, "PREFECT_SERVER_API_AUTH_STRING": AUTH, "PREFECT_UI_ENABLED": "false"}
    client_env = {**base, "PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": AUTH}
    log = tmp / "server.log"
    proc = serve(port, server_env, log)
    try:
        yield {"api": api, "env": client_env, "tmp": tmp, "log": log}
    finally:
        stop(proc)


def _auth_header(auth: str = AUTH) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def test_api_requires_the_auth_string(server):
    api = server["api"]
    assert httpx.post(f"{api}/deployments/filter", json={}, timeout=30).status_code == 401
    assert httpx.post(f"{api}/deployments/filter", json={}, headers=_auth_header("distillery:wrong"), timeout=30).status_code == 401
    assert httpx.post(f"{api}/deployments/filter", json={}, headers=_auth_header(), timeout=30).status_code == 200
    # a client without PREFECT_API_AUTH_STRING is refused too
    env = {k: v for k, v in server["env"].items() if k != "PREFECT_API_AUTH_STRING"}
    out = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0, out.stdout


def test_gpu_slots_make_a_second_gpu_run_wait(server, monkeypatch):
    """Two GPU runs on a 1-GPU machine: the second cannot take the `gpu` slot while the first holds it."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from distillery.deploy import ensure_gpu_limit
    from flows.deployments import gpu_slots
    from schemas.recipe import EngineConfig

    updates = {PREFECT_API_URL: server["api"], PREFECT_API_AUTH_STRING: AUTH, PREFECT_HOME: server["env"]["PREFECT_HOME"]}
    with temporary_settings(updates=updates):
        assert ensure_gpu_limit(1)[0] == 1
        one_gpu = EngineConfig(replicas=1, gpus_per_replica=1)
        with gpu_slots(EngineConfig()) as held:  # a CPU engine takes no slot
            assert held == 0
        with gpu_slots(one_gpu) as held:
            assert held == 1
            assert _api(server, "GET", "/v2/concurrency_limits/gpu").json()["active_slots"] == 1
            from prefect.concurrency.sync import concurrency

            with pytest.raises(TimeoutError):
                with concurrency("gpu", occupy=1, timeout_seconds=3, strict=True):
                    pass
        assert _api(server, "GET", "/v2/concurrency_limits/gpu").json()["active_slots"] == 0


def _api(server, method: str, path: str, **kw) -> httpx.Response:
    r = httpx.request(method, server["api"] + path, headers=_auth_header(), timeout=30, **kw)
    r.raise_for_status()
    return r


def test_deploy_then_a_worker_runs_a_deployment_that_publishes(server, tmp_path):
    env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "30"}
    store = tmp_path / "store"
    out = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "deploy", "--store", str(store), "--gpus", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    deployments = {d["name"]: d for d in _api(server, "POST", "/deployments/filter", json={}).json()}
    assert set(deployments) == {"nightly-synthesis", "curate-new-seeds"}
    nightly = deployments["nightly-synthesis"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert nightly["parameters"]["store"] == str(store)
    assert nightly["parameters"]["recipe_path"] == "recipes/default.yaml"
    assert nightly["work_pool_name"] == "distillery"
    assert set(nightly["parameter_openapi_schema"]["properties"]) == {"recipe_path", "store", "overrides"}
    assert nightly["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    pool = _api(server, "GET", "/work_pools/distillery").json()
    assert pool["type"] == "process"
    gpu = _api(server, "GET", "/v2/concurrency_limits/gpu").json()
    assert gpu["limit"] == 1

    worker_log = tmp_path / "worker.log"
    worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "distillery", "--type", "process"], env, worker_log)
    try:
        params = ["--param", f"store={store}", "--param", "overrides=" + json.dumps(TINY)]
        out = subprocess.run(
            [sys.executable, "-m", "prefect", "deployment", "run", "synthesize-recipe/nightly-synthesis", *params],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        runs = _api(server, "POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [nightly["id"]]}}}).json()
        assert len(runs) == 1, runs
        run_id = runs[0]["id"]
        assert runs[0]["parameters"]["overrides"] == TINY

        deadline = time.monotonic() + 900
        while True:
            run = _api(server, "GET", f"/flow_runs/{run_id}").json()
            state = run["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, f"worker exited ({worker.returncode}):\n{tail(worker_log)}"
            assert time.monotonic() < deadline, f"flow run still {state} after 900 s:\n{tail(worker_log)}"
            time.sleep(3)
        assert state == "COMPLETED", f"{state}: {run['state'].get('message')}\n{tail(worker_log)}"
    finally:
        stop(worker)

    versions = sorted((store / "arithmetic-cot").glob("v*/manifest.json"))
    assert len(versions) == 1, list(store.rglob("*"))[:20]
    manifest = json.loads(versions[0].read_text())
    # the version was published by the `synthesize` subflow of the deployment's flow run
    sub = _api(server, "GET", f"/flow_runs/{manifest['flow_run_id']}").json()
    assert sub["name"] and sub["state"]["type"] == "COMPLETED"
    parent_task = _api(server, "GET", f"/task_runs/{sub['parent_task_run_id']}").json()
    assert parent_task["flow_run_id"] == run_id
    assert manifest["root_flow_run_id"] == run_id  # the manifest names the deployment's run too
    assert manifest["counts"]["input"] == 2
    assert manifest["recipe"]["generation"]["max_tokens"] == 32
