"""Publish: Parquet shards, rejects, PNG plots and a data card, then ``manifest.json`` last.

Before anything is written the published table is checked against its data contract and the
stage counts are checked to add up; either failing stops the publish with nothing visible.
A publish that fails after claiming its version (a full disk, a lost connection) removes what it
wrote of that version, all but the claim (``_discard_partial``), so a failed run leaves neither a
visible version nor its parts; the claimed number is never reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
import pyarrow.parquet as pq

from distillery.accounting import AccountingError, StageCount
from distillery.contracts import load_contract
from distillery.faults import failpoint
from distillery.store import Store

SCHEMA_VERSION = 1
PLOTS_DIR = "plots"

log = logging.getLogger(__name__)


@contextmanager
def _discarded_on_failure(store: Store, base: str) -> Iterator[None]:
    """Whatever goes wrong inside, remove what was written under ``base`` (a claimed version)."""
    try:
        yield
    except Exception:
        _discard_partial(store, base)
        raise


def _discard_partial(store: Store, base: str) -> None:
    """Best effort: delete every object under ``base`` but its ``_claim`` (itself kept, so the
    number stays taken). A delete that fails too (the store is gone) is logged, not raised."""
    from pathlib import Path

    from distillery.uri_io import is_s3, s3_client

    try:
        if is_s3(store.root):
            prefix = f"{store.prefix}{base}/"
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if obj["Key"] != prefix + "_claim":
                        s3_client().delete_object(Bucket=store.bucket, Key=obj["Key"])
            return
        folder = Path(store.root, base)
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()
            elif path != folder / "_claim":
                path.unlink(missing_ok=True)
    except Exception as exc:  # never hide the error that caused the discard
        log.warning("could not remove the partial version %s: %s", store.uri(base), exc)


@dataclass(frozen=True)
class Published:
    uri: str
    manifest: dict


def check_counts(input_rows: int, stages: list[StageCount], published: int) -> None:
    """The manifest's invariant: each stage adds up, and the stages chain from input to published."""
    if not stages:
        raise AccountingError("no stages")
    for stage in stages:
        stage.check()
    if stages[0].rows_in != input_rows:
        raise AccountingError(f"first stage {stages[0].stage!r} took {stages[0].rows_in} rows, input was {input_rows}")
    for before, after in zip(stages, stages[1:]):
        if before.rows_out != after.rows_in:
            raise AccountingError(f"stage {before.stage!r} passed on {before.rows_out} rows but {after.stage!r} took {after.rows_in}")
    if stages[-1].rows_out != published:
        raise AccountingError(f"last stage {stages[-1].stage!r} passed on {stages[-1].rows_out} rows, {published} published")


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(frame.to_arrow(), buffer, compression="zstd")
    return buffer.getvalue()


def _write_shards(store: Store, prefix: str, frame: pl.DataFrame, shard_rows: int) -> list[dict]:
    """``frame`` as the parts of ``prefix`` (``NAME/vNNNN/data``, ...), through a ``PartWriter``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distillery-parts-") as tmp:
        writer = PartWriter(tmp, prefix.rsplit("/", 1)[1], shard_rows, schema=dict(frame.schema))
        writer.add(frame)
        writer.close()
        return _copy_parts(store, prefix.rsplit("/", 1)[0], writer)


def _copy_parts(store: Store, base: str, writer: PartWriter) -> list[dict]:
    """Copy a closed ``PartWriter``'s parts under ``base`` (a claimed version); their entries."""
    for part in writer.parts:
        store.put(f"{base}/{part['path']}", (writer.folder / part["path"].split("/", 1)[1]).read_bytes())
    return writer.parts


def read_shards(store: Store, manifest: dict, kind: str = "shards") -> pl.DataFrame:
    """Read a version's shards (``shards``, ``reject_shards`` or ``signatures``), checking each sha256."""
    listing = manifest[kind]["shards"] if kind == "signatures" else manifest[kind]
    frames = [read_shard(store, manifest, shard) for shard in listing]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def read_shard(store: Store, manifest: dict, shard: dict) -> pl.DataFrame:
    """One shard of a version (an entry of its manifest's ``shards``), its sha256 checked."""
    key = f"{manifest['dataset']}/{manifest['version']}/{shard['path']}"
    data = store.get(key)
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        msg = f"{store.uri(key)}: checksum mismatch (the shard changed after publishing)"
        raise ValueError(msg)
    return pl.read_parquet(io.BytesIO(data))


