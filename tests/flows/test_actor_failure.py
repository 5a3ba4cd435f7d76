"""A vLLM actor that dies mid-batch is restarted and its batch retried; a request that keeps
killing its engine becomes a ``generation_error`` reject, not a failed run.

- The engine pool's fault handling on real Ray actors whose processes really die (``os._exit``),
  with a stand-in engine class so that a death costs a second, not a vLLM start-up.
- The real ``distillery run`` (reporting to the session's ``prefect server``, a local Ray cluster, the CPU vLLM engine) with
  its ``ray::VLLMEngine`` worker process SIGKILLed while it generates: the run completes and every
  sample is there exactly once (slow).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pytest

from distillery.engine import MAX_RESTARTS, EnginePool, SamplingSettings
from distillery.stages.synthesize import samples_from_results
from schemas.recipe import EngineConfig
from tests.procs import wait_for_event_or_exit

ROOT = Path(__file__).resolve().parents[2]
SAMPLING = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=8)


class DiesOnPoison:
    """Stands in for ``VLLMEngine`` (same constructor and methods): echoes each request, and its
    process exits at once on a request that says "poison", as a crashing engine's would."""

    def __init__(self, model_path, engine, seed=0) -> None:
        self.pid = os.getpid()

    def render(self, messages):
        return messages[0]["content"]

    def generate(self, requests, sampling):
        if any("poison" in r["messages"][0]["content"] for r in requests):
            os._exit(1)
        return [
            {"completion": f"echo {r['messages'][0]['content']} #### 1", "finish_reason": "stop", "num_tokens": 3, "prompt_tokens": 1, "error": None, "prompt": r["messages"][0]["content"]}
            for r in requests
        ]

    def pid_now(self):
        return os.getpid()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _requests(contents):
    return [{"messages": [{"role": "user", "content": c}], "sampling_seed": i, "seed_id": f"s{i}", "sample_index": 0} for i, c in enumerate(contents)]


def test_a_request_that_keeps_killing_the_engine_becomes_a_reject(local_ray):
    """A batch with a poison request: the actor dies on every attempt, the batch is split, the
    other requests come back, the poison one is an error result, and samples_from_results
    quarantines it as ``generation_error`` with the error; the engine serves the next batch."""
    pool = EnginePool("unused", EngineConfig(), engine_cls=DiesOnPoison)
    try:
        contents = ["q0", "q1", "poison q2", "q3", "q4"]
        requests = _requests(contents)
        results = pool.generate(0, requests, SAMPLING)
        assert [r["completion"] for r in results] == ["echo q0 #### 1", "echo q1 #### 1", None, "echo q3 #### 1", "echo q4 #### 1"]
        assert results[2]["finish_reason"] == "error"
        assert "the engine died on this request" in results[2]["error"] and "Actor" in results[2]["error"]
        # 2 whole-batch attempts die; halves: [q0 q1] ok, [poison q2 q3 q4] dies; its halves:
        # [poison q2] dies (one attempt: an error result), [q3 q4] ok
        assert pool.actor_failures == 4
        assert pool.replaced == [1]  # 4 deaths > MAX_RESTARTS: the pool started a new actor
        assert MAX_RESTARTS == 3

        seeds = pl.DataFrame({"seed_id": [f"s{i}" for i in range(5)], "question": contents, "reference_answer": ["1"] * 5, "source": ["t"] * 5})
        stage = samples_from_results(seeds, requests, results, samples_per_problem=1, lineage={"model": "m"})
        assert stage.count.rows_in == 5 and stage.count.rows_out == 4 and stage.count.dropped == {"generation_error": 1}
        reject = stage.rejects.row(0, named=True)
        assert reject["seed_id"] == "s2" and reject["reason"] == "generation_error" and "engine died" in reject["detail"]

        again = pool.generate(1, _requests(["q5"]), SAMPLING)  # the replacement serves later shards
        assert again[0]["completion"] == "echo q5 #### 1"
    finally:
        pool.shutdown()


def test_a_batch_whose_engine_was_killed_once_is_resubmitted_whole(local_ray):
    """SIGKILL the actor's process between batches: Ray restarts it (a new process) and the next
    batch is answered in full, nothing lost and no error result."""
    pool = EnginePool("unused", EngineConfig(), engine_cls=DiesOnPoison)
    try:
        pool.start()
        first_pid = local_ray.get(pool.actors[0].pid_now.remote())
        results = {}

        def run_batch():
            results["out"] = pool.generate(0, _requests(["a", "b", "c"]), SAMPLING)

        os.kill(first_pid, signal.SIGKILL)
        worker = threading.Thread(target=run_batch)
        worker.start()
        worker.join(120)
        assert not worker.is_alive()
        assert [r["completion"] for r in results["out"]] == ["echo a #### 1", "echo b #### 1", "echo c #### 1"]
        assert all(r["error"] is None for r in results["out"])
        assert local_ray.get(pool.actors[0].pid_now.remote()) != first_pid
        assert pool.replaced == [0]
    finally:
        pool.shutdown()


