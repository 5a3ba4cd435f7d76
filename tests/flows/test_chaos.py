"""Chaos: SIGKILL a real run (the CLI, with the real vLLM engine on Ray) during generation, during
dedup and during publish; rerun it; the published rows are identical to an uninterrupted run's,
nothing lost and nothing twice, and no crash ever leaves a version visible.

The kill comes from ``DISTILLERY_KILL_AT`` (``distillery/faults.py``): a real SIGKILL of the run's
process at a named point, so that each crash lands in the same place every time. Everything else
the run started (Ray, the engine's processes) is then killed too, as when a machine is lost.
Slow (about five minutes): the reference run and the rerun after the generation crash generate.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import psutil
import pytest

from distillery.store import Store

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]  # the runs report to one prefect server
# 6 problems x 2 samples in 3 shards of 2 problems; keep every sample so the comparison has rows
SETS = [
    "seeds.builtin.count=6",
    "generation.samples_per_problem=2",
    "generation.shard_size=2",
    "generation.max_tokens=48",
    "verify.keep=all",
    "quality.drop_truncated=false",
    "quality.require_final_answer=false",
    # one shard at a time per engine: vLLM's text depends on the batch a request ran in, so only
    # then does a rerun give the uninterrupted run's text bit for bit (continuous batching gives
    # each sample once, but not the same text as another run)
    "engine.continuous_batching=false",
]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the run's session (Ray's workers set their own process groups)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (OSError, psutil.Error):
            pass


def _run(tmp: Path, store: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/default.yaml", "--store", str(store)]
    for s in SETS:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "HF_HUB_OFFLINE": "1"}
    env.pop("DISTILLERY_KILL_AT", None)
    if kill_at:
        env["DISTILLERY_KILL_AT"] = kill_at
    # Output goes to files, not pipes: processes the run started could hold a pipe open after it dies.
    with open(tmp / "stdout.txt", "w+") as out, open(tmp / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env=env, start_new_session=True)
        try:
            proc.wait(timeout=900)
        finally:
            _kill_session(proc.pid)  # the rest of the job dies with it (Ray's processes, the engine core)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def _published(result: subprocess.CompletedProcess) -> tuple[dict, pl.DataFrame]:
    assert result.returncode == 0, result.stderr[-4000:]
    uri = Path(result.stdout.strip().splitlines()[-1])
    return json.loads((uri / "manifest.json").read_text()), pl.read_parquet(uri / "data").sort("sample_id")


def _crash(tmp: Path, store: Path, point: str) -> None:
    before = Store(str(store)).versions("arithmetic-cot") if (store / "arithmetic-cot").exists() else []
    killed = _run(tmp, store, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"{point}: the run was not killed ({killed.returncode}): {killed.stderr[-2000:]}"
    assert Store(str(store)).versions("arithmetic-cot") == before  # nothing half-visible


def test_a_killed_run_reruns_to_the_same_rows(tmp_path):
    reference, expected = _published(_run(tmp_path, tmp_path / "reference"))
    assert expected.height > 0 and expected["sample_id"].is_unique().all()
    expected_counts = reference["counts"]

    store = tmp_path / "store"
    # 1. during generation: after the 2nd of 3 shards is generated and cached
    _crash(tmp_path, store, "synthesize-shard:2")
    cached = list((store / "_cache" / "generation").rglob("*.json"))
    assert 4 <= len(cached) < 12  # the finished shards' samples were kept; the rest were not drawn
    manifest, rows = _published(_run(tmp_path, store))
    assert rows.equals(expected)  # identical: nothing lost, nothing twice
    assert manifest["counts"] == expected_counts
    cache = manifest["stats"]["generation_cache"]
    assert cache["hits"] >= 4 and cache["hits"] + cache["misses"] == 12  # finished shards were not generated again

    # 2. during dedup (generation is all cached now: the rerun starts no engine)
    _crash(tmp_path, store, "dedup")
    manifest, rows = _published(_run(tmp_path, store))
    assert rows.equals(expected) and manifest["counts"] == expected_counts

    # 3. during publish: data, rejects, plots and card written, the manifest not
    _crash(tmp_path, store, "publish")
    versions = Store(str(store)).versions("arithmetic-cot")
    orphan = sorted(p.name for p in (store / "arithmetic-cot").iterdir() if p.name not in versions and p.name.startswith("v"))
    assert orphan and list((store / "arithmetic-cot" / orphan[-1] / "data").glob("*.parquet"))  # written, yet invisible
    manifest, rows = _published(_run(tmp_path, store))
    assert rows.equals(expected) and manifest["counts"] == expected_counts
    listed = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "datasets", "list", "--store", str(store)], capture_output=True, text=True, cwd=ROOT
    )
    assert orphan[-1] not in listed.stdout
