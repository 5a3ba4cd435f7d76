"""Decontamination benchmark: recall on planted benchmark items, false positives on clean rows.

    .venv/bin/python bench/decontam.py [--variants 2] [--train-rows 0] [--out bench/results/decontam.json]

1. Loads the benchmarks of ``../shared/data`` (GSM8K test, AIME24, AMC23, SVAMP), the same four
   the tests use.
2. Plants, with a seeded RNG, edited copies of benchmark items as rows' ``question``:
   - **short edited**: every item under :data:`SHORT_WORDS` normalized words, each edit of
     :data:`EDITS` (a word inserted, a verb swapped, ``$`` dropped, lower-cased, a preamble, and
     combinations), ``--variants`` seeds each;
   - **long edited**: the same edits on a sample of the longer items;
   - **verbatim**: every item copied unchanged.
3. Runs ``decontaminate`` with the rule of this version (``new``) and with the rule before it
   (``old``: ``short_item_words=0`` turns the short-item rule off) over the planted rows and
   over clean GSM8K train rows (all 7,473 unless ``--train-rows``), and reports recall per set
   and per edit, and the share of train rows flagged (the false-positive rate: train and test
   are disjoint problems, though one train row really is a test problem with other names).

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distillery.stages.decontaminate import Benchmark, BenchmarkIndex, decontaminate, load_benchmark, normalize  # noqa: E402
from schemas.recipe import BenchmarkSource, DecontaminationConfig  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SOURCES = [
    BenchmarkSource(name="gsm8k", path=str(DATA / "gsm8k" / "test.jsonl")),
    BenchmarkSource(name="aime24", path=str(DATA / "benchmarks" / "aime24" / "test.jsonl"), fields=["problem"]),
    BenchmarkSource(name="amc23", path=str(DATA / "benchmarks" / "amc23" / "test.jsonl")),
    BenchmarkSource(name="svamp", path=str(DATA / "benchmarks" / "svamp" / "test.jsonl"), fields=["Body", "Question"]),
]
SHORT_WORDS = 20  # "short": fewer normalized words than this
FILLERS = ["really", "exactly", "then", "now", "also", "still", "just", "actually", "altogether", "today", "quickly", "finally"]
VERBS = {
    "has": "owns", "have": "own", "had": "owned", "buys": "purchases", "buy": "purchase", "bought": "purchased",
    "sells": "offers", "sell": "offer", "sold": "offered", "gives": "hands", "give": "hand", "gave": "handed",
    "makes": "creates", "make": "create", "made": "created", "gets": "receives", "get": "receive", "got": "received",
    "spends": "uses", "spent": "used", "eats": "consumes", "ate": "consumed", "collects": "gathers", "picked": "gathered",
    "played": "competed", "won": "gained", "costs": "runs", "cost": "run", "takes": "needs", "took": "needed",
    "plants": "sows", "is": "was", "are": "were", "was": "is", "were": "are", "find": "determine", "compute": "calculate",
    "holds": "contains", "needs": "requires", "wants": "wishes", "reads": "finishes", "walks": "goes", "runs": "jogs",
}  # fmt: skip
PREAMBLES = ["Please answer:", "Solve this:", "Question:", "Try this one."]


def _insert(words: list[str], rng: random.Random) -> list[str]:
    at = rng.randrange(1, len(words)) if len(words) > 1 else 1
    return [*words[:at], rng.choice(FILLERS), *words[at:]]


def _swap_verb(words: list[str], rng: random.Random) -> list[str]:
    spots = [i for i, w in enumerate(words) if w.lower() in VERBS]
    if not spots:  # no verb this list knows: another word stands in for one
        spots = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3] or [0]
        i = rng.choice(spots)
        return [*words[:i], "somehow", *words[i + 1 :]]
    i = rng.choice(spots)
    return [*words[:i], VERBS[words[i].lower()], *words[i + 1 :]]


def edit(text: str, kind: str, rng: random.Random) -> str:
    """Apply the edits named in ``kind`` ("insert+verb+lower", ...) to a benchmark item."""
    words = text.split()
    for step in kind.split("+"):
        if step == "insert":
            words = _insert(words, rng)
        elif step == "verb":
            words = _swap_verb(words, rng)
        elif step == "preamble":
            words = [*rng.choice(PREAMBLES).split(), *words]
    text = " ".join(words)
    if "dollar" in kind:
        text = text.replace("$", "")
    if "lower" in kind:
        text = text.lower()
    return text


EDITS = [
    "insert", "verb", "dollar", "lower", "preamble", "insert+lower", "verb+dollar", "insert+verb",
    "insert+dollar+lower", "verb+lower", "preamble+insert", "insert+verb+dollar+lower",
]  # fmt: skip


def benchmarks() -> list[Benchmark]:
    return [load_benchmark(src) for src in SOURCES]


def items(benches: list[Benchmark]) -> list[tuple[str, str, str, int]]:
    """(benchmark, item id, text, normalized word count) of every item."""
    return [(b.name, i, t, len(normalize(t).split())) for b in benches for i, t in zip(b.ids, b.texts, strict=True)]


def planted(benches: list[Benchmark], *, variants: int = 2, long_sample: int = 300, seed: int = 0) -> pl.DataFrame:
    """Planted rows: ``question`` (the edited item), ``set`` (short / long / verbatim), ``edit``,
    ``benchmark`` and ``item``."""
    rng = random.Random(seed)
    every = items(benches)
    short = [x for x in every if x[3] < SHORT_WORDS]
    long = rng.sample([x for x in every if x[3] >= SHORT_WORDS], long_sample)
    rows = []
    for group, chosen in (("short", short), ("long", long)):
        for name, item_id, text, _ in chosen:
            for kind in EDITS:
                for _ in range(variants):
                    question = edit(text, kind, rng)
                    rows.append({"set": group, "edit": kind, "benchmark": name, "item": item_id, "question": question})
    for name, item_id, text, _ in every:
        rows.append({"set": "verbatim", "edit": "none", "benchmark": name, "item": item_id, "question": text})
    return pl.DataFrame(rows).with_row_index("sample_id").with_columns(pl.col("sample_id").cast(pl.Utf8))


def train_rows(limit: int | None = None) -> pl.DataFrame:
    lines = (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()][: limit or None]
    return pl.DataFrame({"question": [r["question"] for r in rows], "completion": [r["answer"] for r in rows]})


def measure(benches: list[Benchmark], cfg: DecontaminationConfig, plants: pl.DataFrame, train: pl.DataFrame) -> dict:
    index = BenchmarkIndex.build(benches, cfg)
    t0 = time.perf_counter()
    found = decontaminate(plants, benches, cfg, index=index)
    t1 = time.perf_counter()
    flagged = decontaminate(train, benches, cfg, index=index)
    t2 = time.perf_counter()
    caught_ids = set(found.rejects["sample_id"].to_list())
    # a planted row counts as caught only if it was matched to its own item
    right = set()
    for sample_id, detail in zip(found.rejects["sample_id"], found.rejects["detail"], strict=True):
        d = json.loads(detail)
        row = plants.row(int(sample_id), named=True)
        if (d["benchmark"], d["item"]) == (row["benchmark"], row["item"]):
            right.add(sample_id)
    caught = plants.with_columns(pl.col("sample_id").is_in(list(caught_ids)).alias("caught"))
    recall = {s: round(float(caught.filter(pl.col("set") == s)["caught"].mean()), 4) for s in ("short", "long", "verbatim")}
    per_edit = {
        e: round(float(caught.filter((pl.col("set") == "short") & (pl.col("edit") == e))["caught"].mean()), 4) for e in EDITS
    }
    methods = Counter(json.loads(d)["method"] for d in found.rejects["detail"])
    fp_details = [json.loads(d) for d in flagged.rejects["detail"]]
    return {
        "recall": recall,
        "short_missed": int((~caught.filter(pl.col("set") == "short")["caught"]).sum()),
        "short_planted": int(caught.filter(pl.col("set") == "short").height),
        "matched_own_item": round(len(right) / max(1, len(caught_ids)), 4),
        "short_recall_per_edit": per_edit,
        "methods": dict(methods),
        "train_rows": train.height,
        "train_flagged": flagged.rejects.height,
        "false_positive_rate": round(flagged.rejects.height / max(1, train.height), 5),
        "train_flagged_items": [(d["benchmark"], d["item"], d["method"]) for d in fp_details],
        "seconds": {"planted": round(t1 - t0, 2), "train": round(t2 - t1, 2)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, default=2, help="edited copies per item and edit")
    parser.add_argument("--train-rows", type=int, default=0, help="clean GSM8K train rows (0: all)")
    parser.add_argument("--out", default="bench/results/decontam.json")
    args = parser.parse_args()

    benches = benchmarks()
    plants = planted(benches, variants=args.variants)
    train = train_rows(args.train_rows or None)
    configs = {
        "old": DecontaminationConfig(benchmarks=SOURCES, short_item_words=0),
        "new": DecontaminationConfig(benchmarks=SOURCES),
    }
    results = {name: measure(benches, cfg, plants, train) for name, cfg in configs.items()}
    summary = {
        "planted": dict(plants["set"].value_counts().sort("set").iter_rows()),
        "short_words": SHORT_WORDS,
        "edits": EDITS,
        "config": configs["new"].model_dump(exclude={"benchmarks"}),
        **results,
    }
    print(f"\nplanted rows: {summary['planted']}; clean GSM8K train rows: {train.height}")
    print(f"{'rule':5} {'short edited':>13} {'long edited':>12} {'verbatim':>9} {'train flagged':>14} {'FP rate':>8}")
    for name, r in results.items():
        rc = r["recall"]
        print(
            f"{name:5} {rc['short']:>13.2%} {rc['long']:>12.2%} {rc['verbatim']:>9.2%} "
            f"{r['train_flagged']:>14} {r['false_positive_rate']:>8.3%}"
        )
    print("\nshort items, recall per edit:")
    print(f"{'edit':28} {'old':>8} {'new':>8}")
    for e in EDITS:
        print(f"{e:28} {results['old']['short_recall_per_edit'][e]:>8.2%} {results['new']['short_recall_per_edit'][e]:>8.2%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
