"""Generation throughput of the embedded model on vLLM, by batch size, side by side in one engine.

    .venv/bin/python bench/generation.py [--batches 8,32,128] [--max-tokens 128] [--out bench/results/generation.json]

Prints a table (samples/s, tokens/s, and each as a ratio to the smallest batch) and writes it
as JSON. One engine serves every batch size, so the ratios do not depend on start-up; the
machine is shared and noisy, so compare ratios within one run rather than absolute numbers
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from distillery.engine import SamplingSettings, VLLMEngine
from distillery.model_setup import resolve_model_path
from distillery.stages.builtin_seeds import arithmetic_problems
from distillery.stages.synthesize import build_messages, sampling_seed
from schemas.recipe import EngineConfig, GenerationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="8,32,128")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="bench/results/generation.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started = time.perf_counter()
    engine = VLLMEngine(str(resolve_model_path("embedded")), EngineConfig())
    load_seconds = time.perf_counter() - started
    cfg = GenerationConfig()
    sampling = SamplingSettings(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        problems = list(arithmetic_problems(batch, seed=batch))
        requests = [{"messages": build_messages(p["question"], cfg), "sampling_seed": sampling_seed(0, p["id"], 0)} for p in problems]
        t0 = time.perf_counter()
        results = engine.generate(requests, sampling)
        seconds = time.perf_counter() - t0
        tokens = sum(r["num_tokens"] for r in results)
        rows.append({"batch": batch, "seconds": round(seconds, 2), "samples_per_s": round(batch / seconds, 3), "tokens_per_s": round(tokens / seconds, 1), "errors": sum(r["error"] is not None for r in results)})
    base = rows[0]
    for r in rows:
        r["samples_per_s_ratio"] = round(r["samples_per_s"] / base["samples_per_s"], 2)
        r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)

    print(f"engine start-up: {load_seconds:.1f}s; max_tokens={args.max_tokens}; cores={os.cpu_count()}")
    print(f"{'batch':>6} {'seconds':>8} {'samples/s':>10} {'tokens/s':>9} {'x samples/s':>12} {'x tokens/s':>11} {'errors':>7}")
    for r in rows:
        print(f"{r['batch']:>6} {r['seconds']:>8} {r['samples_per_s']:>10} {r['tokens_per_s']:>9} {r['samples_per_s_ratio']:>12} {r['tokens_per_s_ratio']:>11} {r['errors']:>7}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine_startup_s": round(load_seconds, 1), "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