def render_card(manifest: dict) -> str:
    """The data card (``card.md``, and what ``distillery datasets show`` prints) of any kind of version."""
    if manifest.get("kind") == "reward-model":
        lines = _reward_model_card_lines(manifest)
    else:
        recipe_name = (manifest.get("recipe") or {}).get("name")
        generator = manifest.get("generator") or {}
        lines = [
            f"# {manifest['dataset']} {manifest['version']}",
            "",
            manifest.get("description") or "",
            "",
            f"- created: {manifest['created_at']}",
            f"- recipe: `{recipe_name}` (sha256 `{(manifest.get('recipe_hash') or '')[:12]}`)",
            f"- code: `{manifest.get('code_version')}`",
            f"- model: `{generator.get('model')}` on {generator.get('engine')}",
            f"- parents: {', '.join(p['uri'] for p in manifest.get('parents', [])) or 'none'}",
        ]
        if manifest.get("kind"):
            lines.append(f"- kind: {manifest['kind']}")
        scorer = manifest.get("scorer") or {}
        if scorer.get("method", "none") != "none":
            lines.append(f"- scored by: {scorer['method']}" + (f" (`{scorer['reward_model']}`)" if scorer.get("reward_model") else ""))
        selection = manifest.get("selection")
        if selection and (selection.get("policy") != "all" or selection.get("difficulty") != "any"):
            lines.append(f"- selection: {selection['policy']} on `{selection['label']}`, difficulty {selection['difficulty']}")
        for name, uri in (manifest.get("companions") or {}).items():
            lines.append(f"- {name.replace('_', ' ')}: {uri}")
        lines.append("")
    return "\n".join(lines + _accounting_lines(manifest) + _coverage_lines(manifest) + _plot_lines(manifest))


def _coverage_lines(manifest: dict) -> list[str]:
    """Taxonomy-driven runs: sessions, problems and published samples per taxonomy node."""
    nodes = (manifest.get("stats") or {}).get("taxonomy_coverage")
    if not nodes:
        return []
    lines = ["", "## Coverage per taxonomy node", "", "| node | level | sessions | problems | published samples |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {n['level']} | {n['sessions']} | {n['problems']} | {n['published_samples']} |" for name, n in nodes.items()]
    uncovered = [name for name, n in nodes.items() if n["level"] == "subject" and not n["covered"]]
    lines += ["", f"Subjects with no published sample: {', '.join(uncovered)}." if uncovered else "Every subject has published samples.", ""]
    return lines


def _plot_lines(manifest: dict) -> list[str]:
    """``## Plots``: an image link (relative to the card) per PNG, and the plots that failed."""
    plots, skipped = manifest.get("plots") or [], manifest.get("plots_skipped") or []
    if not plots and not skipped:
        return []
    lines = ["## Plots", ""]
    for plot in plots:
        name = plot["path"].rsplit("/", 1)[-1].removesuffix(".png")
        lines += [f"![{name}]({plot['path']})", ""]
    for failure in skipped:
        lines += [f"- not drawn: `{failure['plot']}` ({failure['error']})"]
    if skipped:
        lines.append("")
    return lines


