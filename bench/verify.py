"""Verify benchmark: the bounded answer check against the old unbounded one, side by side.

    .venv/bin/python bench/verify.py [--rows 1000] [--repeats 3] [--timeout-s 1.0] [--out bench/results/verify.json]

1. Takes the first ``--rows`` GSM8K test items (``../shared/data/gsm8k/test.jsonl``) and writes a
   completion for each from its reference answer, with a seeded mix of the forms models write:
   the reference solution itself (``#### 72``), ``The answer is $72.00.``, ``\\boxed{72}``, a wrong
   number, ``\\boxed{\\frac{144}{2}}``, ``\\boxed{\\sqrt{5184}}`` and ``\\boxed{72 \\cdot 1}``
   (the last three are LaTeX: they go through the worker process in the bounded path).
2. Runs :func:`distillery.stages.verify.verify_samples` on them with ``bounded=False`` (the old
   path: math-verify in process, no bound) and ``bounded=True`` (the pre-check, plain numbers in
   process, the rest in the time-bounded worker), alternating, ``--repeats`` times each; the
   best time counts. The worker is started before the timing (a process does that once).
3. Checks that both paths judge every row the same, then times the pathological answers (towers,
   factorials, nested braces, a long sum, a slow polynomial) through the bounded path; the old
   path is not run on them: it does not return.

Prints a table and writes JSON with rows/s before and after and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillery.stages.verify import match_statuses, reference_answer, verify_samples  # noqa: E402
from schemas.recipe import VerifyConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
FORMS = ["solution", "answer_is", "boxed", "wrong", "frac", "sqrt", "cdot"]
PATHOLOGICAL = {
    "tower 9^{9^{9^{9}}}": "9^{9^{9^{9}}}",
    "factorial (99999)!": "(99999)!",
    "3000 nested braces": "{" * 3000 + "1" + "}" * 3000,
    "14 nested braces": "{" * 14 + "1" + "}" * 14,
    "long sum (40k chars)": "x+" * 20_000 + "1",
    "(x+1)^{1000} (time bound)": "(x+1)^{1000}",
}


def completions(rows: int, seed: int = 0) -> pl.DataFrame:
    rng = random.Random(seed)
    items = [json.loads(line) for line in DATA.read_text().splitlines()[:rows]]
    out = []
    for k, item in enumerate(items):
        ref = reference_answer(item["answer"], answer_format="gsm8k")
        value = int(float(ref))
        form = FORMS[k % len(FORMS)] if k < len(FORMS) else rng.choice(FORMS)
        completion = {
            "solution": item["answer"],
            "answer_is": f"Adding it up, the answer is ${value:,}.00.",
            "boxed": f"So the total is \\boxed{{{value}}}.",
            "wrong": f"The answer is {value + rng.choice([-1, 1, 10])}.",
            "frac": f"We get \\boxed{{\\frac{{{2 * value}}}{{2}}}}",
            "sqrt": f"Hence \\boxed{{\\sqrt{{{value * value}}}}}",
            "cdot": f"Hence \\boxed{{{value} \\cdot 1}}",
        }[form]
        out.append({"sample_id": str(k), "seed_id": str(k), "form": form, "completion": completion, "reference_answer": ref})
    return pl.DataFrame(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=1.0)
    parser.add_argument("--out", default="bench/results/verify.json")
    args = parser.parse_args()

    samples = completions(args.rows)
    match_statuses([("\\frac{1}{2}", "0.5")])  # start the worker and warm math-verify up, untimed
    verify_samples(samples.head(20), VerifyConfig(), bounded=False)
    times: dict[str, list[float]] = {"old": [], "new": []}
    results = {}
    for _ in range(args.repeats):
        for name, bounded in (("old", False), ("new", True)):
            t0 = time.perf_counter()
            results[name] = verify_samples(samples, VerifyConfig(keep="all", timeout_s=args.timeout_s), bounded=bounded)
            times[name].append(time.perf_counter() - t0)
    same = results["old"].kept["correct"].to_list() == results["new"].kept["correct"].to_list()
    assert same, "the bounded path judged some ordinary answers differently"
    best = {name: min(t) for name, t in times.items()}
    rate = {name: round(args.rows / best[name], 1) for name in best}

    pathological = {}
    for label, answer in PATHOLOGICAL.items():
        rows = pl.DataFrame(
            {"sample_id": ["p"], "seed_id": ["p"], "completion": [f"\\boxed{{{answer}}}"], "reference_answer": ["5"]}
        )
        t0 = time.perf_counter()
        result = verify_samples(rows, VerifyConfig(keep="correct", timeout_s=args.timeout_s))
        pathological[label] = {"seconds": round(time.perf_counter() - t0, 3), "dropped": result.count.dropped}

    summary = {
        "rows": args.rows,
        "forms": dict(samples["form"].value_counts().sort("form").iter_rows()),
        "correct": int(sum(bool(c) for c in results["new"].kept["correct"])),
        "same_judgments": same,
        "seconds": {name: round(best[name], 3) for name in best},
        "rows_per_s": rate,
        "ratio_new_over_old": round(rate["new"] / rate["old"], 3),
        "timeout_s": args.timeout_s,
        "pathological": pathological,
    }
    print(f"\n{args.rows} GSM8K answers ({summary['correct']} correct), best of {args.repeats}")
    print(f"{'path':28} {'rows/s':>10} {'seconds':>9}")
    print(f"{'old (unbounded, in process)':28} {rate['old']:>10} {best['old']:>9.3f}")
    print(f"{'new (pre-check + worker)':28} {rate['new']:>10} {best['new']:>9.3f}")
    print(f"ratio new / old: {summary['ratio_new_over_old']}x; same judgments: {same}")
    print(f"\n{'pathological answer':28} {'seconds':>9}  dropped (old path: does not return)")
    for label, r in pathological.items():
        print(f"{label:28} {r['seconds']:>9.3f}  {r['dropped']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
