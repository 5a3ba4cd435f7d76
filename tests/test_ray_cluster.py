"""Ray beyond one process: the engines' placement group, and a flow on a two-node cluster.

- ``placement_bundles``: one bundle per engine replica, GPUs per tensor-parallel group.
- ``EnginePool.start`` on a real local Ray cluster that cannot hold the engines fails at once
  with a message naming what was asked and what the cluster has; a busy one after its timeout.
  Engines run inside their bundles, and the group is removed on shutdown.
- A real two-node cluster on this machine (``ray start --head`` and ``ray start --address``,
  each with its own temp dir and ports), ``distillery curate`` through ``RAY_ADDRESS``, and the
  dedup signature tasks found on both nodes through the Ray state API (slow).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest

from distillery.engine import EnginePool, PlacementError, placement_bundles
from schemas.recipe import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_one_bundle_per_replica_with_the_gpus_of_a_tensor_parallel_group():
    assert placement_bundles(EngineConfig()) == [{"CPU": 1.0}]
    assert placement_bundles(EngineConfig(replicas=2, gpus_per_replica=1, cpus_per_replica=4, tensor_parallel_size=4)) == [{"CPU": 4.0, "GPU": 4.0}] * 2
    assert placement_bundles(EngineConfig(replicas=3, gpus_per_replica=0.5, cpus_per_replica=0)) == [{"GPU": 0.5}] * 3
    assert placement_bundles(EngineConfig(cpus_per_replica=0)) == []  # nothing to reserve


class Echo:
    """Stands in for ``VLLMEngine`` (same constructor): reports where it runs."""

    def __init__(self, model_path, engine, seed=0) -> None:
        pass

    def render(self, messages):
        import ray

        return ray.get_runtime_context().get_placement_group_id()


@pytest.fixture(scope="module")
def one_cpu_ray():
    """A real local cluster of one CPU and no GPU (a local cluster: no RAY_ADDRESS)."""
    import ray

    address = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()
    if address is not None:
        os.environ["RAY_ADDRESS"] = address


def _live_groups(ray) -> list[str]:
    from ray.util.placement_group import placement_group_table

    return [pg_id for pg_id, info in placement_group_table().items() if info["state"] != "REMOVED"]


def test_a_gpu_engine_on_a_cpu_only_cluster_fails_at_once_naming_the_resources(one_cpu_ray):
    pool = EnginePool("unused", EngineConfig(gpus_per_replica=1, tensor_parallel_size=2), engine_cls=Echo)
    started = time.perf_counter()
    with pytest.raises(PlacementError) as caught:
        pool.start()
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "1 x {CPU=1, GPU=2}" in message
    assert "engine.gpus_per_replica=1" in message and "engine.tensor_parallel_size=2" in message
    assert "1 node(s) with CPU=1, GPU=0 in all" in message
    assert pool.actors == [] and _live_groups(one_cpu_ray) == []


def test_more_replicas_than_the_cluster_holds_fail_at_once(one_cpu_ray):
    with pytest.raises(PlacementError, match=r"2 x \{CPU=1\}.*engine.replicas=2"):
        EnginePool("unused", EngineConfig(replicas=2), engine_cls=Echo).start()


def test_a_busy_cluster_fails_after_the_placement_timeout_and_leaves_no_group(one_cpu_ray):
    from ray.util.placement_group import placement_group, remove_placement_group

    holder = placement_group([{"CPU": 1}])  # someone else's run holds the only CPU
    assert holder.wait(30)
    try:
        pool = EnginePool("unused", EngineConfig(), engine_cls=Echo, placement_timeout_s=2)
        started = time.perf_counter()
        with pytest.raises(PlacementError, match=r"CPU=1, GPU=0 in all, CPU=0, GPU=0 free now\) could not place them within 2s"):
            pool.start()
        assert 2 <= time.perf_counter() - started < 15
        assert _live_groups(one_cpu_ray) == [holder.id.hex()]
    finally:
        remove_placement_group(holder)


def test_engines_run_in_their_bundles_and_shutdown_removes_the_group(one_cpu_ray):
    pool = EnginePool("unused", EngineConfig(cpus_per_replica=0.5, replicas=2), engine_cls=Echo)
    actors = pool.start()
    group = pool.placement_group.id.hex()
    assert one_cpu_ray.get([a.render.remote([]) for a in actors]) == [group, group]
    assert _live_groups(one_cpu_ray) == [group]
    pool.shutdown()
    assert pool.placement_group is None and _live_groups(one_cpu_ray) == []


# ---- two nodes ---------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TwoNodeCluster:
    """``ray start --head`` and a second ``ray start --address`` on this machine.

    Token authentication (Ray's default when a token exists) with a token of its own, which
    every process that talks to the cluster gets through ``env``: the nodes, the driver and the
    state API queries. Each node has its own ``--temp-dir`` (so neither writes ``/tmp/ray/ray_current_cluster``,
    which a bare ``ray.init()`` elsewhere on the machine would join) and its own ports. Each
    ``ray start`` runs in a new session, so its daemons (GCS, raylet, dashboard, workers) share
    its process group: teardown kills those groups, and whatever still names our temp dir,
    never other people's Ray processes (``ray stop`` would stop every Ray cluster of the user).
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Unix socket paths
        self.gcs_port, self.dashboard_port, client, head_agent, worker_agent = _free_ports(5)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.groups: list[int] = []
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        common = ["--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        try:
            self._start(
                "head",
                ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                 f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={head_agent}", *common],
            )
            self._start("worker", [f"--address={self.address}", f"--dashboard-agent-listen-port={worker_agent}", *common])
        except BaseException:
            self.stop()  # a head whose worker failed to join must not outlive the test
            raise

    def _start(self, name: str, args: list[str]) -> None:
        proc = subprocess.Popen(
            [RAY, "start", f"--temp-dir={self.root / name}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, start_new_session=True,
        )
        self.groups.append(proc.pid)  # its process group id: start_new_session made it the leader
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start ({name}) failed:\n{out[-3000:]}"

    def state(self, what: str, **filters) -> list[dict]:
        """``ray.util.state.list_<what>`` through the dashboard, in a process of its own (this one
        may hold another cluster's Ray settings)."""
        code = (
            "import dataclasses, json, ray.util.state as s\n"
            f"rows = s.list_{what}(address={self.dashboard!r}, filters={[(k, '=', v) for k, v in filters.items()]!r}, raise_on_missing_output=False)\n"
            "print(json.dumps([dataclasses.asdict(r) for r in rows], default=str))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def processes(self) -> list:
        """This cluster's live processes: in the groups of its ``ray start``s, or naming its temp dir."""
        import psutil

        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                if _pgid(proc.pid) in self.groups or any(str(self.root) in part for part in proc.info["cmdline"] or []):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to this cluster's processes only; returns once they are gone."""
        import psutil

        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 15)):
            for group in self.groups:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass
            for proc in self.processes():  # anything that left the groups but is ours
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + grace
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.5)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # logs and sockets, once nothing uses them


ROWS = 60_000


def _curate_input(path: Path, rows: int) -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    texts = [f"Row {i}: " + " ".join(rng.choices(vocab, k=8)) + "." for i in range(rows)]
    pl.DataFrame({"id": [f"r{i}" for i in range(rows)], "text": texts}).write_parquet(path)


@pytest.mark.slow
def test_curate_through_ray_address_runs_tasks_on_both_nodes(tmp_path, shared_prefect):
    """60,000 rows: dedup computes MinHash signatures in Ray tasks of ``dedup.signature_task_rows``
    (50,000 by default; tasks/dedup.py: two here, submitted together); with one CPU per node, the second goes to the node the first
    leaves free."""
    source = tmp_path / "rows.parquet"
    _curate_input(source, ROWS)
    recipe = tmp_path / "curate.yaml"
    recipe.write_text("name: cluster-demo\ntext_column: text\nid_column: id\nquality: {require_final_answer: false}\n")
    cluster = TwoNodeCluster()
    try:
        deadline = time.monotonic() + 60
        while len(nodes := cluster.state("nodes", state="ALIVE")) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(nodes) == 2 and sum(n["is_head_node"] for n in nodes) == 1
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PREFECT_HOME": str(tmp_path / "prefect")}
        cmd = [sys.executable, "-m", "distillery.cli", "curate", str(source), "--name", "cluster-demo", "--recipe", str(recipe), "--store", str(tmp_path / "store")]
        started = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
        manifest = json.loads((Path(out.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
        assert manifest["counts"]["input"] == ROWS
        assert manifest["counts"]["published"] == ROWS  # random texts: nothing to drop
        print(f"curate of {ROWS} rows on the two-node cluster: {time.monotonic() - started:.1f}s")

        # Task events reach the GCS within a second or so. Not only FINISHED ones: the driver's
        # exit ends the job's workers, and the last task's final event may never be sent; the
        # node it ran on is known from when it was scheduled.
        deadline = time.monotonic() + 30
        while True:
            tasks = [t for t in cluster.state("tasks", func_or_class_name="signatures") if t["node_id"]]
            if len({t["node_id"] for t in tasks}) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(tasks) == 2, tasks
        assert {t["node_id"] for t in tasks} == {n["node_id"] for n in nodes}, [(t["task_id"], t["node_id"]) for t in tasks]
    finally:
        cluster.stop()
    left = cluster.processes()
    cluster.remove()
    assert left == []


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# ---- infra/ray-cluster.yaml --------------------------------------------------------------


def test_the_autoscaler_config_is_valid_for_ray():
    """The cluster config against the schema Ray ships, then as ``ray up`` prepares it."""
    import jsonschema
    import ray
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "infra" / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(config)  # merged with the AWS defaults, as `ray up` does
    validate_config(prepared)

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types.values())  # GPUs only on demand
    assert sum(t["max_workers"] for t in gpu_types.values()) == config["max_workers"]
    # the image's Ray is the pinned one, and every node installs the gpu extra from this checkout
    pinned = next(line.split("==")[1].strip('",') for line in (ROOT / "pyproject.toml").read_text().split() if line.startswith('"ray=='))
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pinned}-py311")
    assert any('pip install --quiet -e ".[gpu]"' in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"/home/ray/distillery": "."}
