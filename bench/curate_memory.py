"""Curation memory benchmark: `distillery curate` (the real CLI, in a subprocess) on synthetic seed
files of growing size, with the peak memory of each run.

    .venv/bin/python bench/curate_memory.py [--rows 250000 500000 1000000] [--out bench/results/curate_memory.json]

1. Writes a JSONL file per size (in a temporary folder, removed afterwards): GSM8K-like word
   problems from 12 templates with names, items and numbers varied, each with a worked solution
   ending in "The answer is N."; and, planted at known lines: exact duplicates (the text of an
   earlier row, re-cased and re-spaced), near duplicates (an earlier row with a sentence added),
   copies of GSM8K test questions (decontamination), too-short and repetitive rows (quality),
   and malformed lines (ingest).
2. Runs `distillery curate FILE --recipe recipes/curate-default.yaml` and samples the process
   tree every 0.1 s with psutil: the driver's RSS (the CLI process) and the sum over the tree
   (the driver, the Prefect server it starts, Ray's GCS, raylet and workers). Also reports
   `getrusage(RUSAGE_CHILDREN).ru_maxrss` (the largest single process that has exited).
3. Checks each manifest: the counts add up stage by stage, and every planted row was dropped by
   the stage and with the reason it was planted for (read back from the version's rejects); near
   copies may miss at LSH's rate (at most 0.5% allowed, the misses are listed).
4. Prints a table and writes JSON, with the peak-memory ratio of the largest to the smallest run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NAMES = "Natalia Weng Betty Julie James Albert Ken Alexis Tina Randy Mark Joy Ann Carla Rose Liam Noah Olivia Emma Ava Mia Lucas Mason Ethan Logan Jacob Aiden Zoe Nora Leo".split()
ITEMS = "apples pencils stickers cookies marbles books cupcakes tickets shells cards bottles stamps candles muffins beads".split()
PLACES = "market school bakery library park garage farm museum".split()
TEMPLATES = [
    ("{n} bought {a} {i} at the {p} on Monday and {b} more {i} on Tuesday. On Wednesday {n} gave away {c} {i} to friends.",
     "{n} had {a} + {b} = {s} {i}. After giving away {c}, {n} has {s} - {c} = {r} {i}.", lambda a, b, c: (a + b, 0, a + b - c)),
    ("A box at the {p} holds {a} {i}. {n} fills {b} boxes and then takes out {c} {i} for a party.",
     "The boxes hold {a} x {b} = {s} {i}. Taking out {c} leaves {s} - {c} = {r}.", lambda a, b, c: (a * b, 0, a * b - c)),
    ("{n} reads {a} pages of a book about {i} every day for {b} days, then {c} pages on the last day.",
     "In {b} days {n} reads {a} x {b} = {s} pages. With the last day that is {s} + {c} = {r} pages.", lambda a, b, c: (a * b, 0, a * b + c)),
    ("The {p} sells {i} for {a} dollars each. {n} buys {b} of them and pays with {c} dollars more than the price.",
     "The {i} cost {a} x {b} = {s} dollars. {n} pays {s} + {c} = {r} dollars.", lambda a, b, c: (a * b, 0, a * b + c)),
    ("{n} earns {a} dollars an hour at the {p}. Last week {n} worked {b} hours and spent {c} dollars on {i}.",
     "{n} earned {a} x {b} = {s} dollars. After spending {c}, {n} kept {s} - {c} = {r} dollars.", lambda a, b, c: (a * b, 0, a * b - c)),
    ("There are {a} rows of {i} in the {p} garden with {b} {i} in each row. Birds eat {c} of them.",
     "There are {a} x {b} = {s} {i}. After the birds, {s} - {c} = {r} remain.", lambda a, b, c: (a * b, 0, a * b - c)),
    ("{n} collects {a} {i} in January, twice as many in February and {c} fewer than {b} in March.",
     "February brings 2 x {a} = {s}. March brings {b} - {c} = {t}. In all {a} + {s} + {t} = {r} {i}.", lambda a, b, c: (2 * a, b - c, 3 * a + b - c)),
    ("A bus to the {p} carries {a} people. At the first stop {b} people get on and at the second stop {c} get off.",
     "After the first stop there are {a} + {b} = {s} people. After the second, {s} - {c} = {r}.", lambda a, b, c: (a + b, 0, a + b - c)),
    ("{n} shares {a} {i} equally among {b} friends at the {p} and keeps the {c} left over from another bag.",
     "Each friend gets {a} / {b} = {s} {i}. {n} keeps {c} {i}, so the answer counts {s} + {c} = {r}.", lambda a, b, c: (a // b, 0, a // b + c)),
    ("The {p} had {a} visitors on Saturday and {b} on Sunday. On Monday it had {c} fewer visitors than on Sunday.",
     "Monday had {b} - {c} = {t} visitors. The three days had {a} + {b} + {t} = {r} visitors.", lambda a, b, c: (0, b - c, a + 2 * b - c)),
    ("{n} runs {a} laps around the {p} each morning for {b} days and walks {c} laps each evening of those days.",
     "Running gives {a} x {b} = {s} laps and walking {c} x {b} = {t} laps, so {s} + {t} = {r} laps.", lambda a, b, c: (a * b, c * b, a * b + c * b)),
    ("A recipe for {i} needs {a} grams of flour per batch. {n} makes {b} batches and has {c} grams of flour left.",
     "The batches use {a} x {b} = {s} grams. {n} started with {s} + {c} = {r} grams.", lambda a, b, c: (a * b, 0, a * b + c)),
]
PLANTED = ("exact_duplicate", "near_duplicate", "contaminated", "too_short", "repetitive", "invalid_json", "missing_field")
RATES = {"exact_duplicate": 0.02, "near_duplicate": 0.02, "contaminated": 0.0005, "too_short": 0.0005, "repetitive": 0.0005, "invalid_json": 0.0005, "missing_field": 0.0005}


def problem(rng: random.Random) -> str:
    question, solution, answer = rng.choice(TEMPLATES)
    a, b, c = rng.randint(12, 999), rng.randint(2, 99), rng.randint(1, 400)
    if question.startswith("{n} shares"):
        a = b * rng.randint(2, 60)
    s, t, r = answer(a, b, c)
    fields = {"n": rng.choice(NAMES), "i": rng.choice(ITEMS), "p": rng.choice(PLACES), "a": a, "b": b, "c": c, "s": s, "t": t, "r": r}
    return question.format(**fields) + " How many are there in the end?\n" + solution.format(**fields) + f"\nThe answer is {r}."


def make_input(path: Path, rows: int, seed: int = 0) -> dict[str, list[str]]:
    """Write ``rows`` lines; return the ids planted for each reason (malformed lines have none)."""
    rng = random.Random(seed)
    leaks = [json.loads(line)["question"] for line in (DATA / "gsm8k/test.jsonl").read_text().splitlines()]
    planted: dict[str, list[str]] = {reason: [] for reason in PLANTED}
    originals: list[str] = []
    with open(path, "w") as f:
        for i in range(rows):
            roll, row_id = rng.random(), f"r{i:08d}"
            cumulative, kind = 0.0, None
            for reason, rate in RATES.items():
                cumulative += rate
                if roll < cumulative:
                    kind = reason
                    break
            if kind in ("exact_duplicate", "near_duplicate") and not originals:
                kind = None
            if kind == "exact_duplicate":
                text = "  " + rng.choice(originals).upper().replace(". ", " .  ")
            elif kind == "near_duplicate":
                text = rng.choice(originals) + f" Checked {rng.randrange(10**9)} times."
            elif kind == "contaminated":
                text = "Please solve: " + rng.choice(leaks)
            elif kind == "too_short":
                text = "42"
            elif kind == "repetitive":
                text = "Step 1: add 1 (sticks)\n" * 40
            else:
                text = problem(rng)
                if kind is not None:  # a malformed line: no row to copy
                    pass
                elif len(originals) < 50_000:
                    originals.append(text)
                elif rng.random() < 0.05:
                    originals[rng.randrange(len(originals))] = text
            if kind == "invalid_json":
                f.write('{"id": "' + row_id + '", "completion": "broken\n')
                planted[kind].append(row_id)
                continue
            if kind == "missing_field":
                f.write(json.dumps({"id": row_id, "text": text}) + "\n")
                planted[kind].append(row_id)
                continue
            if kind:
                planted[kind].append(row_id)
            f.write(json.dumps({"id": row_id, "completion": text}) + "\n")
    return planted


class TreeSampler(threading.Thread):
    """Peak RSS of a process and of its whole tree (children, grandchildren), sampled."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.driver_peak = self.tree_peak = self.driver_private_peak = self.tree_private_peak = 0
        self.processes_seen: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = private = 0
            for p in procs:
                try:
                    info = p.memory_info()
                except psutil.Error:
                    continue
                total += info.rss
                private += info.rss - info.shared  # without file-backed and shared pages (Ray's object store)
                self.processes_seen.add(p.pid)
                if p.pid == self.root.pid:
                    self.driver_peak = max(self.driver_peak, info.rss)
                    self.driver_private_peak = max(self.driver_private_peak, info.rss - info.shared)
            self.tree_peak = max(self.tree_peak, total)
            self.tree_private_peak = max(self.tree_private_peak, private)
            self.done.wait(self.interval)


