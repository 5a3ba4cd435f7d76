"""``model.backend: openai`` end to end (slow): the real ``distillery run`` against a real
``vllm serve`` of the embedded model on 127.0.0.1 (the CPU build's OpenAI-compatible server),
killed with SIGKILL mid-run and started again on the same port. The run waits it out (retries
with backoff), completes, and publishes every sample exactly once with the endpoint's token
usage; a second run is answered from the generation cache, keyed by the served model.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from distillery.served import kill_server, start_server
from tests.procs import wait_for_event_or_exit

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]
PROBLEMS, SAMPLES = 8, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(store: Path, port: int, tmp: Path, stderr_lines: list[str], seen: threading.Event | None = None) -> subprocess.Popen:
    sets = [
        # 30 retries (backoff to 30 s: about 13 min): a restart of vllm serve takes minutes on a busy machine
        "model.backend=openai", f"model.base_url=http://127.0.0.1:{port}/v1", "model.name=embedded", "model.max_concurrency=8", "model.max_retries=30",
        f"seeds.builtin.count={PROBLEMS}", f"generation.samples_per_problem={SAMPLES}", "generation.max_tokens=96",
        "generation.shard_size=2", "verify.keep=all", "quality.require_final_answer=false", "quality.drop_truncated=false",
    ]
    cmd = [sys.executable, "-m", "distillery.cli", "run", "recipes/default.yaml", "--store", str(store)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "DISTILLERY_PROGRESS_EVERY_S": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read():
        for line in proc.stderr:
            stderr_lines.append(line)
            progress = re.search(r"generation: (\d+)/(\d+) requests", line)
            if seen is not None and progress and 0 < int(progress[1]) < int(progress[2]):
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return proc


def test_a_run_against_vllm_serve_survives_the_server_being_killed(embedded_model, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    server = start_server(embedded_model, port, log, uniproc=True)
    store = tmp_path / "store"
    lines: list[str] = []
    some_done = threading.Event()
    try:
        run = _run(store, port, tmp_path, lines, some_done)
        wait_for_event_or_exit(run, some_done, 600, "no progress line with some but not all requests done", lambda: "".join(lines[-40:]))
        kill_server(server)  # mid-run: the requests in flight fail, the next ones are refused
        time.sleep(3)
        server = start_server(embedded_model, port, log, uniproc=True)  # the same endpoint again
        stdout, _ = run.communicate(timeout=900)
    finally:
        kill_server(server)
    log_text = "".join(lines)
    assert run.returncode == 0, log_text[-4000:]
    assert re.search(r"served model embedded: .*retrying in", log_text), "no request was retried:\n" + log_text[-3000:]

    uri = Path(stdout.strip().splitlines()[-1])
    manifest = json.loads((uri / "manifest.json").read_text())
    assert manifest["generator"]["engine"] == "openai-endpoint"
    assert manifest["generator"]["endpoint"]["name"] == "embedded" and manifest["generator"]["endpoint"]["root"] == str(embedded_model)
    synth = next(s for s in manifest["counts"]["stages"] if s["stage"] == "synthesize")
    assert "generation_error" not in synth["dropped"]  # every request got through in the end
    usage = manifest["stats"]["endpoint_usage"]
    assert usage["retries"] >= 1 and usage["errors"] == 0 and usage["done"] == PROBLEMS * SAMPLES
    data = pl.read_parquet(uri / "data")
    assert usage["prompt_tokens"] > 0 and usage["tokens"] == data["num_tokens"].sum() + sum(
        json.loads(r)["num_tokens"] for r in pl.read_parquet(uri / "rejects").filter(pl.col("stage") != "ingest")["record"]
    )  # the endpoint's usage is each sample's num_tokens
    rejects = pl.read_parquet(uri / "rejects").filter(pl.col("stage") != "ingest")
    ids = data.select("seed_id", "sample_index").rows() + [(r["seed_id"], json.loads(r["record"])["sample_index"]) for r in rejects.iter_rows(named=True)]
    assert len(ids) == len(set(ids)) == PROBLEMS * SAMPLES  # every sample once

    # the same run again: every request from the cache, keyed by the served model
    again_lines: list[str] = []
    again = _run(store, port, tmp_path, again_lines)
    stdout, _ = again.communicate(timeout=600)
    assert again.returncode == 0, "".join(again_lines)[-3000:]
    cache = json.loads((Path(stdout.strip().splitlines()[-1]) / "manifest.json").read_text())["stats"]["generation_cache"]
    assert cache == {"hits": PROBLEMS * SAMPLES, "misses": 0}
