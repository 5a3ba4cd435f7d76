"""The CPU engine's dtype and threads, side by side in one run: output tokens/s of the embedded
model on vLLM's CPU build for bfloat16 and float32, with one and two OpenMP threads.

    .venv/bin/python bench/cpu_engine.py [--requests 32] [--max-tokens 128] [--out bench/results/cpu_engine.json]
    make bench-cpu

The requests are the default recipe's (recipes/default.yaml: its built-in problems, prompt and
sampling seeds), ``--requests`` of them in one batch, at most ``--max-tokens`` tokens each. Each
setting runs in a fresh process (vLLM reads its thread settings at start-up) with
``OMP_NUM_THREADS=1``, as a Ray actor with ``num_cpus: 1`` has it. Thread settings:

- ``1 thread``: vLLM's default binding (``VLLM_CPU_OMP_THREADS_BIND=auto``), which keeps one core
  per worker for the engine-core process (``VLLM_CPU_NUM_OF_RESERVED_CPU=1``): on 2 cores, 1 thread.
- ``all cores, bound``: the same binding with no core kept back (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``).
- ``all cores, unbound``: ``VLLM_CPU_OMP_THREADS_BIND=nobind`` and ``OMP_NUM_THREADS`` = cores.
- ``all cores, unbound, engine core apart``: the same, with vLLM's engine core in a process of its
  own (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, vLLM's default) instead of in the engine's process
  (what ``distillery.engine.apply_cpu_settings`` sets, as in every other row).

Prints a table with each setting's tokens/s as a ratio to the slowest and says what
``engine.dtype: auto`` resolves to on this CPU (and why). The machine is shared and noisy:
compare the ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = {
    "1 thread": {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"},
    "all cores, bound": {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "all cores, unbound": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(os.cpu_count() or 1)},
    "all cores, unbound, engine core apart": {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    },
}
DTYPES = ("bfloat16", "float32")


def one(dtype: str, n: int, max_tokens: int) -> dict:
    """Runs in the child: start an engine, generate the requests once, report."""
    from distillery.engine import SamplingSettings, VLLMEngine
    from distillery.model_setup import resolve_model_path
    from schemas.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    requests = default_requests(recipe, n)
    started = time.perf_counter()
    engine = VLLMEngine(str(resolve_model_path("embedded")), recipe.engine.model_copy(update={"dtype": dtype}))
    load_s = time.perf_counter() - started
    g = recipe.generation
    sampling = SamplingSettings(g.temperature, g.top_p, max_tokens)
    engine.generate(requests[:2], SamplingSettings(g.temperature, g.top_p, 8))  # warm-up
    t0 = time.perf_counter()
    results = engine.generate(requests, sampling)
    seconds = time.perf_counter() - t0
    engine.close()
    tokens = sum(r["num_tokens"] for r in results)
    return {"load_s": round(load_s, 1), "seconds": round(seconds, 2), "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "errors": sum(r["error"] is not None for r in results)}


def default_requests(recipe, n: int) -> list[dict]:
    """The default recipe's first ``n`` sampling requests, as its run builds them (problem by
    problem, ``samples_per_problem`` each)."""
    from distillery.stages.ingest import ingest_seeds
    from distillery.stages.synthesize import build_requests

    return build_requests(ingest_seeds(recipe.seeds).kept, recipe.generation)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="run every setting this often, interleaved; the table shows the median")
    parser.add_argument("--out", default="bench/results/cpu_engine.json")
    parser.add_argument("--child", nargs=1, metavar="DTYPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one(args.child[0], args.requests, args.max_tokens)), flush=True)
        return

    from distillery.hardware import cpu_flags, native_bf16, resolve_dtype

    flags = cpu_flags()
    auto, why = resolve_dtype("auto", gpu=False)
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_no, (threads, env_extra), dtype in itertools.product(range(args.rounds), THREADS.items(), DTYPES):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env.update(env_extra)
        cmd = [sys.executable, __file__, "--child", dtype, "--requests", str(args.requests), "--max-tokens", str(args.max_tokens)]
        print(f"round {round_no + 1}: {dtype}, {threads} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{dtype}, {threads}: the child failed (exit {proc.returncode})")
        runs.setdefault((dtype, threads), []).append(json.loads(line.removeprefix("RESULT ")))
    rows = []
    for (dtype, threads), results in runs.items():
        speeds = sorted(r["tokens_per_s"] for r in results)
        median = speeds[len(speeds) // 2] if len(speeds) % 2 else round((speeds[len(speeds) // 2 - 1] + speeds[len(speeds) // 2]) / 2, 1)
        best = max(results, key=lambda r: r["tokens_per_s"])
        rows.append({"dtype": dtype, "threads": threads, "env": THREADS[threads], **best, "tokens_per_s": median, "tokens_per_s_runs": [r["tokens_per_s"] for r in results]})
    slowest = min(r["tokens_per_s"] for r in rows)
    for r in rows:
        r["ratio_to_slowest"] = round(r["tokens_per_s"] / slowest, 2)
    flag = native_bf16(flags)
    print(f"CPU: {os.cpu_count()} cores; native bf16 flag: {flag or 'none'}; AVX-512F: {'avx512f' in flags}; AVX2: {'avx2' in flags}")
    print(f"engine.dtype: auto -> {auto} ({why})")
    print(f"{args.requests} requests of the default recipe, at most {args.max_tokens} tokens each, one batch")
    print(f"{'dtype':<9} {'threads':<38} {'tokens':>7} {'tok/s (median)':>15} {'x slowest':>10}  runs")
    for r in rows:
        print(f"{r['dtype']:<9} {r['threads']:<38} {r['output_tokens']:>7} {r['tokens_per_s']:>15} {r['ratio_to_slowest']:>10}  {r['tokens_per_s_runs']}")
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "cores": os.cpu_count(),
        "native_bf16_flag": flag,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "auto_dtype": auto,
        "auto_reason": why,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
