"""The ``curate`` flow: an existing data set through quality -> decontaminate -> dedup -> publish.

``curation_stages`` is the same sequence the ``synthesize`` flow runs after verification, so a
data set curated on its own and one made by synthesis are filtered by the same code.

``distillery curate`` runs the same stages in shards (:func:`curate_in_shards`), so that its
memory is bounded by a shard, not by the input (a million rows or a hundred million):

1. ingest, quality and decontaminate, shard by shard (``SHARD_ROWS`` input rows at a time;
   ``distillery.stages.ingest_batches``); each shard's survivors, their MinHash signatures (on
   Ray workers) and their dedup hash records are spilled to a local temporary folder;
2. dedup, bucket by bucket over the spilled records (``distillery.stages.dedup_external``);
   the model-collapse statistics are counted the same way (``distillery.stages.collapse_external``);
3. publish: the shards are read back once, the duplicates become rejects, and the kept rows, the
   rejects and the signatures are written as Parquet parts (``publish.PartWriter``), then copied
   into a new version with the manifest last (``publish.publish_parts``).

The published version is the one the in-memory stages make of the whole input (same rows, same
rejects, same counts: ``tests/flows/test_curate_streaming.py``). The spill folder is removed at the end.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
from prefect import flow
from prefect.utilities.annotations import quote

import distillery
from distillery.accounting import REJECT_SCHEMA, StageCount, StageResult
from distillery.engine import start_ray
from distillery.lineage import LineageRecorder
from distillery.logs import run_logger
from distillery.stages.collapse import check_gate, collapse_report
from distillery.stages.collapse_external import collapse_report_sharded
from distillery.stages.dedup import signature_params
from distillery.stages.dedup_external import ExternalDedup
from distillery.stages.ingest_batches import IngestBatches, conform
from distillery.stages.publish import PartWriter, Published
from distillery.store import Store
from schemas.recipe import CollapseConfig, CurateRecipe, DecontaminationConfig, DedupConfig, QualityConfig
from tasks.decontaminate import benchmark_index, decontaminate, decontaminate_shard
from tasks.dedup import dedup, dedup_duplicates, load_against, ray_signatures
from tasks.publish import publish_shards
from tasks.quality import quality as quality_task

SHARD_ROWS = 100_000  # input rows read, filtered and spilled at a time: what bounds curate's memory
CURATION_STAGES = ("quality", "decontaminate", "dedup")


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


def collapse_statistics(output_texts, seed_texts, cfg: CollapseConfig) -> dict:
    """n-gram statistics of the output against its seeds (lists or iterables, read once each);
    raises if the recipe's gate fails."""
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
def curate(recipe: CurateRecipe, input_uri: str, store: str = "store", shard_rows: int = SHARD_ROWS) -> str:
    """Curate an existing data set (file or published version) and publish it as a new version."""
    run_id = distillery.run_id()
    recorder = LineageRecorder("curate", run_id, store, recipe_hash=recipe.hash(), code_version=distillery.code_version(), description=recipe.description)
    with recorder:  # OpenLineage: START now; stage events and COMPLETE after publish, FAIL if this raises
        start_ray()  # signatures fan out over Ray workers
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


