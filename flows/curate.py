"""The ``curate`` flow: an existing data set through quality -> decontaminate -> dedup -> publish.

``curation_stages`` is the same sequence the ``synthesize`` flow runs after verification, so a
data set curated on its own and one made by synthesis are filtered by the same code.
"""

from __future__ import annotations

import time

import polars as pl
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

import distillery
from distillery.accounting import StageResult
from distillery.engine import start_ray
from distillery.lineage import LineageRecorder
from distillery.stages.collapse import check_gate, collapse_report
from distillery.stages.dedup import signature_params
from distillery.store import Store
from schemas.recipe import CollapseConfig, CurateRecipe, DecontaminationConfig, DedupConfig, QualityConfig
from tasks.decontaminate import decontaminate
from tasks.dedup import dedup
from tasks.ingest import ingest_existing
from tasks.publish import publish
from tasks.quality import quality as quality_task


def curation_stages(
    rows: pl.DataFrame, *, quality: QualityConfig, decontamination: DecontaminationConfig, dedup_cfg: DedupConfig, text_column: str
) -> list[StageResult]:
    """quality -> decontaminate (when benchmarks are named) -> dedup; each stage gets what the last kept."""
    results = [quality_task(rows, quality.model_copy(update={"column": text_column}))]
    if decontamination.benchmarks:
        results.append(decontaminate(results[-1].kept, decontamination))
    current = results[-1].kept
    results.append(dedup(current, dedup_cfg, text_column) if current.height else StageResult.empty("dedup"))
    return results


def collapse_statistics(output_texts: list[str], seed_texts: list[str], cfg: CollapseConfig) -> dict:
    """n-gram statistics of the output against its seeds; raises if the recipe's gate fails."""
    report = collapse_report(output_texts, seed_texts, cfg)
    check_gate(report)
    return report


def curation_metadata(results: list[StageResult]) -> dict:
    """What the curation stages tell the manifest: contamination hits per benchmark, dedup targets."""
    meta: dict = {}
    for r in results:
        if "contamination_hits" in r.meta:
            meta["contamination_hits"] = r.meta["contamination_hits"]
        if "against" in r.meta:
            meta["dedup_against"] = r.meta["against"]
    return meta


@flow(name="curate", log_prints=True)
def curate(recipe: CurateRecipe, input_uri: str, store: str = "store") -> str:
    """Curate an existing data set (file or published version) and publish it as a new version."""
    run_id = str(flow_run.get_id() or f"local-{time.time_ns()}")
    recorder = LineageRecorder("curate", run_id, store, recipe_hash=recipe.hash(), code_version=distillery.code_version(), description=recipe.description)
    with recorder:  # OpenLineage: START now; stage events and COMPLETE after publish, FAIL if this raises
        return _curate(recipe, input_uri, store, run_id, recorder)


def _curate(recipe: CurateRecipe, input_uri: str, store: str, run_id: str, recorder: LineageRecorder) -> str:
    logger = get_run_logger()
    start_ray()  # signatures fan out over Ray workers
    ingested = ingest_existing(input_uri, recipe.text_column, recipe.id_column, recipe.format)
    recorder.input(ingested.meta["parent"])
    logger.info("ingest: %d rows read, %d kept, quarantined %s", ingested.count.rows_in, ingested.kept.height, ingested.count.dropped or "none")
    results = curation_stages(
        ingested.kept, quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, text_column=recipe.text_column
    ) if ingested.kept.height else [StageResult.empty("quality"), StageResult.empty("dedup")]
    for r in results:
        logger.info("%s: %d -> %d rows, dropped %s", r.stage, r.count.rows_in, r.count.rows_out, r.count.dropped or "nothing")
    final = results[-1]
    rows = final.kept if final.kept.height else ingested.kept.clear()
    texts_in = ingested.kept[recipe.text_column].to_list() if ingested.kept.height else []
    collapse = collapse_statistics(rows[recipe.text_column].to_list() if rows.height else [], texts_in, recipe.collapse)
    published = publish(
        Store(store),
        recipe.dataset,
        rows,
        pl.concat([ingested.rejects, *[r.rejects for r in results]]),
        input_rows=ingested.count.rows_in,
        stages=[ingested.count, *[r.count for r in results]],
        run_id=run_id,
        shard_rows=recipe.publish.shard_rows,
        contract="curated",
        signatures=final.meta.get("signatures"),
        signature_params=signature_params(recipe.dedup),
        metadata={
            "description": recipe.description,
            "kind": "curated",
            "parents": [ingested.meta["parent"]],
            "recipe": recipe.resolved(),
            "recipe_hash": recipe.hash(),
            "code_version": distillery.code_version(),
            "generator": {"model": None, "engine": None, "text_column": recipe.text_column},
            "flow_run_id": run_id,
            "stats": {"collapse": collapse, **curation_metadata(results)},
        },
    )
    recorder.output(published, [ingested.count, *[r.count for r in results]], schema=rows.schema)
    logger.info("published %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published.uri
