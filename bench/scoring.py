"""Reward-model scoring in the pipeline against bare vLLM ``LLM.classify``, side by side in one run.

    .venv/bin/python bench/scoring.py [--rows 512] [--rounds 2] [--out bench/results/scoring.json]
    make bench-scoring

The same ``--rows`` (question, completion) pairs (GSM8K train problems with their reference
solutions: prompts of about 100 to 400 tokens) are scored by one reward model (a
sequence-classification head put on the embedded model, ``distillery.model_setup.make_classifier``;
the same folder, dtype and engine settings for both):

- ``bare vLLM``: ``LLM(runner="pooling").classify`` given all of them in one call, in this process;
- ``pipeline``: what a run's score stage does (``distillery.stages.score.Scorer`` with
  ``score.method: reward_model``): the ``PoolingRewardModel`` as a Ray actor on the local cluster,
  called per batch of ``BATCH`` rows.

Times are scoring only (each engine started first, with a warm-up call). Prints a table and writes
JSON with ``score_over_bare_vllm`` (the ratio of rows scored per second). ``--rounds`` alternates
the two and keeps each one's best: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import polars as pl

from distillery.engine import PoolingRewardModel
from distillery.model_setup import make_classifier, resolve_model_path
from distillery.stages.score import BATCH, Scorer
from schemas.recipe import EngineConfig, ScoreConfig

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def pairs(n: int) -> pl.DataFrame:
    rows = []
    for line in GSM8K.read_text().splitlines()[:n]:
        item = json.loads(line)
        work, _, answer = item["answer"].rpartition("####")
        rows.append({"question": item["question"], "completion": re.sub(r"<<[^>]*>>", "", work).strip() + f"\nThe answer is {answer.strip()}."})
    return pl.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring.json"))
    args = parser.parse_args()

    rows = pairs(args.rows)
    engine = EngineConfig(max_model_len=1024)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_classifier(resolve_model_path("embedded"), Path(tmp) / "rm", seed=0)
        bare = PoolingRewardModel(str(folder), engine)
        scorer = Scorer(ScoreConfig(method="reward_model", reward_model=str(folder)), engine)
        texts = [bare.render(q, c) for q, c in zip(rows["question"], rows["completion"], strict=True)]
        tokens = sum(len(bare.tokenizer(t)["input_ids"]) for t in texts)
        bare.llm.classify(texts[:4], use_tqdm=False)  # warm-up
        scorer(rows.head(4))  # starts the actor, warm-up
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            started = time.perf_counter()
            expected = [float(o.outputs.probs[-1]) for o in bare.llm.classify(texts, use_tqdm=False)]
            best["bare"] = min(best.get("bare", 1e9), time.perf_counter() - started)
            started = time.perf_counter()
            scored = scorer(rows)
            best["pipeline"] = min(best.get("pipeline", 1e9), time.perf_counter() - started)
        got = scored.kept["reward"].to_list()
        scorer.close()
        bare.close()
    worst = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    result = {
        "rows": rows.height,
        "prompt_tokens": tokens,
        "batch": BATCH,
        "dtype": bare.dtype,
        "rounds": args.rounds,
        "bare_vllm": {"seconds": round(best["bare"], 2), "rows_per_s": round(rows.height / best["bare"], 1), "tokens_per_s": round(tokens / best["bare"], 1)},
        "pipeline": {"seconds": round(best["pipeline"], 2), "rows_per_s": round(rows.height / best["pipeline"], 1), "tokens_per_s": round(tokens / best["pipeline"], 1)},
        "score_over_bare_vllm": round(best["bare"] / best["pipeline"], 3),
        "max_abs_reward_difference": worst,
    }
    print(f"\n{'scorer':58} {'seconds':>8} {'rows/s':>7} {'prompt tok/s':>13} {'ratio':>6}")
    print(f"{'bare vLLM (LLM.classify, all rows in one call)':58} {result['bare_vllm']['seconds']:>8} {result['bare_vllm']['rows_per_s']:>7} {result['bare_vllm']['tokens_per_s']:>13} {1.0:>6.2f}")
    print(f"{f'pipeline (Scorer: Ray actor, batches of {BATCH})':58} {result['pipeline']['seconds']:>8} {result['pipeline']['rows_per_s']:>7} {result['pipeline']['tokens_per_s']:>13} {result['score_over_bare_vllm']:>6.2f}")
    print(f"rewards agree to {worst:.2g} (the same model on the same rows)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
