"""Parse failures with and without constrained decoding, on the real engine, side by side.

    .venv/bin/python bench/structured_output.py [--problems 64] [--out bench/results/structured_output.json]
    make bench-structured

Where the pipeline parses a model's output, structured output (vLLM's ``StructuredOutputsParams``;
``response_format``/``structured_outputs`` on an endpoint) can make the parse unable to fail:

- the judge (``score.judge``): ``Score: N`` read from its reply (``parse_judge_score``); a reply
  without one is a ``judge_unparseable`` reject. Measured with the default response prefix
  ("Score:") and with none (the judge writes freely), over GSM8K test problems, each with its
  reference solution (right) and the same solution with a wrong final answer;
- GLAN's syllabus (``glan``): ``sessions`` numbered lines read from it (``parse_syllabus``); a
  session missing from the list is an ``short_syllabus`` reject. Over the subjects of
  ``recipes/taxonomies/arithmetic.yaml``, a few seeds each.

Each case runs the same requests (same seeds) unconstrained and constrained, through the stage
functions a run uses. Prints a table and writes JSON with the failures before and after.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import polars as pl

from distillery.engine import SamplingSettings, VLLMEngine
from distillery.model_setup import resolve_model_path
from distillery.stages.glan import ingest_taxonomy, syllabus, syllabus_constraint, syllabus_requests
from distillery.stages.score import judge_constraint, judge_requests, with_judge_scores
from schemas.recipe import EngineConfig, GlanConfig

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
TAXONOMY = ROOT / "recipes" / "taxonomies" / "arithmetic.yaml"


def judged_rows(problems: int) -> pl.DataFrame:
    """Each problem twice: its reference solution, and the same with the final answer off by one."""
    rows = []
    for i, line in enumerate(GSM8K.read_text().splitlines()[:problems]):
        item = json.loads(line)
        work, _, answer = item["answer"].rpartition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()
        answer = answer.strip().replace(",", "")
        wrong = str(int(answer) + 1) if answer.lstrip("-").isdigit() else answer + "1"
        for k, final in enumerate((answer, wrong)):
            rows.append({"sample_id": f"g{i}.{k}", "question": item["question"], "completion": f"{work}\nThe answer is {final}."})
    return pl.DataFrame(rows)


def judge_case(engine: VLLMEngine, rows: pl.DataFrame, prefix: str, constrained: bool) -> dict:
    requests = judge_requests(rows, seed=0, response_prefix=prefix)
    sampling = SamplingSettings(0.0, 1.0, 64, judge_constraint(prefix) if constrained else None)
    started = time.perf_counter()
    results = engine.generate(requests, sampling)
    seconds = time.perf_counter() - started
    scored = with_judge_scores(rows, results, response_prefix=prefix)
    failures = scored.count.dropped.get("judge_unparseable", 0)
    right = scored.kept.filter(pl.col("sample_id").str.ends_with(".0"))["judge_score"].mean()
    wrong = scored.kept.filter(pl.col("sample_id").str.ends_with(".1"))["judge_score"].mean()
    return {"outputs": rows.height, "failures": failures, "seconds": round(seconds, 1), "mean_score_right": right, "mean_score_wrong": wrong}


def syllabus_case(engine: VLLMEngine, seeds: int, constrained: bool) -> dict:
    subjects = ingest_taxonomy(str(TAXONOMY)).kept
    cfg = GlanConfig(taxonomy=str(TAXONOMY))
    requests = [r for s in range(seeds) for r in syllabus_requests(subjects, cfg, run_seed=s)]
    sampling = SamplingSettings(cfg.temperature, cfg.top_p, cfg.syllabus_max_tokens, syllabus_constraint(cfg.sessions) if constrained else None)
    started = time.perf_counter()
    results = engine.generate(requests, sampling)
    seconds = time.perf_counter() - started
    outlined = syllabus(pl.concat([subjects] * seeds), requests, results, cfg)
    return {"outputs": len(requests) * cfg.sessions, "failures": outlined.count.dropped.get("short_syllabus", 0), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64, help="GSM8K test problems judged (twice each: right and wrong)")
    parser.add_argument("--syllabus-seeds", type=int, default=4, help="syllabi per taxonomy subject")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "structured_output.json"))
    args = parser.parse_args()

    rows = judged_rows(args.problems)
    cases: dict[str, dict] = {}
    with VLLMEngine(str(resolve_model_path("embedded")), EngineConfig(max_model_len=2048)) as engine:
        for prefix, name in (("Score:", "judge, response prefix 'Score:'"), ("", "judge, no response prefix")):
            cases[name] = {"before": judge_case(engine, rows, prefix, False), "after": judge_case(engine, rows, prefix, True), "reject": "judge_unparseable"}
        cases["GLAN syllabus sessions"] = {
            "before": syllabus_case(engine, args.syllabus_seeds, False),
            "after": syllabus_case(engine, args.syllabus_seeds, True),
            "reject": "short_syllabus",
        }
        dtype = engine.dtype

    print(f"\n{'case':36} {'outputs':>8} {'failures before':>16} {'after':>6} {'s before':>9} {'s after':>8}")
    for name, c in cases.items():
        b, a = c["before"], c["after"]
        print(f"{name:36} {b['outputs']:>8} {b['failures']:>16} {a['failures']:>6} {b['seconds']:>9} {a['seconds']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "embedded (SmolLM2-135M-Instruct)", "dtype": dtype, "cases": cases}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
