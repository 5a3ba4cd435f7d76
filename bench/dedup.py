"""Near-dedup benchmark: this project's MinHash/LSH pipeline against datasketch's, side by side.

    .venv/bin/python bench/dedup.py [--rows 1000000] [--threshold 0.8] [--num-perm 128] [--out bench/results/dedup.json]

1. Builds a corpus of ``--rows`` texts (40 random words from a 100k vocabulary, so unrelated
   texts share almost nothing) and plants near-duplicates of 10% of them at known Jaccard levels
   (word substitutions sized to land near 0.5, 0.7, 0.8, 0.9 and 1.0).
2. Runs each method in its own process (so peak memory is its own) on the same corpus:
   - ``distillery``: ``minhash.signatures`` + ``near_duplicate_clusters`` (the dedup stage's
     core: bands, candidate pairs, signature check, connected components);
   - ``datasketch``: ``MinHash.bulk`` over the same shingles + ``MinHashLSH`` insert and query,
     same permutations, threshold and num_perm.
3. Scores each method's duplicate pairs against the exact Jaccard of the shingle sets
   (precision over the pairs it reports; recall over planted pairs at or above the threshold),
   and prints a table plus JSON with rows/s, the throughput ratio and peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

LEVELS = [0.5, 0.7, 0.8, 0.9, 1.0]
WORDS, NGRAM = 40, 5


def make_corpus(rows: int, seed: int = 0) -> tuple[pl.DataFrame, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"{random.Random(i).getrandbits(40):x}" for i in range(100_000)])
    n_planted = rows // 10
    n_base = rows - n_planted
    ids = rng.integers(0, len(vocab), size=(rows, WORDS))
    bases = rng.choice(n_base, size=n_planted, replace=False)
    planted = []
    for k, base in enumerate(bases):
        row = n_base + k
        level = LEVELS[k % len(LEVELS)]
        ids[row] = ids[base]
        # Replacing the first c words breaks exactly c of the S = 36 shingles: J = (S - c) / (S + c).
        shingles = WORDS - NGRAM + 1
        c = round(shingles * (1 - level) / (1 + level))
        if c:
            ids[row, :c] = rng.integers(0, len(vocab), size=c)
        planted.append((int(base), row))
    texts = [" ".join(vocab[r]) for r in ids]
    return pl.DataFrame({"text": texts}), planted


def shingle_set(text: str) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def run_distillery(texts: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, dict]:
    from distillery import minhash
    from distillery.stages.dedup import near_duplicate_clusters
    from schemas.recipe import DedupConfig

    cfg = DedupConfig(threshold=threshold, num_perm=num_perm, ngram=NGRAM)
    series = pl.Series(texts)
    minhash.signatures(series[:1000], num_perm=num_perm, ngram=NGRAM)  # compile the kernel outside the timing
    t0 = time.perf_counter()
    sigs = minhash.signatures(series, num_perm=num_perm, ngram=NGRAM)
    t1 = time.perf_counter()
    labels, pairs, _ = near_duplicate_clusters(sigs, cfg, texts=series)
    t2 = time.perf_counter()
    return pairs, {"signatures_s": t1 - t0, "lsh_and_clusters_s": t2 - t1, "seconds": t2 - t0, "clusters_with_duplicates": int((np.bincount(labels) > 1).sum())}


def run_datasketch(texts: list[str], threshold: float, num_perm: int) -> tuple[np.ndarray, dict]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    shingles = [[" ".join(t.split()[i : i + NGRAM]).encode() for i in range(WORDS - NGRAM + 1)] for t in texts]
    sketches = MinHash.bulk(shingles, num_perm=num_perm)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m, check_duplication=False)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}
    t2 = time.perf_counter()
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2), {"signatures_s": t1 - t0, "lsh_and_clusters_s": t2 - t1, "seconds": t2 - t0}


def child(method: str, corpus: str, threshold: float, num_perm: int, out: str) -> None:
    texts = pl.read_parquet(corpus)["text"].to_list()
    run = run_distillery if method == "distillery" else run_datasketch
    pairs, timing = run(texts, threshold, num_perm)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024  # KiB -> GiB
    np.save(out + ".npy", pairs)
    Path(out + ".json").write_text(json.dumps({**timing, "peak_rss_gib": round(peak, 3)}))


def score(pairs: np.ndarray, texts: list[str], planted: list[tuple[int, int]], threshold: float) -> dict:
    reported = {tuple(p) for p in pairs.tolist()}
    true_planted = {(a, b) for a, b in planted if jaccard(texts[a], texts[b]) >= threshold}
    correct = sum(1 for a, b in reported if (a, b) in true_planted or jaccard(texts[a], texts[b]) >= threshold)
    found = len(reported & true_planted)
    return {
        "pairs_reported": len(reported),
        "precision": round(correct / len(reported), 4) if reported else None,
        "recall": round(found / len(true_planted), 4) if true_planted else None,
        "true_pairs": len(true_planted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--out", default="bench/results/dedup.json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "CORPUS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.threshold, args.num_perm, args.child_out)
        return

    t0 = time.perf_counter()
    corpus, planted = make_corpus(args.rows)
    texts = corpus["text"].to_list()
    tmp = Path(tempfile.mkdtemp(prefix="dedup-bench-"))
    corpus.write_parquet(tmp / "corpus.parquet")
    by_level = {level: [] for level in LEVELS}
    for k, (a, b) in enumerate(planted):
        by_level[LEVELS[k % len(LEVELS)]].append(jaccard(texts[a], texts[b]))
    print(f"corpus: {args.rows} rows, {len(planted)} planted pairs, built in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print("planted Jaccard levels (target: mean exact):", {lv: round(float(np.mean(v)), 3) for lv, v in by_level.items()}, file=sys.stderr)

    results = {}
    for method in ("distillery", "datasketch"):
        out = str(tmp / method)
        cmd = [sys.executable, __file__, "--child", method, str(tmp / "corpus.parquet"), "--child-out", out, "--threshold", str(args.threshold), "--num-perm", str(args.num_perm)]
        print(f"running {method} ...", file=sys.stderr)
        subprocess.run(cmd, check=True)
        timing = json.loads(Path(out + ".json").read_text())
        quality = score(np.load(out + ".npy"), texts, planted, args.threshold)
        results[method] = {**timing, **quality, "rows_per_s": round(args.rows / timing["seconds"], 1)}

    ours, ref = results["distillery"], results["datasketch"]
    summary = {
        "rows": args.rows,
        "threshold": args.threshold,
        "num_perm": args.num_perm,
        "ngram": NGRAM,
        "throughput_ratio": round(ours["rows_per_s"] / ref["rows_per_s"], 2),
        "methods": results,
    }
    print(f"\n{'method':12} {'rows/s':>12} {'seconds':>9} {'precision':>10} {'recall':>8} {'pairs':>9} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:12} {r['rows_per_s']:>12} {r['seconds']:>9.1f} {r['precision']!s:>10} {r['recall']!s:>8} {r['pairs_reported']:>9} {r['peak_rss_gib']:>9}")
    print(f"throughput ratio (distillery / datasketch): {summary['throughput_ratio']}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
