"""Curation: the one path from a flow's rows to a published version, shard by shard.

Both flows (``distillery run``'s ``synthesize`` and ``distillery curate``) hand their rows to
this tail, one shard at a time, and both publish through it:

1. ``Curation.add`` (per shard): quality -> decontaminate (when the recipe names benchmarks);
   the survivors, their MinHash signatures (on Ray workers) and their dedup hash records are
   spilled to a local folder (``dedup.ShardedDedup``);
2. ``Curation.dedup``: exact and near duplicates over every shard, bucket by bucket;
3. ``Curation.kept`` (per shard, in the order added): the shard's rows that dedup kept, with
   their signatures; dedup's rejects are spilled. The flow runs its own per-shard stages on them
   (``synthesize``: select and preference pairs) and hands the rows it publishes to ``Output``;
4. ``Output.publish``: the model-collapse statistics over the written parts against the seeds
   (``collapse.collapse_report``), then ``publish.publish_parts``: the parts copied into a new
   version, plots, card, and the manifest last.

Memory is one shard (plus what ``dedup.ShardedDedup`` keeps per duplicate): a run of ten million
rows holds what a run of ten thousand holds. Rejects are spilled per stage (``Rejects``) and
published in the order of the manifest's stages.

Output order (both flows): rows are published in the order they were added, shard after shard
(``curate``: the input's order; ``synthesize``: the problems' order, each problem's samples by
``sample_index``), less what the stages dropped. A row's place never depends on the shard size,
on which shard finished first, or on the keep policy (which decides only which duplicate stays).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
from prefect.utilities.annotations import quote

from distillery.accounting import REJECT_SCHEMA, StageCount, StageResult
from distillery.contracts import load_contract
from distillery.stages.collapse import check_gate, collapse_report
from distillery.stages.dedup import ShardedDedup, signature_params
from distillery.stages.publish import PartWriter, Published
from distillery.store import Store
from schemas.recipe import CollapseConfig, DecontaminationConfig, DedupConfig, QualityConfig
from tasks.decontaminate import benchmark_index, decontaminate
from tasks.dedup import dedup, load_against, ray_signatures
from tasks.publish import publish
from tasks.quality import quality as quality_task

SIGNATURE_SCHEMA = {"sample_id": pl.Utf8, "text_sha256": pl.Utf8, "minhash": pl.List(pl.UInt32)}


def identity(t: Callable) -> Callable:
    return t


class Rejects:
    """Every stage's rejects, spilled as they come, read back in the order of the stages."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files: dict[str, list[Path]] = {}
        self.rows = 0

    def add(self, rejects: pl.DataFrame) -> None:
        """Rejects of one or more stages (their ``stage`` column says which)."""
        if not rejects.height:
            return
        for (stage,), part in rejects.group_by("stage", maintain_order=True):
            files = self.files.setdefault(stage, [])
            path = self.folder / f"{list(self.files).index(stage):03d}-{len(files):06d}.arrow"
            path.parent.mkdir(parents=True, exist_ok=True)
            part.select(pl.col(c).cast(t) for c, t in REJECT_SCHEMA.items()).write_ipc(path)
            files.append(path)
            self.rows += part.height

    def frames(self, stages: list[str]) -> Iterator[pl.DataFrame]:
        """The spilled rejects, stage by stage in ``stages`` order (then any other stage)."""
        for stage in [*dict.fromkeys(stages), *(s for s in self.files if s not in stages)]:
            for path in self.files.get(stage, []):
                yield pl.read_ipc(path)