def run_curate(input_path: Path, store: Path, prefect_home: Path) -> dict:
    cmd = [str(ROOT / ".venv/bin/distillery"), "curate", str(input_path), "--name", "bench", "--recipe", "recipes/curate-default.yaml", "--store", str(store), "--set", "id_column=id"]
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(store.parent / "curate.log", "w")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    log.close()
    if proc.returncode != 0:
        sys.stderr.write((store.parent / "curate.log").read_text()[-4000:])
        raise SystemExit(f"curate failed with exit code {proc.returncode}")
    uri = Path(out.strip().splitlines()[-1])
    return {
        "uri": str(uri),
        "seconds": round(seconds, 1),
        "driver_peak_mb": round(sampler.driver_peak / 2**20),
        "tree_peak_mb": round(sampler.tree_peak / 2**20),
        "driver_private_peak_mb": round(sampler.driver_private_peak / 2**20),
        "tree_private_peak_mb": round(sampler.tree_private_peak / 2**20),
        "largest_exited_child_mb_so_far": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),  # max over all runs so far
        "processes_in_tree": len(sampler.processes_seen),
    }


def check(uri: Path, rows: int, planted: dict[str, list[str]]) -> dict:
    """Counts add up, and each planted row is a reject of the stage and reason it was planted for."""
    import polars as pl

    manifest = json.loads((uri / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input"] == rows, (counts["input"], rows)
    previous = counts["input"]
    for s in counts["stages"]:
        assert s["rows_in"] == previous and s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values()), s
        previous = s["rows_out"]
    assert previous == counts["published"]
    rejects = pl.read_parquet(uri / "rejects", columns=["stage", "reason", "sample_id", "record"])
    dropped = {s["stage"]: s["dropped"] for s in counts["stages"]}
    found = {}
    for reason, ids in planted.items():
        if reason in ("invalid_json", "missing_field"):  # ingest rejects have no sample_id: find them by their raw line
            hits = rejects.filter(pl.col("reason") == reason)["record"].str.extract(r'"id": "(r\d+)"').to_list()
        else:
            hits = rejects.filter(pl.col("reason") == reason)["sample_id"].to_list()
        missed = set(ids) - set(hits)
        found[reason] = {"planted": len(ids), "found": len(set(ids) & set(hits)), "dropped_for_reason": sum(d.get(reason, 0) for d in dropped.values())}
        if missed:
            found[reason]["missed"] = sorted(missed)[:20]
        # LSH finds a pair with probability 1 - (1 - s**r)**b of its signature agreement s, so a rare
        # near copy can slip through (as in the in-memory dedup); every other plant must be found.
        allowed = int(0.005 * len(ids)) if reason == "near_duplicate" else 0
        assert len(missed) <= allowed, f"{reason}: {len(missed)} planted rows not dropped, e.g. {sorted(missed)[:3]}"
    return {"dropped": dropped, "planted": found, "published": counts["published"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[250_000, 500_000, 1_000_000])
    parser.add_argument("--out", default="bench/results/curate_memory.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (inputs, stores, logs)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    results = []
    try:
        for rows in args.rows:
            work = tmp / f"rows-{rows}"
            work.mkdir()
            t0 = time.perf_counter()
            planted = make_input(work / "input.jsonl", rows)
            size_mb = (work / "input.jsonl").stat().st_size / 2**20
            print(f"{rows} rows: input {size_mb:.0f} MB written in {time.perf_counter() - t0:.0f}s; curating ...", file=sys.stderr, flush=True)
            run = run_curate(work / "input.jsonl", work / "store", work / "prefect")
            checked = check(Path(run["uri"]), rows, planted)
            results.append({"rows": rows, "input_mb": round(size_mb), **run, "rows_per_s": round(rows / run["seconds"]), **checked})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'rows':>9} {'input MB':>9} {'seconds':>8} {'rows/s':>8} {'driver MB':>10} {'(private)':>10} {'tree MB':>8} {'(private)':>10}  dropped")
    for r in results:
        dropped = ", ".join(f"{k}={v}" for d in r["dropped"].values() for k, v in sorted(d.items()))
        print(
            f"{r['rows']:>9} {r['input_mb']:>9} {r['seconds']:>8} {r['rows_per_s']:>8} {r['driver_peak_mb']:>10} {r['driver_private_peak_mb']:>10}"
            f" {r['tree_peak_mb']:>8} {r['tree_private_peak_mb']:>10}  {dropped}"
        )
    summary = {"runs": results, "shard_rows": 100_000, "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"}
    if len(results) > 1:
        small, large = results[0], results[-1]
        summary["peak_ratio_driver"] = round(large["driver_peak_mb"] / small["driver_peak_mb"], 2)
        summary["peak_ratio_tree"] = round(large["tree_peak_mb"] / small["tree_peak_mb"], 2)
        summary["peak_ratio_driver_private"] = round(large["driver_private_peak_mb"] / small["driver_private_peak_mb"], 2)
        summary["peak_ratio_tree_private"] = round(large["tree_private_peak_mb"] / small["tree_private_peak_mb"], 2)
        print(
            f"peak RSS {large['rows']} vs {small['rows']} rows: driver x{summary['peak_ratio_driver']} (private x{summary['peak_ratio_driver_private']}),"
            f" tree x{summary['peak_ratio_tree']} (private x{summary['peak_ratio_tree_private']})"
        )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
