"""The served backend against ``vllm serve`` driven directly, side by side in one run.

    .venv/bin/python bench/served.py [--requests 512] [--concurrency 64] [--rounds 1] [--out bench/results/served.json]
    make bench-served

One ``vllm serve`` of the embedded model on 127.0.0.1 (``distillery.served.start_server``: the
CPU settings the run's own engines use) gets the same requests as ``make bench-generation``
(bench/generation.py ``workload``: one-step sums, word problems and long stories, ``max_tokens``
32/128/256, the same seeds), the same request bodies, at the same concurrency:

- ``bare server``: a pool of ``--concurrency`` threads posting the bodies with one httpx client;
- ``pipeline``: what a run with ``model.backend: openai`` does (``distillery.served.ServedModel``,
  ``model.max_concurrency`` = ``--concurrency``, the cache off): the requests in shards of 64,
  every shard at once (``distillery.engine.in_shards``), retries and usage accounting included.

Prints a table and writes JSON with ``endpoint_over_bare_server`` (the ratio of output tokens/s, from
the server's own usage counts). ``--rounds`` alternates the two and keeps each one's best.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import workload  # noqa: E402  (bench/generation.py: the same requests)

from distillery.engine import in_shards  # noqa: E402
from distillery.model_setup import resolve_model_path  # noqa: E402
from distillery.served import ServedModel, kill_server, start_server  # noqa: E402
from schemas.recipe import ModelConfig  # noqa: E402

SHARD = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int]:
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:

        def post(body: dict) -> int:
            response = client.post(f"{url}/chat/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            tokens = sum(pool.map(post, bodies))
    return time.perf_counter() - started, tokens


def pipeline(served: ServedModel, requests: list[dict], sampling: list) -> tuple[float, int]:
    groups: dict = {}
    for r, s in zip(requests, sampling, strict=True):
        groups.setdefault(s, []).append(r)
    started = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as threads:
        parts = list(threads.map(lambda s: in_shards(served, groups[s], s, SHARD), groups))
    seconds = time.perf_counter() - started
    results = [r for part in parts for r in part]
    if errors := [r["error"] for r in results if r["error"]]:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return seconds, sum(r["num_tokens"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (model.max_concurrency)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "served.json"))
    args = parser.parse_args()

    requests, sampling = workload(args.requests)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cfg = ModelConfig(backend="openai", base_url=url, name="embedded", max_concurrency=args.concurrency, max_retries=0)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(resolve_model_path("embedded"), port, Path(tmp) / "server.log", timeout_s=600)
        served = ServedModel(cfg)
        try:
            bodies = [served.body(r, s) for r, s in zip(requests, sampling, strict=True)]
            bare(url, bodies[:4], 4)  # warm-up
            best: dict[str, tuple[float, int]] = {}
            for _ in range(args.rounds):
                for name, arm in (("bare server", lambda: bare(url, bodies, args.concurrency)), ("pipeline", lambda: pipeline(served, requests, sampling))):
                    seconds, tokens = arm()
                    if name not in best or tokens / seconds > best[name][1] / best[name][0]:
                        best[name] = (seconds, tokens)
        finally:
            served.shutdown()
            kill_server(server)

    rate = {name: tokens / seconds for name, (seconds, tokens) in best.items()}
    ratio = rate["pipeline"] / rate["bare server"]
    print(f"\n{'client of vllm serve':62} {'seconds':>8} {'output tokens':>14} {'tok/s':>7} {'ratio':>6}")
    for name, label in (("bare server", f"bare server (httpx, {args.concurrency} threads)"), ("pipeline", f"pipeline (ServedModel, max_concurrency {args.concurrency})")):
        seconds, tokens = best[name]
        print(f"{label:62} {seconds:>8.1f} {tokens:>14,} {rate[name]:>7.1f} {rate[name] / rate['bare server']:>6.2f}")
    result = {
        "requests": len(requests),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "bare_server": {"seconds": round(best["bare server"][0], 2), "output_tokens": best["bare server"][1], "tokens_per_s": round(rate["bare server"], 1)},
        "pipeline": {"seconds": round(best["pipeline"][0], 2), "output_tokens": best["pipeline"][1], "tokens_per_s": round(rate["pipeline"], 1)},
        "endpoint_over_bare_server": round(ratio, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