# ---- the real flow, with the real vLLM actor killed mid-batch ------------------------------

# 16 problems in 8 shards of 2, all in the engine's batch at once (continuous batching): the kill
# comes when a progress line (every 1 s here) says the engine holds requests and not all are done,
# so it lands while the engine holds them, from several shards.
PROBLEMS = 16
RECIPE = f"""
name: actor-failure
seeds:
  builtin: {{kind: one-step, count: {PROBLEMS}, seed: 0}}
  fields: {{question: question, answer: answer, id: id}}
model: {{path: embedded}}
generation: {{samples_per_problem: 2, max_tokens: 128, shard_size: 2, cache: false}}
verify: {{keep: all}}
quality: {{require_final_answer: false}}
"""


def _engine_processes(root_pid: int):
    """The ``ray::VLLMEngine`` worker processes under ``root_pid`` (this run's own cluster only:
    other people's Ray clusters on this machine are not its descendants)."""
    import psutil

    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::VLLMEngine"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _wait_until_busy(actor, timeout: float = 60.0) -> None:
    """Return once the actor's process tree (vLLM's engine core and worker) is computing."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [actor, *actor.children(recursive=True)]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.3)
        busy = 0.0
        for p in procs:
            try:
                busy += p.cpu_percent(None)
            except psutil.Error:
                pass
        if busy > 50:
            return
    raise AssertionError("the engine never got busy")


@pytest.mark.slow
def test_run_completes_when_the_vllm_actor_is_killed_mid_batch(tmp_path, shared_prefect):
    import psutil

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    store = tmp_path / "store"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DISTILLERY_PROGRESS_EVERY_S": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "distillery.cli", "run", str(recipe), "--store", str(store)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    in_engine = threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            progress = re.search(r"generation: (\d+)/(\d+) requests \(\d+%\), (\d+) in the engines", line)
            if progress and int(progress[1]) < int(progress[2]) and int(progress[3]) > 0:
                in_engine.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    killed, engine_core = [], []
    try:
        # The engine holds requests (the progress line counts them) and not all are done: kill it
        # once it computes. (Waiting for the first finished request instead left, on a busy
        # machine, too little time before the last one: the kill then came after the batch.)
        wait_for_event_or_exit(proc, in_engine, 600, "no progress line with requests in the engine", lambda: "".join(stderr[-60:]))
        victims = _engine_processes(proc.pid)
        assert len(victims) == 1, victims
        engine_core = victims[0].children(recursive=True)
        _wait_until_busy(victims[0])  # a batch is being generated: its engine processes use CPU
        victims[0].send_signal(signal.SIGKILL)
        killed.append(victims[0].pid)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in engine_core:  # the dead actor's vLLM engine core, should it outlive it
            if child.is_running():
                child.kill()
    reader.join(10)
    log = "".join(stderr)
    assert proc.returncode == 0, log[-4000:]
    assert killed
    assert re.search(r"engine 0 died during a batch of \d+ requests \(attempt 1 of 2\)", log), "the kill hit no batch:\n" + log[-4000:]
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE

    uri = Path(stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())
    stages = {s["stage"]: s for s in manifest["counts"]["stages"]}
    for s in manifest["counts"]["stages"]:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    synth = stages["synthesize"]
    assert (synth["rows_in"], synth["fanout"]) == (PROBLEMS, 2)
    assert "generation_error" not in synth["dropped"]  # the batch the kill hit was generated again
    assert manifest["stats"]["samples_generated"] == 2 * PROBLEMS - synth["dropped"].get("empty_completion", 0)
    assert manifest["stats"]["engine_failures"] >= 1  # the manifest says a batch was resubmitted

    # Every sample once: published rows plus the samples dropped after generation are PROBLEMS x 2 ids.
    data = pl.read_parquet(uri / "data")
    rejects = pl.read_parquet(uri / "rejects").filter(pl.col("stage") != "ingest")
    ids = data.select("seed_id", "sample_index").rows() + [
        (r["seed_id"], json.loads(r["record"])["sample_index"]) for r in rejects.iter_rows(named=True)
    ]
    assert len(ids) == len(set(ids)) == 2 * PROBLEMS
    assert {i for _, i in ids} == {0, 1} and len({s for s, _ in ids}) == PROBLEMS