class _StageRejects:
    """Each stage's rejects, spilled shard by shard, read back in stage order for publishing
    (the order ``publish_version`` gets them in: ingest's, then quality's, ...)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, list[Path]] = {}

    def add(self, stage: str, rejects: pl.DataFrame) -> None:
        if rejects.height:
            files = self.files.setdefault(stage, [])
            path = self.folder / f"{stage}-{len(files):05d}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            rejects.write_ipc(path)
            files.append(path)

    def __iter__(self) -> Iterator[pl.DataFrame]:
        for stage in ("ingest", *CURATION_STAGES):
            for path in self.files.get(stage, []):
                yield pl.read_ipc(path)


def _texts(paths: list[Path], column: str) -> Iterator[str]:
    for path in paths:
        frame = pl.read_parquet(path, columns=[column]) if path.suffix == ".parquet" else pl.read_ipc(path, columns=[column])
        yield from frame[column].to_list()


def curate_in_shards(
    recipe: CurateRecipe,
    input_uri: str,
    store: str,
    run_id: str,
    *,
    shard_rows: int = SHARD_ROWS,
    spill_root: str | None = None,
    task: Callable = lambda t: t,
) -> tuple[Published, list[StageCount], dict, pl.Schema]:
    """ingest -> quality -> decontaminate per shard, dedup over the spilled shards, publish.

    Returns the version, the stage counts, the input's ``parent`` record and the published
    schema. Spill files live in a temporary folder under ``spill_root`` (the system's temporary
    folder by default), removed when this returns or fails. ``task`` picks how a Prefect task is
    called: as a task (the flow), or :func:`plain` to run the plain functions (tests).
    """
    logger = run_logger("distillery.curate")
    text = recipe.text_column
    quality_cfg = recipe.quality.model_copy(update={"column": text})
    decon_cfg, dedup_cfg = recipe.decontaminate, recipe.dedup
    with tempfile.TemporaryDirectory(prefix="distillery-curate-", dir=spill_root) as tmp:
        spill = Path(tmp)
        batches = IngestBatches(input_uri, text_column=text, id_column=recipe.id_column, fmt=recipe.format, batch_rows=shard_rows)
        index = task(benchmark_index)(decon_cfg) if decon_cfg.benchmarks else None
        earlier = task(load_against)(dedup_cfg)
        spilled = ExternalDedup(dedup_cfg, text, spill / "dedup", earlier=earlier)
        signature_fn = ray_signatures(dedup_cfg)
        rejects = _StageRejects(spill / "rejects")
        counts: dict[str, list[StageCount]] = {"ingest": [], **{s: [] for s in CURATION_STAGES}}
        hits: dict[str, int] = {}
        seed_files: list[Path] = []

        # 1. ingest, quality, decontaminate, shard by shard; dedup's hashes and signatures spilled
        for k, ingested in enumerate(batches):
            results = [ingested, task(quality_task)(ingested.kept, quality_cfg)]
            if decon_cfg.benchmarks:
                results.append(task(decontaminate_shard)(results[-1].kept, decon_cfg, quote(index)))
                for name, n in results[-1].meta["contamination_hits"].items():
                    hits[name] = hits.get(name, 0) + n
            for r in results:
                counts[r.stage].append(r.count)
                rejects.add(r.stage, r.rejects)
            seed_files.append(spill / "seeds" / f"{k:05d}.arrow")
            seed_files[-1].parent.mkdir(exist_ok=True)
            ingested.kept.select(pl.col(text).cast(pl.Utf8)).write_ipc(seed_files[-1])
            survivors = results[-1].kept
            spilled.add_shard(survivors, signature_fn(survivors[text].cast(pl.Utf8).fill_null("")) if survivors.height else None)
            logger.info("shard %d: %s", k, ", ".join(f"{r.stage} {r.count.rows_in} -> {r.count.rows_out}" for r in results))
        ingest = StageCount.combine(counts["ingest"])
        stages = [ingest, StageCount.combine(counts["quality"])]
        if decon_cfg.benchmarks and ingest.rows_out:  # as the in-memory flow: no rows, no decontaminate stage
            stages.append(StageCount.combine(counts["decontaminate"]))

        # 2. dedup over the spilled hash buckets
        dedup_count = task(dedup_duplicates)(quote(spilled))
        stages.append(dedup_count)
        logger.info("dedup buckets: %s", spilled.stats)
        for s in stages:
            logger.info("%s: %d -> %d rows, dropped %s", s.stage, s.rows_in, s.rows_out, s.dropped or "nothing")

        # 3. the shards again: kept rows, rejects and signatures as local Parquet parts
        out = spill / "publish"
        schema = batches.schema
        data = PartWriter(out, "data", recipe.publish.shard_rows, schema=schema, contract="curated")
        signatures = PartWriter(out, "signatures", recipe.publish.shard_rows, schema={"sample_id": pl.Utf8, "text_sha256": pl.Utf8, "minhash": pl.List(pl.UInt32)})
        for k in range(len(spilled.shards)):
            kept, dropped, table = spilled.split(k)
            data.add(conform(kept, schema))
            rejects.add("dedup", dropped)
            signatures.add(table)
        data.close()
        signatures.close()
        reject_parts = PartWriter(out, "rejects", recipe.publish.shard_rows, schema=REJECT_SCHEMA)
        for frame in rejects:
            reject_parts.add(frame)
        reject_parts.close()
        spilled.close()

        data_files = [data.folder / p["path"].split("/", 1)[1] for p in data.parts] if data.rows else []
        collapse = collapse_report_sharded(lambda: _texts(data_files, text), lambda: _texts(seed_files, text), recipe.collapse, spill / "collapse")
        check_gate(collapse)
        stats: dict = {"collapse": collapse}
        if decon_cfg.benchmarks and ingest.rows_out:
            stats["contamination_hits"] = hits
        if spilled.n:
            stats["dedup_against"] = [e.uri for e in earlier]
        published = task(publish_shards)(
            Store(store),
            recipe.dataset,
            data,
            reject_parts,
            input_rows=ingest.rows_in,
            stages=stages,
            run_id=run_id,
            signatures=signatures if spilled.n else None,
            signature_params=signature_params(dedup_cfg),
            metadata={
                "description": recipe.description,
                "kind": "curated",
                "parents": [batches.parent],
                "recipe": recipe.resolved(),
                "recipe_hash": recipe.hash(),
                "code_version": distillery.code_version(),
                "generator": {"model": None, "engine": None, "text_column": text},
                "flow_run_id": run_id,
                "stats": stats,
            },
        )
    logger.info("published %s: %d rows", published.uri, published.manifest["counts"]["published"])
    return published, stages, batches.parent, pl.Schema(schema)
