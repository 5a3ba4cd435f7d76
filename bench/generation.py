"""The pipeline's generation against bare vLLM, side by side in one run, as a ratio of output tokens/s.

    .venv/bin/python bench/generation.py [--requests 512] [--shard-size 16] [--rounds 1] [--out bench/results/generation.json]
    make bench-generation

The same ``--requests`` requests, whose completion lengths vary widely (one-step sums the model
answers in a line, multi-step word problems, and requests for a long story; ``max_tokens`` of
32, 128 and 256 in turn), with the same seeds, model, dtype and engine settings, go through:

- ``bare vLLM``: ``LLM.generate`` given all of them in one call (vLLM's own continuous batching);
- ``pipeline``: what a run does (``distillery.engine.EnginePool`` on a local Ray cluster, one
  ``VLLMEngine`` actor, the generation cache off): the requests in shards of ``--shard-size``
  problems x 4 samples, every shard submitted at once (``distillery.engine.in_shards``), one
  ``generate`` call per shard, the shards sharing the engine's batch (``engine.continuous_batching``);
- ``pipeline, one shard at a time``: the same with ``engine.continuous_batching: false``, which is
  how every shard ran before (an engine drained each shard to its slowest completion).

Times are generation only (the engines started first, a warm-up request each). Prints a table and
writes JSON with ``pipeline_over_bare_vllm`` (the ratio of output tokens/s) and
``one_shard_at_a_time_over_bare_vllm``. The machine is shared and noisy: ``--rounds`` alternates the
three and keeps each one's best; compare the ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distillery.engine import EnginePool, SamplingSettings, VLLMEngine, in_shards, resolve_engine_dtype, start_ray
from distillery.model_setup import resolve_model_path
from distillery.stages.builtin_seeds import arithmetic_problems
from distillery.stages.synthesize import build_messages, sampling_seed
from schemas.recipe import EngineConfig, GenerationConfig

MAX_TOKENS = (32, 128, 256)
SAMPLES = 4
STORY = "Write a long, detailed story about {name} and a journey across the sea, at least five paragraphs."


def workload(n: int) -> tuple[list[dict], list[SamplingSettings]]:
    """``n`` requests (problems x 4 samples) and one sampling setting per request, lengths mixed."""
    cfg = GenerationConfig()
    problems = n // SAMPLES
    one_step = list(arithmetic_problems(problems, seed=1, kind="one-step"))
    word = list(arithmetic_problems(problems, seed=2))
    requests, sampling = [], []
    for i in range(problems):
        kind = i % 3
        question = one_step[i]["question"] if kind == 0 else word[i]["question"] if kind == 1 else STORY.format(name=f"sailor {i}")
        for k in range(SAMPLES):
            requests.append({"messages": build_messages(question, cfg), "sampling_seed": sampling_seed(0, f"q{i}", k), "seed_id": f"q{i}", "sample_index": k})
            sampling.append(SamplingSettings(0.8, 0.95, MAX_TOKENS[(i // 3) % len(MAX_TOKENS)]))
    return requests, sampling


def bare(engine: VLLMEngine, requests: list[dict], sampling: list[SamplingSettings]) -> tuple[float, int]:
    from vllm import SamplingParams

    prompts = [engine.render(r["messages"]) for r in requests]
    params = [SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=r["sampling_seed"]) for r, s in zip(requests, sampling, strict=True)]
    started = time.perf_counter()
    outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, sum(len(o.outputs[0].token_ids) for o in outputs)


def pipeline(pool: EnginePool, requests: list[dict], sampling: list[SamplingSettings], shard_requests: int) -> tuple[float, int]:
    """The requests of each sampling setting in shards, all settings' shards at once."""
    groups: dict[SamplingSettings, list[dict]] = {}
    for r, s in zip(requests, sampling, strict=True):
        groups.setdefault(s, []).append(r)
    started = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as threads:
        results = list(threads.map(lambda s: in_shards(pool, groups[s], s, shard_requests), groups))
    seconds = time.perf_counter() - started
    return seconds, sum(r["num_tokens"] for part in results for r in part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=16, help="problems per shard (x 4 samples: requests per generate call)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="bench/results/generation.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = str(resolve_model_path("embedded"))
    engine_cfg = EngineConfig()
    requests, sampling = workload(args.requests)
    shard_requests = args.shard_size * SAMPLES

    start_ray()
    pools = {
        "pipeline": EnginePool(model, engine_cfg),
        "pipeline, one shard at a time": EnginePool(model, engine_cfg.model_copy(update={"continuous_batching": False})),
    }
    best: dict[str, tuple[float, int]] = {}
    for _ in range(args.rounds):
        # bare vLLM in this process, then each pipeline's actor: one engine generates at a time
        engine = VLLMEngine(model, engine_cfg)
        engine.generate(requests[:1], sampling[0])  # warm-up
        seconds, tokens = bare(engine, requests, sampling)
        engine.close()
        del engine
        runs = {"bare vLLM": (seconds, tokens)}
        for name, pool in pools.items():
            pool.start()
            pool.generate(0, requests[:1], sampling[0])  # warm-up
            runs[name] = pipeline(pool, requests, sampling, shard_requests)
            pool.shutdown()
        for name, (seconds, tokens) in runs.items():
            if name not in best or tokens / seconds > best[name][1] / best[name][0]:
                best[name] = (seconds, tokens)

    rows = [{"path": name, "seconds": round(s, 2), "output_tokens": t, "tokens_per_s": round(t / s, 1)} for name, (s, t) in best.items()]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["over_bare_vllm"] = round(r["tokens_per_s"] / base, 3)
    lengths = sorted({s.max_tokens for s in sampling})
    dtype = resolve_engine_dtype(engine_cfg, model)[0]
    print(f"{len(requests)} requests, max_tokens {lengths}, shards of {shard_requests} requests, dtype {dtype}, cores {os.cpu_count()}, best of {args.rounds} round(s)")
    print(f"{'path':32} {'seconds':>8} {'out tokens':>11} {'tok/s':>8} {'x bare':>7}")
    for r in rows:
        print(f"{r['path']:32} {r['seconds']:>8} {r['output_tokens']:>11} {r['tokens_per_s']:>8} {r['over_bare_vllm']:>7}")
    result = {
        "requests": len(requests), "max_tokens": lengths, "shard_requests": shard_requests, "rounds": args.rounds, "cores": os.cpu_count(), "dtype": dtype,
        "rows": rows,
        "pipeline_over_bare_vllm": rows[1]["over_bare_vllm"],
        "one_shard_at_a_time_over_bare_vllm": rows[2]["over_bare_vllm"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