class Curation:
    """quality -> decontaminate per shard, dedup over the spilled shards (see the module doc).

    ``task`` picks how a Prefect task is called: as a task (in a flow), or ``plain`` (its
    function; tests that run the path without Prefect).
    """

    def __init__(
        self,
        spill: Path,
        *,
        text_column: str,
        quality: QualityConfig,
        decontamination: DecontaminationConfig,
        dedup_cfg: DedupConfig,
        rejects: Rejects,
        task: Callable = identity,
    ) -> None:
        self.text, self.task, self.rejects = text_column, task, rejects
        self.quality_cfg = quality.model_copy(update={"column": text_column})
        self.decon_cfg, self.dedup_cfg = decontamination, dedup_cfg
        self.index = task(benchmark_index)(decontamination) if decontamination.benchmarks else None
        self.earlier = task(load_against)(dedup_cfg)
        self.deduper = ShardedDedup(dedup_cfg, text_column, Path(spill) / "dedup", earlier=self.earlier)
        self.signature_fn = ray_signatures(dedup_cfg)
        self.counts: dict[str, list[StageCount]] = {"quality": [], "decontaminate": []}
        self.hits: dict[str, int] = {}
        self.dedup_count: StageCount | None = None

    def add(self, rows: pl.DataFrame) -> list[StageResult]:
        """One shard through quality and decontamination, its survivors spilled for dedup."""
        results = [self.task(quality_task)(rows, self.quality_cfg)]
        if self.decon_cfg.benchmarks:
            results.append(self.task(decontaminate)(results[-1].kept, self.decon_cfg, quote(self.index)))
            for name, n in results[-1].meta["contamination_hits"].items():
                self.hits[name] = self.hits.get(name, 0) + n
        for r in results:
            self.counts[r.stage].append(r.count)
            self.rejects.add(r.rejects)
        survivors = results[-1].kept
        texts = survivors[self.text].cast(pl.Utf8).fill_null("") if survivors.height else None
        self.deduper.add_shard(survivors, self.signature_fn(texts) if survivors.height else None)
        return results

    def dedup(self) -> StageCount:
        """Find every duplicate among the spilled shards (the ``dedup`` task)."""
        self.dedup_count = self.task(dedup)(quote(self.deduper))
        return self.dedup_count

    def kept(self) -> Iterator[tuple[pl.DataFrame, pl.DataFrame]]:
        """Each shard's rows that dedup kept and their signature table, in the order added."""
        for k in range(len(self.deduper.shards)):
            kept, dropped, signatures = self.deduper.split(k)
            self.rejects.add(dropped)
            yield kept, signatures

    @property
    def received(self) -> int:
        return sum(c.rows_in for c in self.counts["quality"])

    def stages(self) -> list[StageCount]:
        """quality, decontaminate (when benchmarks are named and rows reached it), dedup."""
        stages = [StageCount.combine(self.counts["quality"]) if self.counts["quality"] else StageCount("quality", 0, 0)]
        if self.decon_cfg.benchmarks and self.received:
            stages.append(StageCount.combine(self.counts["decontaminate"]))
        return [*stages, self.dedup_count or StageCount("dedup", 0, 0)]

    def metadata(self) -> dict:
        """What curation tells the manifest's stats: contamination hits, the dedup targets."""
        meta: dict = {}
        if self.decon_cfg.benchmarks and self.received:
            meta["contamination_hits"] = self.hits
        if self.deduper.n:
            meta["dedup_against"] = [e.uri for e in self.earlier]
        return meta

    def close(self) -> None:
        self.deduper.close()


class Output:
    """The parts of one version being written: data (checked against ``contract``), signatures."""

    def __init__(self, folder: Path, shard_rows: int, *, contract: str, schema: dict | None = None, signatures: bool = True) -> None:
        self.folder = Path(folder)
        schema = schema or dict(load_contract(contract).empty_frame().schema)  # the columns of a version with no rows
        self.data = PartWriter(self.folder, "data", shard_rows, schema=schema, contract=contract)
        self.signatures = PartWriter(self.folder, "signatures", shard_rows, schema=SIGNATURE_SCHEMA) if signatures else None
        self.shard_rows = shard_rows
        self.schema: dict | None = None  # of the first rows added: the published schema

    @property
    def published_schema(self) -> pl.Schema:
        return pl.Schema(self.schema or self.data.schema)

    def add(self, rows: pl.DataFrame, signatures: pl.DataFrame | None = None) -> None:
        if rows.height:
            self.data.add(rows)
            self.schema = self.schema or dict(rows.schema)
        if self.signatures is not None and signatures is not None:
            self.signatures.add(signatures)

    def texts(self, column: str) -> Callable[[], Iterator[str | None]]:
        """The published rows' ``column``, read back part by part (for the collapse statistics)."""

        def read() -> Iterator[str | None]:
            for part in self.data.parts:
                yield from pl.read_parquet(self.data.folder / part["path"].split("/", 1)[1], columns=[column])[column].to_list()

        return read

    def collapse(self, column: str, seed_texts, cfg: CollapseConfig) -> dict:
        """The collapse report of the written rows against the seeds; raises if its gate fails."""
        self.data.close()
        report = collapse_report(self.texts(column) if self.data.rows else [], seed_texts, cfg, workdir=self.folder)
        check_gate(report)
        return report

    def publish(
        self,
        store: Store,
        dataset: str,
        rejects: Rejects,
        *,
        input_rows: int,
        stages: list[StageCount],
        run_id: str,
        metadata: dict,
        dedup_cfg: DedupConfig | None = None,
        task: Callable = identity,
    ) -> Published:
        """The version: parts copied, plots, card, manifest last (the ``publish`` task). The
        signatures go with it when ``dedup_cfg`` (the parameters they were made with) is given."""
        self.data.close()
        reject_parts = PartWriter(self.folder, "rejects", self.shard_rows, schema=REJECT_SCHEMA)
        for frame in rejects.frames([s.stage for s in stages]):
            reject_parts.add(frame)
        reject_parts.close()
        signatures = None
        if self.signatures is not None and dedup_cfg is not None:
            self.signatures.close()
            signatures = self.signatures
        return task(publish)(
            store,
            dataset,
            self.data,
            reject_parts,
            input_rows=input_rows,
            stages=stages,
            run_id=run_id,
            metadata=metadata,
            signatures=signatures,
            signature_params=signature_params(dedup_cfg) if signatures is not None else None,
        )
