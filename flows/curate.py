"""The ``curate`` flow: an existing data set through ingest -> quality -> decontaminate -> dedup -> publish.

The input is read ``shard_rows`` rows at a time (``ingest.IngestBatches``), and each shard goes
down the curation path both flows share (``flows/curation.py``: quality and decontamination per
shard, dedup over the spilled shards, publish from local parts), so memory is bounded by a shard,
not by the input (a million rows or a hundred million). Rows are published in input order. The
spill folder is removed at the end.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
from prefect import flow
from prefect.utilities.annotations import quote

import distillery
from distillery.accounting import StageCount
from distillery.engine import start_ray
from distillery.formats import with_split
from distillery.lineage import LineageRecorder
from distillery.logs import run_logger
from distillery.stages.ingest import IngestBatches, conform
from distillery.stages.publish import Published
from distillery.store import Store
from flows.curation import Curation, Output, Rejects, identity
from schemas.recipe import CurateRecipe

SHARD_ROWS = 100_000  # input rows read, filtered and spilled at a time: what bounds curate's memory


@flow(name="curate", log_prints=True)
def curate(recipe: CurateRecipe, input_uri: str, store: str = "store", shard_rows: int = SHARD_ROWS) -> str:
    """Curate an existing data set (file or published version) and publish it as a new version."""
    run_id = distillery.run_id()
    recorder = LineageRecorder("curate", run_id, store, recipe_hash=recipe.hash(), code_version=distillery.code_version(), description=recipe.description)
    with recorder:  # OpenLineage: START now; stage events and COMPLETE after publish, FAIL if this raises
        if os.environ.get("RAY_ADDRESS"):
            start_ray()  # the cluster the user named; a local one starts only for signature tasks (tasks/dedup.py)
        published, stages, parent, schema = curate_in_shards(recipe, input_uri, store, run_id, shard_rows=shard_rows)
        recorder.input(parent)
        recorder.output(published, stages, schema=schema)
        return published.uri


def plain(t: Callable) -> Callable:
    """A Prefect task's own function (arguments in ``quote`` unwrapped): the flow's steps without
    Prefect, for tests."""

    def call(*args, **kwargs):
        unwrap = lambda v: v.unquote() if isinstance(v, quote) else v  # noqa: E731
        return t.fn(*map(unwrap, args), **{k: unwrap(v) for k, v in kwargs.items()})

    return call


def curate_in_shards(
    recipe: CurateRecipe,
    input_uri: str,
    store: str,
    run_id: str,
    *,
    shard_rows: int = SHARD_ROWS,
    spill_root: str | None = None,
    task: Callable = identity,
) -> tuple[Published, list[StageCount], dict, pl.Schema]:
    """ingest -> quality -> decontaminate per shard, dedup over the spilled shards, publish.

    Returns the version, the stage counts, the input's ``parent`` record and the published
    schema. Spill files live in a temporary folder under ``spill_root`` (the system's temporary
    folder by default), removed when this returns or fails. ``task`` picks how a Prefect task is
    called: as a task (the flow), or :func:`plain` to run the plain functions (tests).
    """
    logger = run_logger("distillery.curate")
    text = recipe.text_column
    with tempfile.TemporaryDirectory(prefix="distillery-curate-", dir=spill_root) as tmp:
        spill = Path(tmp)
        batches = IngestBatches(input_uri, text_column=text, id_column=recipe.id_column, fmt=recipe.format, batch_rows=shard_rows)
        rejects = Rejects(spill / "rejects")
        curation = Curation(
            spill, text_column=text, quality=recipe.quality, decontamination=recipe.decontaminate, dedup_cfg=recipe.dedup, rejects=rejects, task=task
        )
        ingested: list[StageCount] = []
        seed_files: list[Path] = []  # the input's texts, for the collapse statistics

        for k, shard in enumerate(batches):  # ingest -> quality -> decontaminate, shard by shard
            ingested.append(shard.count)
            rejects.add(shard.rejects)
            seed_files.append(spill / "seeds" / f"{k:05d}.arrow")
            seed_files[-1].parent.mkdir(exist_ok=True)
            shard.kept.select(pl.col(text).cast(pl.Utf8)).write_ipc(seed_files[-1])
            results = curation.add(shard.kept)
            logger.info("shard %d: %s", k, ", ".join(f"{r.stage} {r.count.rows_in} -> {r.count.rows_out}" for r in [shard, *results]))
        curation.dedup()  # dedup over every shard's spilled hash buckets
        logger.info("dedup buckets: %s", curation.deduper.stats)
        stages = [StageCount.combine(ingested), *curation.stages()]
        for s in stages:
            logger.info("%s: %d -> %d rows, dropped %s", s.stage, s.rows_in, s.rows_out, s.dropped or "nothing")

        schema = batches.schema
        share = recipe.publish.test_share
        if share > 0:  # a problem-level split, as distillery run's (distillery/formats.py)
            if "split" in schema:
                msg = "publish.test_share: the input already has a `split` column; drop one or the other"
                raise ValueError(msg)
            schema = {**schema, "split": pl.Utf8}
        output = Output(spill / "publish", recipe.publish.shard_rows, contract="curated", schema=schema)
        for kept, signatures in curation.kept():  # the shards again, as local Parquet parts
            output.add(conform(with_split(kept, share) if share > 0 else kept, schema), signatures)
        collapse = output.collapse(text, lambda: _texts(seed_files, text), recipe.collapse)
        published = output.publish(
            Store(store),
            recipe.dataset,
            rejects,
            input_rows=stages[0].rows_in,
            stages=stages,
            run_id=run_id,
            dedup_cfg=recipe.dedup if curation.deduper.n else None,
            task=task,
            metadata={
                "description": recipe.description,
                "kind": "curated",
                "parents": [batches.parent],
                "recipe": recipe.resolved(),
                "recipe_hash": recipe.hash(),
                "code_version": distillery.code_version(),
                "generator": {"model": None, "engine": None, "text_column": text},
                "flow_run_id": run_id,
                "stats": {"collapse": collapse, **curation.metadata()},
            },
        )
        curation.close()
    logger.info("published %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published, stages, batches.parent, pl.Schema(schema)


def _texts(paths: list[Path], column: str):
    for path in paths:
        yield from pl.read_ipc(path, columns=[column])[column].to_list()
