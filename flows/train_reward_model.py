"""The ``train_reward_model`` flow: a reward model from the pipeline's own verified samples.

Reads a published samples version (one run with ``verify.keep: all`` has both correct and
incorrect samples), keeps the problems with both, splits them into train and held-out problems,
fits a score head on the frozen base model's last-token features, measures ROC AUC on both
sides, and publishes the head as a versioned ``reward-model`` artifact in the store.
``distillery.model_setup.materialize_reward_model(URI)`` turns it into the folder vLLM serves.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import polars as pl
from prefect import flow, get_run_logger

import distillery
from distillery.hardware import resolve_dtype
from distillery.lineage import LineageRecorder
from distillery.model_setup import model_identity, resolve_model_path
from distillery.stages.reward_training import DEFAULT_L2, resolve_input, roc_auc, split_by_problem
from distillery.store import Store
from tasks.ingest import ingest_existing
from tasks.publish import publish_reward
from tasks.reward_training import fit_head, last_token_features, select_examples

PROMPT_COLUMN = "question"  # what the score stage renders as the user turn


def _fmt(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.3f}"


def _side_counts(frame: pl.DataFrame) -> dict:
    pos = int(frame["correct"].sum()) if frame.height else 0
    return {"pos": pos, "neg": frame.height - pos}


@flow(name="train_reward_model", log_prints=True)
def train_reward_model(
    input_uri: str,
    name: str,
    store: str = "store",
    heldout_fraction: float = 0.25,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    base_model: str = "embedded",
    batch_size: int = 8,
    dtype: str = "auto",
) -> str:
    """Train a reward-model head on a samples version; publish it as ``STORE/NAME/vNNNN``; return that URI.
    ``dtype``: the frozen body's (``auto``: bfloat16 on a CPU that has it natively, else float32)."""
    run_id = distillery.run_id()
    with LineageRecorder("train_reward_model", run_id, store, code_version=distillery.code_version()) as recorder:  # START; COMPLETE or FAIL
        return _train_reward_model(input_uri, name, store, heldout_fraction, seed, l2, base_model, batch_size, dtype, run_id, recorder)


