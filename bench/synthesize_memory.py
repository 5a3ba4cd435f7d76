"""Synthesize memory benchmark: the real ``synthesize`` flow (Prefect, Ray, verify, quality, dedup,
publish) with the scripted generator in place of the vLLM engines, on runs of growing size, and
the driver's peak memory of each.

    .venv/bin/python bench/synthesize_memory.py [--samples 100000 1000000] [--out bench/results/synthesize_memory.json]

Each size runs in a fresh process (so each peak is its own): it writes a seed file of
``samples / 16`` arithmetic word problems (``bench/curate_memory.py``'s templates, each with its
answer), and runs a recipe of 16 samples per problem in shards of 1,000 problems (16,000 samples
a shard), the generation cache off. The scripted generator (``tests/scripted.py``, keeping no
record of its requests) answers every request with its own words (no two samples near
duplicates by chance) and "The answer is N": right for 90% of the samples, one off for the rest
(verify drops those as ``incorrect``); 1% of the samples copy the words of the same sample of
a problem 1,500 problems earlier, in another shard, with their own answer (dedup keeps one of
each group, the others are near or exact duplicates). A thread samples the
driver's RSS every 0.1 s (psutil; the Prefect server and the Ray workers are other processes);
``ru_maxrss`` is reported too. Checked per run: the counts add up, and the drops are exactly the
planted ones.

Prints a table and writes JSON with ``peak_rss_ratio`` (the largest run's peak over the
smallest's): bounded memory means it stays near 1 while the samples grow tenfold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES_PER_PROBLEM = 16
SHARD_PROBLEMS = 1_000
WRONG_SHARE = 0.10
COPY_SHARE = 0.01
COPY_DISTANCE = 1_500  # problems back: another shard of 1,000


def _roll(seed_id: str, index: int) -> float:
    digest = hashlib.sha256(f"{seed_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _kind(problem: int, index: int) -> str:
    roll = _roll(f"p{problem}", index)
    if roll < COPY_SHARE and problem >= COPY_DISTANCE:
        return "copy"
    return "wrong" if roll < COPY_SHARE + WRONG_SHARE else "right"


def _words_key(problem: int, index: int) -> str:
    """Whose words a sample uses: its own, or (a copy) those of the sample it copies, back to
    the first one of the chain; a copy ends in its own (right) answer, so it is a near duplicate
    of those (one 5-gram shingle in 30 differs), or an exact one where the answers agree."""
    while _kind(problem, index) == "copy":
        problem -= COPY_DISTANCE
    return f"p{problem}/{index}"


def write_seeds(path: Path, problems: int) -> list[int]:
    """The seed file; returns each problem's answer."""
    from bench.curate_memory import problem as word_problem

    rng, answers = random.Random(0), []
    with open(path, "w") as f:
        for i in range(problems):
            text = word_problem(rng)
            question = text.split("\n", 1)[0]
            answer = int(text.rsplit("The answer is ", 1)[1].rstrip("."))
            answers.append(answer)
            f.write(json.dumps({"id": f"p{i}", "question": question, "answer": str(answer)}) + "\n")
    return answers


def child(samples: int, out: Path) -> None:
    import psutil

    import distillery

    distillery.apply_run_env()
    import flows.synthesize
    from distillery.stages.publish import read_shards
    from distillery.store import open_version
    from schemas.recipe import Recipe
    from tests.scripted import ScriptedGenerator, distinct_text

    problems = samples // SAMPLES_PER_PROBLEM
    me = psutil.Process()
    peak = {"rss": me.memory_info().rss}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            peak["rss"] = max(peak["rss"], me.memory_info().rss)

    with tempfile.TemporaryDirectory(prefix="bench-synthesize-") as tmp:
        seeds = Path(tmp) / "seeds.jsonl"
        answers = write_seeds(seeds, problems)

        def answer(request, sampling) -> str:
            p, k = int(request["seed_id"].removeprefix("p")), request["sample_index"]
            value = answers[p] + (1 if _kind(p, k) == "wrong" else 0)
            return distinct_text(_words_key(p, k), str(value), words=30)

        generator = ScriptedGenerator(answer, record=False)
        generator._render = lambda request: request["messages"][-1]["content"]  # no chat template: the bench is the pipeline
        flows.synthesize.ENGINE_POOL_FACTORY = lambda model_path, engine, seed=0: generator
        recipe = Recipe.model_validate(
            {
                "name": "bench-synthesize",
                "seeds": {"path": str(seeds), "fields": {"id": "id"}},
                "generation": {"samples_per_problem": SAMPLES_PER_PROBLEM, "shard_size": SHARD_PROBLEMS, "cache": False, "max_tokens": 64},
                "publish": {"shard_rows": 100_000},
            }
        )
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        uri = flows.synthesize.synthesize(recipe, store=str(Path(tmp) / "store"))
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
        store, manifest = open_version(uri, what="the benchmark's version")
        stages = {s["stage"]: s for s in manifest["counts"]["stages"]}
        for s in stages.values():
            assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values()), s
        from collections import Counter

        wrong, groups = 0, Counter()
        for p in range(problems):
            for k in range(SAMPLES_PER_PROBLEM):
                if _kind(p, k) == "wrong":
                    wrong += 1
                else:  # verified right: dedup keeps one sample of each group of shared words
                    groups[_words_key(p, k)] += 1
        copies = sum(n - 1 for n in groups.values())
        assert stages["verify"]["dropped"] == {"incorrect": wrong}, stages["verify"]
        assert sum(stages["dedup"]["dropped"].values()) == copies and set(stages["dedup"]["dropped"]) <= {"exact_duplicate", "near_duplicate"}, stages["dedup"]
        published = manifest["counts"]["published"]
        assert published == samples - wrong - copies and sum(s["rows"] for s in manifest["shards"]) == published
        first = read_shards(store, {**manifest, "shards": manifest["shards"][:1]})
        assert first["sample_id"].n_unique() == first.height
    result = {
        "samples": samples,
        "problems": problems,
        "shards": -(-problems // SHARD_PROBLEMS),
        "seconds": round(seconds, 1),
        "samples_per_second": round(samples / seconds, 1),
        "peak_rss_mib": round(peak["rss"] / 2**20, 1),
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "published": published,
        "dropped_incorrect": wrong,
        "dropped_duplicate": stages["dedup"]["dropped"],
    }
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/synthesize_memory.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.child_out)
        return
    runs = []
    for n in args.samples:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "--child", str(n), "--child-out", f.name], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            runs.append(json.loads(Path(f.name).read_text()))
        print(f"{n:>10,} samples: {runs[-1]['seconds']:8.1f} s, driver peak RSS {runs[-1]['peak_rss_mib']:8.1f} MiB", flush=True)
    ratio = round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3)
    print()
    print("| samples | problems | shards | seconds | samples/s | driver peak RSS (MiB) | ru_maxrss (MiB) | published |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['samples']:,} | {r['problems']:,} | {r['shards']} | {r['seconds']} | {r['samples_per_second']} | {r['peak_rss_mib']} | {r['ru_maxrss_mib']} | {r['published']:,} |")
    print(f"\npeak RSS ratio, {runs[-1]['samples']:,} over {runs[0]['samples']:,} samples: {ratio}")
    import platform

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "synthesize flow, scripted generator, driver peak RSS",
                "command": "make bench-synthesize",
                "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
                "settings": {"samples_per_problem": SAMPLES_PER_PROBLEM, "shard_problems": SHARD_PROBLEMS, "wrong_share": WRONG_SHARE, "copy_share": COPY_SHARE},
                "runs": runs,
                "peak_rss_ratio": ratio,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