def _accounting_lines(manifest: dict) -> list[str]:
    counts = manifest["counts"]
    lines = [
        "## Row accounting",
        "",
        "| stage | rows in | fan-out | dropped | rows out |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for s in counts["stages"]:
        dropped = ", ".join(f"{reason}: {n}" for reason, n in s["dropped"].items()) or "-"
        lines.append(f"| {s['stage']} | {s['rows_in']} | {s['fanout']} | {dropped} | {s['rows_out']} |")
    lines += ["", f"Input rows: {counts['input']}; published rows: {counts['published']}; rejected rows: {counts['rejected']} (in `rejects/`).", ""]
    if manifest.get("stats"):
        lines += ["## Statistics", "", "| statistic | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in manifest["stats"].items() if not isinstance(v, (dict, list))]
        lines.append("")
    return lines


def _reward_model_card_lines(manifest: dict) -> list[str]:
    base, data, head = manifest["base_model"], manifest["training_data"], manifest["model"]["head"]
    split, metrics = manifest["split"], manifest["metrics"]

    def auc(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [
        f"# {manifest['dataset']} {manifest['version']} (reward model)",
        "",
        manifest.get("description") or "",
        "",
        f"- created: {manifest['created_at']}",
        f"- base model: `{base['name']}` (sha256 `{base['sha256'][:12]}`), {manifest['model']['architecture']} with a {head['shape'][-1]}-weight score head",
        f"- head: `{head['path']}` (sha256 `{head['sha256'][:12]}`, {head['bytes']} bytes); the base weights are not stored here",
        f"- trained on: {data['uri']} (`{data['dataset']}` {data['version']}), {manifest['counts']['published']} examples",
        f"- code: `{manifest['code_version']}`",
        "- serve it: `distillery.model_setup.materialize_reward_model(URI)` rebuilds the classifier folder for vLLM's pooling runner",
        "",
        "## Evaluation (correct versus incorrect completions of the same problems)",
        "",
        "| split | problems | correct | incorrect | ROC AUC |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for side, label in (("train", "train"), ("heldout", "held-out")):
        ex = split["examples"][side]
        lines.append(f"| {label} | {split['problems'][side]} | {ex['pos']} | {ex['neg']} | {auc(metrics[f'auc_{side}'])} |")
    lines += ["", "## Hyperparameters", "", "| name | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in manifest["hyperparameters"].items()]
    lines.append("")
    return lines


def publish_version(
    store: Store,
    dataset: str,
    rows: pl.DataFrame,
    rejects: pl.DataFrame,
    *,
    input_rows: int,
    stages: list[StageCount],
    run_id: str,
    metadata: dict,
    shard_rows: int,
    contract: str = "samples",
    signatures: pl.DataFrame | None = None,
    signature_params: dict | None = None,
) -> Published:
    """Write one new immutable version from tables in memory: each table written as its parts
    (``PartWriter``), then :func:`publish_parts`, the one way a version is written.

    ``metadata`` carries the lineage fields (recipe, recipe_hash, code_version, generator,
    parents, flow_run_id, stats, description) that go into the manifest as they are.
    ``signatures`` (the dedup stage's MinHash table of the published rows) is stored under
    ``signatures/`` so that later runs can dedup against this version without its text.
    The counts and the whole table's contract are checked first: nothing is written if either fails.
    """
    import tempfile

    check_counts(input_rows, stages, rows.height)
    load_contract(contract).check_table(rows)
    with tempfile.TemporaryDirectory(prefix="distillery-publish-") as tmp:

        def parts(prefix: str, frame: pl.DataFrame, **kwargs) -> PartWriter:
            writer = PartWriter(tmp, prefix, shard_rows, schema=dict(frame.schema), **kwargs)
            writer.add(frame)
            writer.close()
            return writer

        return publish_parts(
            store,
            dataset,
            parts("data", rows, contract=contract),
            parts("rejects", rejects),
            input_rows=input_rows,
            stages=stages,
            run_id=run_id,
            metadata=metadata,
            signatures=parts("signatures", signatures) if signatures is not None else None,
            signature_params=signature_params,
            plot_rows=max(rows.height, rejects.height, 1),
        )


def _check_and_claim(store: Store, dataset: str, rows: pl.DataFrame, *, input_rows: int, stages: list[StageCount], run_id: str, contract: str):
    """Check the counts and the contract (nothing is written if either fails), then claim a version."""
    check_counts(input_rows, stages, rows.height)
    data_contract = load_contract(contract)
    data_contract.check_table(rows)
    return data_contract, store.claim_version(dataset, run_id)


def _manifest_head(dataset: str, version: str, data_contract, *, input_rows: int, published: int, rejected: int, stages: list[StageCount]) -> dict:
    return {
        "dataset": dataset,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "schema_version": SCHEMA_VERSION,
        "contract": {"name": data_contract.name, "version": data_contract.version},
        "counts": {"input": input_rows, "published": published, "rejected": rejected, "stages": [s.as_dict() for s in stages]},
    }


def _write_plots(store: Store, manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> None:
    """The card's PNG plots under ``plots/``, listed in the manifest (``plots``: path, sha256, bytes).

    A plot that fails to draw is left out, named in ``plots_skipped`` with its error and logged
    as a warning: a plotting bug never loses a version.
    """
    base = f"{manifest['dataset']}/{manifest['version']}"
    try:
        from distillery.plots import render_plots_safely

        images, skipped = render_plots_safely(manifest, rows, rejects)
    except Exception as exc:  # matplotlib missing or broken: publish without plots
        log.warning("plots of %s not drawn: %s: %s", base, type(exc).__name__, exc)
        images, skipped = {}, [{"plot": "*", "error": f"{type(exc).__name__}: {exc}"}]
    entries = []
    for name, data in images.items():
        path = f"{PLOTS_DIR}/{name}"
        store.put(f"{base}/{path}", data)
        entries.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    manifest["plots"] = entries
    if skipped:
        manifest["plots_skipped"] = skipped


def _seal(store: Store, manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Published:
    """Plots, the card, then ``manifest.json`` last: the version becomes visible complete or not at all."""
    base = f"{manifest['dataset']}/{manifest['version']}"
    _write_plots(store, manifest, rows, rejects)
    store.put(f"{base}/card.md", render_card(manifest).encode())
    failpoint("publish")  # chaos tests: crash with everything written but the manifest
    store.put(f"{base}/manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
    return Published(store.uri(base), manifest)


HEAD_PATH = "model/score_head.safetensors"


def publish_reward_model(
    store: Store,
    name: str,
    weight,
    examples: pl.DataFrame,
    rejects: pl.DataFrame,
    *,
    input_rows: int,
    stages: list[StageCount],
    run_id: str,
    metadata: dict,
    architecture: str = "LlamaForSequenceClassification",
    shard_rows: int = 100_000,
) -> Published:
    """Write one new immutable version of kind ``reward-model``; return its URI and manifest.

    Stored: the trained score head only (``model/score_head.safetensors``, one ``score.weight``
    tensor ``[1, hidden]``, a few KB; the base weights are named by checksum in ``base_model``,
    never copied), the example table (``data/``: sample_id, seed_id, split, correct, logit,
    reward), the rows not used (``rejects/``), ``plots/*.png``, ``card.md``, and ``manifest.json`` last.
    ``metadata`` carries ``base_model``, ``training_data``, ``split``, ``metrics``,
    ``hyperparameters`` and the lineage fields, into the manifest as they are.
    """
    from distillery.model_setup import HEAD_TENSOR, head_bytes

    data_contract, version = _check_and_claim(store, name, examples, input_rows=input_rows, stages=stages, run_id=run_id, contract="reward-examples")
    base = f"{name}/{version}"
    head = head_bytes(weight)
    with _discarded_on_failure(store, base):
        store.put(f"{base}/{HEAD_PATH}", head)
        manifest = {
            **_manifest_head(name, version, data_contract, input_rows=input_rows, published=examples.height, rejected=rejects.height, stages=stages),
            "kind": "reward-model",
            "model": {
                "architecture": architecture,
                "num_labels": 1,
                "pooling": "last token, final hidden state after the final norm",
                "output": "P(correct) = sigmoid(logit); the logit is score.weight . features",
                "head": {"path": HEAD_PATH, "tensor": HEAD_TENSOR, "shape": [1, int(len(weight))], "dtype": "float32", "bytes": len(head), "sha256": hashlib.sha256(head).hexdigest()},
            },
            "shards": _write_shards(store, f"{base}/data", examples, shard_rows),
            "reject_shards": _write_shards(store, f"{base}/rejects", rejects, shard_rows),
            **metadata,
        }
        return _seal(store, manifest, examples, rejects)


# -- streaming publish: parts written locally as rows arrive, then one version ------------------


class PartWriter:
    """Parquet parts of ``shard_rows`` rows each, written to a local folder as frames arrive.

    The parts are ``part-00000.parquet``, ... of exactly ``shard_rows`` rows, the last shorter
    (one empty part for no rows), however the rows arrived: the same rows in any number of frames
    make the same bytes. ``contract``
    checks each part as it is written (uniqueness only within a part: ingest already rejects
    repeated ids). Memory: at most ``shard_rows`` buffered rows plus the frame being added.
    """

    def __init__(self, folder, prefix: str, shard_rows: int, *, schema: dict | None = None, contract: str | None = None) -> None:
        from pathlib import Path

        self.folder, self.prefix, self.shard_rows, self.schema = Path(folder) / prefix, prefix, shard_rows, schema
        self.folder.mkdir(parents=True, exist_ok=True)
        self.contract = load_contract(contract) if contract else None
        self.buffer: list[pl.DataFrame] = []
        self.buffered = 0
        self.rows = 0
        self.parts: list[dict] = []

    def add(self, frame: pl.DataFrame) -> None:
        if frame.height == 0:
            if self.schema is None:
                self.schema = dict(frame.schema)
            return
        self.buffer.append(frame)
        self.buffered += frame.height
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        table = pl.concat(self.buffer, how="vertical_relaxed") if len(self.buffer) > 1 else self.buffer[0]
        part, rest = table.slice(0, n), table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.height else []), rest.height
        self._write(part)

    def _write(self, part: pl.DataFrame) -> None:
        if self.contract is not None:
            self.contract.check_table(part)
        data = parquet_bytes(part)
        name = f"part-{len(self.parts):05d}.parquet"
        (self.folder / name).write_bytes(data)
        self.rows += part.height
        self.parts.append({"path": f"{self.prefix}/{name}", "rows": part.height, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def close(self) -> list[dict]:
        """Write what is buffered (or one empty part if nothing came); the shard entries."""
        if self.buffered:
            self._flush(self.buffered)
        if not self.parts:
            self._write(pl.DataFrame(schema=self.schema or {}))
        return self.parts

    def read(self, limit: int) -> pl.DataFrame:
        """Up to ``limit`` of the written rows (from the first parts), e.g. for the card's plots."""
        frames, n = [], 0
        for part in self.parts:
            if n >= limit:
                break
            frame = pl.read_parquet(self.folder / part["path"].split("/", 1)[1])
            frames.append(frame.head(limit - n))
            n += frames[-1].height
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema=self.schema or {})


def publish_parts(
    store: Store,
    dataset: str,
    data: PartWriter,
    rejects: PartWriter,
    *,
    input_rows: int,
    stages: list[StageCount],
    run_id: str,
    metadata: dict,
    signatures: PartWriter | None = None,
    signature_params: dict | None = None,
    plot_rows: int = 100_000,
) -> Published:
    """Write one new immutable version from a table already written as local parts (``PartWriter``s, closed).

    The counts are checked before anything is written (each part was checked against the contract
    as it was written), then a version is claimed, the parts are copied into it one at a time, and
    the plots, card and manifest follow, the manifest last. The plots are drawn from the first
    ``plot_rows`` published rows and rejects (all of them, for a version of up to that size).
    """
    check_counts(input_rows, stages, data.rows)
    contract = data.contract or load_contract("samples")
    version = store.claim_version(dataset, run_id)
    base = f"{dataset}/{version}"
    with _discarded_on_failure(store, base):

        def copy(writer: PartWriter) -> list[dict]:
            return _copy_parts(store, base, writer)

        manifest = {
            **_manifest_head(dataset, version, contract, input_rows=input_rows, published=data.rows, rejected=rejects.rows, stages=stages),
            "shards": copy(data),
            "reject_shards": copy(rejects),
            **metadata,
        }
        if signatures is not None:
            manifest["signatures"] = {**(signature_params or {}), "shards": copy(signatures)}
        return _seal(store, manifest, data.read(plot_rows), rejects.read(plot_rows))