def _train_reward_model(
    input_uri: str, name: str, store: str, heldout_fraction: float, seed: int, l2: float, base_model: str, batch_size: int, dtype: str, run_id: str, recorder: LineageRecorder
) -> str:
    logger = get_run_logger()
    dtype, dtype_reason = resolve_dtype(dtype, gpu=False)
    logger.info("features dtype: %s (%s)", dtype, dtype_reason)
    if not 0 < heldout_fraction < 1:
        msg = f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}"
        raise ValueError(msg)
    uri, input_manifest = resolve_input(input_uri)
    base = resolve_model_path(base_model)  # a missing model fails now, not after reading the data
    identity = model_identity(base)

    recorder.annotate(model=identity["name"])
    ingested = ingest_existing(uri, "completion", None, "auto")
    recorder.input(ingested.meta["parent"])
    logger.info("ingest: %d rows read from %s, %d kept, quarantined %s", ingested.count.rows_in, uri, ingested.kept.height, ingested.count.dropped or "none")
    selected = select_examples(ingested.kept)
    problems = selected.meta["problems"]
    logger.info(
        "select_examples: %d of %d rows are examples; problems used %d, skipped all-correct %d, all-incorrect %d, unlabeled %d; dropped %s",
        selected.count.rows_out, selected.count.rows_in, problems["used"], problems["all_correct"], problems["all_incorrect"], problems["unlabeled"], selected.count.dropped or "nothing",
    )
    if problems["used"] < 2:
        msg = (
            f"{uri}: {problems['used']} problem(s) with both correct and incorrect samples "
            f"(all correct: {problems['all_correct']}, all incorrect: {problems['all_incorrect']}, unlabeled: {problems['unlabeled']}); "
            "training needs problems with both correct and incorrect samples (at least 2: one to train on, one held out); "
            "run the recipe with verify.keep=all (and several samples per problem) so that wrong samples are published too"
        )
        raise ValueError(msg)

    examples = selected.kept.with_row_index("__i")
    train, heldout = split_by_problem(examples, heldout_fraction, seed)
    logger.info(
        "split (seed %d): %d train problems (%s), %d held-out problems (%s)",
        seed, train["seed_id"].n_unique(), _side_counts(train), heldout["seed_id"].n_unique(), _side_counts(heldout),
    )
    started = time.perf_counter()
    features = last_token_features(base, examples[PROMPT_COLUMN].to_list(), examples["completion"].to_list(), batch_size, dtype)
    logger.info("features: %d x %d in %.1fs", *features.shape, time.perf_counter() - started)
    labels = examples["correct"].to_numpy().astype(bool)
    train_idx, heldout_idx = train["__i"].to_numpy(), heldout["__i"].to_numpy()
    weight = fit_head(features[train_idx], labels[train_idx], l2, seed)
    logits = features @ weight
    auc_train, auc_heldout = roc_auc(logits[train_idx], labels[train_idx]), roc_auc(logits[heldout_idx], labels[heldout_idx])
    logger.info("ROC AUC: train %s (%d examples), held-out %s (%d examples)", _fmt(auc_train), len(train_idx), _fmt(auc_heldout), len(heldout_idx))

    side = np.full(examples.height, "train", dtype=object)
    side[heldout_idx] = "heldout"
    table = examples.select(
        pl.col("sample_id").cast(pl.Utf8),
        pl.col("seed_id").cast(pl.Utf8),
        pl.Series("split", side.tolist(), dtype=pl.Utf8),
        pl.col("correct"),
        pl.Series("logit", logits.astype(np.float64)),
        pl.Series("reward", 1 / (1 + np.exp(-logits.astype(np.float64)))),
    )
    hyperparameters = {
        "l2": l2,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "optimizer": "LBFGS (strong Wolfe), float64",
        "class_weighting": "balanced",
        "bias": False,
        "features": f"final hidden state after the final norm at the last token; transformers, CPU, {dtype}",
        "dtype": dtype,
        "prompt_column": PROMPT_COLUMN,
        "batch_size": batch_size,
    }
    recipe = {"name": "train-reward-model", "input": uri, "base_model": base_model, **hyperparameters}
    metrics = {"auc_train": auc_train, "auc_heldout": auc_heldout, "n": len(labels), "n_train": len(train_idx), "n_heldout": len(heldout_idx)}
    parent = ingested.meta["parent"]
    published = publish_reward(
        Store(store),
        name,
        weight,
        table,
        pl.concat([ingested.rejects, selected.rejects]),
        input_rows=ingested.count.rows_in,
        stages=[ingested.count, selected.count],
        run_id=run_id,
        metadata={
            "description": f"Reward model: a score head on {identity['name']} fitted on correct versus incorrect samples of {uri}.",
            "base_model": {"name": identity["name"], "sha256": identity["sha256"], "source": identity.get("source"), "path": base_model},
            "training_data": {"uri": uri, "dataset": input_manifest["dataset"], "version": input_manifest["version"], "rows": parent["rows"], "sha256": parent["sha256"]},
            "split": {
                "by": "problem (seed_id)",
                "heldout_fraction": heldout_fraction,
                "seed": seed,
                "problems": {"train": train["seed_id"].n_unique(), "heldout": heldout["seed_id"].n_unique()},
                "examples": {"train": _side_counts(train), "heldout": _side_counts(heldout)},
            },
            "metrics": metrics,
            "hyperparameters": hyperparameters,
            "parents": [parent],
            "recipe": recipe,
            "recipe_hash": hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest(),
            "code_version": distillery.code_version(),
            "generator": {"model": identity["name"], "engine": f"transformers (CPU, {dtype}), frozen body + fitted score head", "dtype": dtype, "dtype_reason": dtype_reason},
            "flow_run_id": run_id,
            "stats": {
                "auc_train": auc_train,
                "auc_heldout": auc_heldout,
                "examples": len(labels),
                "problems_used": problems["used"],
                "problems_skipped_all_correct": problems["all_correct"],
                "problems_skipped_all_incorrect": problems["all_incorrect"],
                "problems_skipped_unlabeled": problems["unlabeled"],
            },
        },
    )
    recorder.annotate(recipe_hash=published.manifest["recipe_hash"])
    recorder.output(published, [ingested.count, selected.count], schema=table.schema)
    logger.info("published %s: reward model, %d examples, held-out AUC %s", published.uri, metrics["n"], _fmt(auc_heldout))
    return published.uri
