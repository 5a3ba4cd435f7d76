"""OpenLineage run events for every flow run and every stage, kept in the store and sent to an
OpenLineage endpoint (Marquez, ...) when one is configured.

One :class:`LineageRecorder` per flow run, used as a context manager around the flow body::

    with LineageRecorder("synthesize", run_id, store, recipe_hash=..., code_version=...) as lineage:
        seeds = ingest(...)
        lineage.input(seeds.meta["parent"])
        ...
        lineage.output(published, stages, schema=rows.schema)

Entering emits the flow run's START; leaving emits, for each published version, a START and a
COMPLETE per stage (from the stage counts, with the flow run as their parent), then the flow
run's COMPLETE with its inputs and outputs. When the body raises, the versions already published
still get their stage events, and the flow run ends with FAIL (ABORT for an interrupt) and the
error message; the exception goes on.

Events are built with ``openlineage.client.event_v2`` and its standard facets, serialized with
``Serde.to_json`` and written one object per event (no appends: S3 has none) at
``STORE/_lineage/<YYYY-MM-DD>/<run id>/<seq>-<job>-<eventType>.json``. ``_lineage`` never
matches a data set name, so ``Store.datasets()`` does not list it. When ``OPENLINEAGE_URL`` (or
an ``openlineage.yml``, ``OPENLINEAGE_CONFIG`` or ``OPENLINEAGE__TRANSPORT__*``) configures a
transport, each event also goes through the official client; an endpoint that fails logs one
warning, stops the sending for the rest of the run and never fails the run.

What never goes into an event: environment variables, the recipe itself (only its hash), and
credentials; user:password in URIs and the values of secret-looking environment variables are
masked in error messages and dataset names.
"""

from __future__ import annotations

import copy
import json
import os
import re
import traceback
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import attr
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    InputDatasetFacet,
    RunFacet,
    data_quality_metrics_input_dataset,
    documentation_dataset,
    documentation_job,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    schema_dataset,
)
from openlineage.client.serde import Serde
from openlineage.client.uuid import generate_new_uuid

import distillery
from distillery.accounting import StageCount
from distillery.logs import run_logger
from distillery.store import Store, parse_version_uri
from distillery.uri_io import is_s3, redact_uri


DEFAULT_NAMESPACE = "distillery"
LINEAGE_DIR = "_lineage"  # never a data set: store.NAME needs a letter or digit first
PRODUCER = f"urn:distillery:{distillery.__version__}"
INTEGRATION = "DISTILLERY"
_MAX_MESSAGE = 4_000
_MAX_STACK = 20_000

# -- custom facets: ours, with their JSON schemas here (named by _schemaURL, a URN: an identifier,
# not a document to fetch; consumers such as Marquez keep custom facets as they are) ---------------
_FACETS_ID = "urn:distillery:openlineage:facets:1-0-0"
_BASE = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs"


def _facet_schema(name: str, base: str, properties: dict, required: list[str]) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"{_FACETS_ID}:{name}",
        "$defs": {
            name: {
                "allOf": [
                    {"$ref": f"{_BASE}/{base}"},
                    {"type": "object", "properties": properties, "required": required, "additionalProperties": True},
                ],
                "type": "object",
            }
        },
    }


_COUNT = {"type": "integer", "minimum": 0}
CUSTOM_FACET_SCHEMAS: dict[str, dict] = {
    "DistilleryRunFacet": _facet_schema(
        "DistilleryRunFacet",
        "RunFacet",
        {
            "flowRunId": {"type": "string", "description": "The Prefect flow run id (the manifest's flow_run_id)."},
            "recipeHash": {"type": "string", "description": "sha256 of the resolved recipe (the recipe itself is in the manifest)."},
            "codeVersion": {"type": "string", "description": "distillery.code_version(): package version + git commit."},
            "model": {"type": "string", "description": "The generator or base model."},
            "promptTemplates": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The synthesis strategy's prompt templates, as strategy/name@version (sha256 of the template's text).",
            },
        },
        ["flowRunId"],
    ),
    "DistilleryDatasetFacet": _facet_schema(
        "DistilleryDatasetFacet",
        "DatasetFacet",
        {
            "uri": {"type": "string", "description": "Where the data is (credentials masked)."},
            "version": {"type": "string", "pattern": "^v[0-9]{4,}$"},
            "kind": {"type": "string"},
            "contract": {"type": "string", "description": "data contract name@version the rows were checked against"},
            "manifest": {"type": "string", "description": "store key of the version's manifest.json"},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "rows": _COUNT,
        },
        [],
    ),
    "DistilleryRowAccountingInputDatasetFacet": _facet_schema(
        "DistilleryRowAccountingInputDatasetFacet",
        "InputDatasetFacet",
        {
            "stage": {"type": "string"},
            "rowsIn": _COUNT,
            "rowsOut": _COUNT,
            "fanout": {"type": "integer", "minimum": 1},
            "dropped": {"type": "object", "additionalProperties": _COUNT, "description": "rows dropped, by reason"},
            "rejects": {"type": "string", "description": "data set name (in the store's namespace) that keeps the dropped rows"},
        },
        ["stage", "rowsIn", "rowsOut", "fanout", "dropped"],
    ),
}


def _schema_url(name: str) -> str:
    return f"{_FACETS_ID}:{name}#/$defs/{name}"


@attr.define
class DistilleryRunFacet(RunFacet):
    """Which Prefect run, recipe, code and model a run belongs to (run facet ``distillery_run``)."""

    flowRunId: str  # noqa: N815
    recipeHash: str | None = attr.field(default=None)  # noqa: N815
    codeVersion: str | None = attr.field(default=None)  # noqa: N815
    model: str | None = attr.field(default=None)
    promptTemplates: list[str] | None = attr.field(default=None)  # noqa: N815
    _additional_skip_redact: ClassVar[list[str]] = ["flowRunId", "recipeHash", "codeVersion", "model", "promptTemplates"]

    @staticmethod
    def _get_schema() -> str:
        return _schema_url("DistilleryRunFacet")


@attr.define
class DistilleryDatasetFacet(DatasetFacet):
    """Store-level identity of a data set: version, kind, contract, manifest, checksum (``distillery``)."""

    uri: str | None = attr.field(default=None)
    version: str | None = attr.field(default=None)
    kind: str | None = attr.field(default=None)
    contract: str | None = attr.field(default=None)
    manifest: str | None = attr.field(default=None)
    sha256: str | None = attr.field(default=None)
    rows: int | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return _schema_url("DistilleryDatasetFacet")


@attr.define
class DistilleryRowAccountingInputDatasetFacet(InputDatasetFacet):
    """What a stage did with its input rows (input facet ``distillery_rowAccounting``):
    ``rowsOut == rowsIn * fanout - sum(dropped)``, dropped rows by reason."""

    stage: str
    rowsIn: int  # noqa: N815
    rowsOut: int  # noqa: N815
    fanout: int
    dropped: dict[str, int] = attr.field(factory=dict)
    rejects: str | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return _schema_url("DistilleryRowAccountingInputDatasetFacet")


# -- identities ---------------------------------------------------------------------------------
def lineage_run_id(flow_run_id: str) -> str:
    """The OpenLineage runId of a flow run: the Prefect flow run id (a UUID) itself, or a UUID
    derived from it (name-based, so the same id always maps to the same runId)."""
    try:
        return str(uuid.UUID(str(flow_run_id)))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"distillery:flow-run:{flow_run_id}"))


def job_namespace() -> str:
    return os.environ.get("OPENLINEAGE_NAMESPACE") or DEFAULT_NAMESPACE


def store_namespace(store: Store) -> str:
    """A store's data sets live in the namespace of its root: ``file:///abs/store`` or ``s3://bucket/prefix``."""
    return redact_uri(store.root if is_s3(store.root) else Path(store.root).as_uri())


def dataset_for_uri(uri: str) -> tuple[str, str]:
    """(namespace, name) of an input: a published version is ``(store namespace, NAME/vNNNN)``, so
    the version one run publishes and the version the next run reads are the same data set; an S3
    object is ``(s3://bucket, key)``; a local file ``(file, /absolute/path)``; built-in seeds
    ``(builtin, kind?count=..&seed=..)``."""
    ref = parse_version_uri(uri)
    if ref is not None:
        store, name, version = ref
        return store_namespace(store), f"{name}/{version}"
    if uri.startswith("builtin:"):
        return "builtin", uri.removeprefix("builtin:")
    if is_s3(uri):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}", key
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        scheme, rest = uri.split("://", 1)
        authority, _, path = rest.partition("/")
        return redact_uri(f"{scheme}://{authority}"), "/" + path
    return "file", str(Path(uri).expanduser().resolve())


_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|AUTH|SESSION", re.IGNORECASE)


def redact(text: str) -> str:
    """Free text (error messages, stack traces): URIs' ``user:password@`` or ``token@``
    (:func:`distillery.uri_io.redact_uri`) and the values of secret-looking environment
    variables (``*KEY*``, ``*SECRET*``, ``*TOKEN*``, ...) masked."""
    text = redact_uri(text)
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, "***")
    return text


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def schema_fields(schema: Any) -> list[schema_dataset.SchemaDatasetFacetFields]:
    """Schema facet fields from a polars schema, a pyarrow schema, or a ``{name: type}`` mapping."""
    if hasattr(schema, "names") and hasattr(schema, "types"):  # pyarrow.Schema
        pairs = zip(schema.names, schema.types)
    elif isinstance(schema, Mapping) or hasattr(schema, "items"):  # polars.Schema, dict
        pairs = schema.items()
    else:
        pairs = schema
    return [
        schema_dataset.SchemaDatasetFacetFields(name=str(name), type=str(dtype), ordinal_position=i, fields=None)
        for i, (name, dtype) in enumerate(pairs, start=1)
    ]


# -- emission: the store always, an OpenLineage endpoint when configured ---------------------------
def _transport_configured() -> bool:
    if os.environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OPENLINEAGE_URL") or os.environ.get("OPENLINEAGE_CONFIG"):
        return True
    if any(k.startswith("OPENLINEAGE__TRANSPORT") for k in os.environ):
        return True
    return any(p.is_file() for p in (Path.cwd() / "openlineage.yml", Path("~/.openlineage/openlineage.yml").expanduser()))


def make_client():
    """The official client, configured the client's own way (``OPENLINEAGE_URL`` and
    ``OPENLINEAGE_API_KEY``, ``openlineage.yml``, ``OPENLINEAGE_CONFIG``, ``OPENLINEAGE__*``), or
    None when nothing configures a transport (the client would print events to the console).

    The client copies ``OPENLINEAGE_URL``/``OPENLINEAGE_API_KEY`` into ``OPENLINEAGE__TRANSPORT__*``
    variables of this process when it starts; they are put back as they were (its configuration is
    read by then), so a later run sees the environment of its own time and no child process
    inherits extra copies of the key."""
    if not _transport_configured():
        return None
    from openlineage.client import OpenLineageClient

    before = {k: v for k, v in os.environ.items() if k.startswith("OPENLINEAGE__")}
    try:
        client = OpenLineageClient()
        _ = client.config  # read now, while the environment is the client's
    finally:
        for k in [k for k in os.environ if k.startswith("OPENLINEAGE__") and k not in before]:
            del os.environ[k]
        os.environ.update(before)
    return client


def _client_or_none():
    try:
        return make_client()
    except Exception as err:  # a bad openlineage.yml costs the endpoint, never the run
        run_logger(__name__).warning("lineage: no OpenLineage client (%s); events go to the store only", redact(str(err))[:500])
        return None


@dataclass
class _Output:
    """One published version and the stages that made it."""

    dataset: str
    version: str
    name: str  # NAME/vNNNN
    uri: str
    manifest: dict
    stages: list[StageCount]
    schema: list | None
    after: str | None  # the stage of another output of this run whose rows this one starts from
    description: str | None = None
    emitted: bool = False


class LineageRecorder:
    """The OpenLineage events of one flow run; see the module docstring."""

    def __init__(
        self,
        flow: str,
        flow_run_id: str,
        store: Store | str,
        *,
        recipe_hash: str | None = None,
        code_version: str | None = None,
        model: str | None = None,
        description: str | None = None,
        namespace: str | None = None,
        client: Any = "auto",
    ) -> None:
        self.flow = flow
        self.flow_run_id = str(flow_run_id)
        self.run_id = lineage_run_id(self.flow_run_id)
        self.store = store if isinstance(store, Store) else Store(store)
        self.namespace = namespace or job_namespace()
        self.dataset_namespace = store_namespace(self.store)
        self.recipe_hash, self.code_version, self.model, self.description = recipe_hash, code_version, model, description
        self.prompt_templates: list[str] | None = None
        self.started_at = datetime.now(UTC)
        self.prefix = f"{LINEAGE_DIR}/{self.started_at:%Y-%m-%d}/{self.run_id}"
        self.keys: list[str] = []  # what this recorder wrote, in order
        self.unsent = 0
        self._seq = 0
        self._inputs: list[InputDataset] = []
        self._outputs: list[_Output] = []
        self._client = _client_or_none() if client == "auto" else client
        self._send_error: str | None = None
        self._finished = False

    # -- what the flow tells it ---------------------------------------------------------------
    def annotate(
        self, *, model: str | None = None, recipe_hash: str | None = None, code_version: str | None = None, prompt_templates: list[str] | None = None
    ) -> None:
        """Facts learned during the run (e.g. the model name once the model folder is resolved)."""
        self.model = model or self.model
        self.prompt_templates = prompt_templates or self.prompt_templates
        self.recipe_hash = recipe_hash or self.recipe_hash
        self.code_version = code_version or self.code_version

    def input(self, parent: Mapping[str, Any]) -> None:
        """A data set the run reads: an ingest stage's ``meta["parent"]`` (uri, rows, sha256)."""
        uri = str(parent["uri"])
        namespace, name = dataset_for_uri(uri)
        version = name.rsplit("/", 1)[-1] if namespace == self.dataset_namespace else None  # a version of this store
        facets: dict[str, DatasetFacet] = {
            "distillery": DistilleryDatasetFacet(
                uri=redact_uri(uri), version=version, sha256=parent.get("sha256"), rows=parent.get("rows"), producer=PRODUCER
            )
        }
        input_facets = {}
        if parent.get("rows") is not None:
            input_facets["dataQualityMetrics"] = data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(
                columnMetrics={}, rowCount=int(parent["rows"]), producer=PRODUCER
            )
        self._inputs.append(InputDataset(namespace=namespace, name=name, facets=facets, inputFacets=input_facets))

    def output(self, published: Any, stages: Iterable[StageCount], *, schema: Any = None, after: str | None = None) -> None:
        """A version this run published (``distillery.stages.publish.Published``) and the stage
        counts that made it (the manifest's). ``schema``: the published table's schema (polars or
        pyarrow). ``after``: the stage of another output of this run whose rows this one's first
        stage takes (the preference pairs start from what dedup kept); by default the first stage
        takes the run's input."""
        manifest = published.manifest
        dataset, version = manifest["dataset"], manifest["version"]
        self._outputs.append(
            _Output(
                dataset=dataset,
                version=version,
                name=f"{dataset}/{version}",
                uri=published.uri,
                manifest=manifest,
                stages=list(stages),
                schema=schema_fields(schema) if schema is not None else None,
                after=after,
                description=manifest.get("description"),
            )
        )

    # -- the run's lifecycle ------------------------------------------------------------------
    def __enter__(self) -> LineageRecorder:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.complete()
        else:
            self.fail(exc)
        return False  # the exception goes on

    def start(self) -> None:
        """The flow run's START. A store that cannot take it fails the run here, before any work.
        A retried flow run (same run id) numbers its events after those already there."""
        self._seq = len([n for n in self.store.children(self.prefix) if n.endswith(".json")])
        event = RunEvent(
            eventType=RunState.START,
            eventTime=self.started_at.isoformat(timespec="microseconds"),
            run=Run(runId=self.run_id, facets=self._flow_run_facets()),
            job=self._job(self.flow, "FLOW", self.description),
            inputs=[],
            outputs=[],
            producer=PRODUCER,
        )
        self._emit(event, strict=True)

    def complete(self) -> None:
        self._finish(RunState.COMPLETE)

    def fail(self, error: BaseException) -> None:
        state = RunState.ABORT if isinstance(error, (KeyboardInterrupt, SystemExit)) else RunState.FAIL
        self._finish(state, error)

    def _finish(self, state: RunState, error: BaseException | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        try:
            for out in self._outputs:
                self._stage_events(out)
            facets = self._flow_run_facets()
            if error is not None:
                facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                    message=redact(f"{type(error).__name__}: {error}")[:_MAX_MESSAGE],
                    programmingLanguage="PYTHON",
                    stackTrace=redact("".join(traceback.format_exception(error)))[-_MAX_STACK:],
                    producer=PRODUCER,
                )
            event = RunEvent(
                eventType=state,
                eventTime=_now(),
                run=Run(runId=self.run_id, facets=facets),
                job=self._job(self.flow, "FLOW", self.description),
                inputs=copy.deepcopy(self._inputs),
                outputs=[self._version_dataset(out) for out in self._outputs],
                producer=PRODUCER,
            )
            self._emit(event)
        except Exception as err:  # lineage never turns a finished run into a failed one
            run_logger(__name__).warning("lineage: events of run %s not recorded: %s", self.run_id, err)
        if self._client is not None:
            try:
                self._client.close(10.0)  # an asynchronous transport sends what it holds
            except Exception as err:
                run_logger(__name__).warning("lineage: closing the OpenLineage client: %s", redact(str(err))[:500])
        if self.unsent:
            run_logger(__name__).warning(
                "lineage: %d of %d events not sent to the OpenLineage endpoint (%s); all are in %s",
                self.unsent, len(self.keys), self._send_error, self.store.uri(self.prefix),
            )

    # -- event parts --------------------------------------------------------------------------
    def _flow_run_facets(self) -> dict[str, RunFacet]:
        return {
            "distillery_run": DistilleryRunFacet(
                flowRunId=self.flow_run_id,
                recipeHash=self.recipe_hash,
                codeVersion=self.code_version,
                model=self.model,
                promptTemplates=self.prompt_templates,
                producer=PRODUCER,
            )
        }

    def _job(self, name: str, job_type: str, description: str | None = None) -> Job:
        facets: dict[str, Any] = {
            "jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration=INTEGRATION, jobType=job_type, producer=PRODUCER)
        }
        if description:
            facets["documentation"] = documentation_job.DocumentationJobFacet(description=description, producer=PRODUCER)
        return Job(namespace=self.namespace, name=name, facets=facets)

    def _version_dataset(self, out: _Output, *, rows: int | None = None) -> OutputDataset:
        """The published version as an output: schema, description, store identity, statistics."""
        manifest = out.manifest
        facets: dict[str, DatasetFacet] = {}
        if out.schema is not None:
            facets["schema"] = schema_dataset.SchemaDatasetFacet(fields=copy.deepcopy(out.schema), producer=PRODUCER)
        if out.description:
            facets["documentation"] = documentation_dataset.DocumentationDatasetFacet(description=out.description, producer=PRODUCER)
        contract = manifest.get("contract") or {}
        facets["distillery"] = DistilleryDatasetFacet(
            uri=redact_uri(out.uri),
            version=out.version,
            kind=manifest.get("kind"),
            contract=f"{contract['name']}@{contract['version']}" if contract else None,
            manifest=f"{out.name}/manifest.json",
            rows=manifest["counts"]["published"],
            producer=PRODUCER,
        )
        shards = manifest.get("shards") or []
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=manifest["counts"]["published"] if rows is None else rows,
            size=sum(s.get("bytes", 0) for s in shards) or None,
            fileCount=len(shards) or None,
            producer=PRODUCER,
        )
        return OutputDataset(namespace=self.dataset_namespace, name=out.name, facets=facets, outputFacets={"outputStatistics": stats})

    def _first_input(self, out: _Output) -> tuple[str, str]:
        if out.after is not None:
            for other in self._outputs:
                if other is not out and any(s.stage == out.after for s in other.stages):
                    return self.dataset_namespace, self._intermediate_name(other, out.after)
        if self._inputs:
            return self._inputs[0].namespace, self._inputs[0].name
        return self.dataset_namespace, f"{out.name}@input"

    @staticmethod
    def _intermediate_name(out: _Output, stage: str) -> str:
        """The rows a stage passed on, before the last stage: a logical data set, not a stored one
        (``NAME/vNNNN@stage``); the last stage's output is the version itself."""
        return out.name if out.stages and out.stages[-1].stage == stage else f"{out.name}@{stage}"

    def _stage_events(self, out: _Output) -> None:
        """START and COMPLETE for each stage of one published version, parented by the flow run."""
        if out.emitted:
            return
        out.emitted = True
        parent = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=self.run_id, facets=None),
            job=parent_run.Job(namespace=self.namespace, name=self.flow, facets=None),
            root=parent_run.Root(
                run=parent_run.RootRun(runId=self.run_id, facets=None), job=parent_run.RootJob(namespace=self.namespace, name=self.flow, facets=None)
            ),
            producer=PRODUCER,
        )
        in_namespace, in_name = self._first_input(out)
        rejects = f"{out.name}/rejects"
        for count in out.stages:
            run_id = str(generate_new_uuid())
            job = self._job(f"{self.flow}.{count.stage}", "STAGE")
            out_name = self._intermediate_name(out, count.stage)
            started = RunEvent(
                eventType=RunState.START,
                eventTime=_now(),
                run=Run(runId=run_id, facets={"parent": parent}),
                job=job,
                inputs=[InputDataset(namespace=in_namespace, name=in_name)],
                outputs=[OutputDataset(namespace=self.dataset_namespace, name=out_name)],
                producer=PRODUCER,
            )
            self._emit(started)
            accounting = DistilleryRowAccountingInputDatasetFacet(
                stage=count.stage,
                rowsIn=count.rows_in,
                rowsOut=count.rows_out,
                fanout=count.fanout,
                dropped=dict(sorted(count.dropped.items())),
                rejects=rejects if count.dropped else None,
                producer=PRODUCER,
            )
            quality = data_quality_metrics_input_dataset.DataQualityMetricsInputDatasetFacet(columnMetrics={}, rowCount=count.rows_in, producer=PRODUCER)
            if out_name == out.name:
                output = self._version_dataset(out, rows=count.rows_out)
            else:
                stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=count.rows_out, producer=PRODUCER)
                output = OutputDataset(namespace=self.dataset_namespace, name=out_name, outputFacets={"outputStatistics": stats})
            completed = RunEvent(
                eventType=RunState.COMPLETE,
                eventTime=_now(),
                run=Run(runId=run_id, facets={"parent": parent}),
                job=job,
                inputs=[
                    InputDataset(
                        namespace=in_namespace,
                        name=in_name,
                        inputFacets={"dataQualityMetrics": quality, "distillery_rowAccounting": accounting},
                    )
                ],
                outputs=[output],
                producer=PRODUCER,
            )
            self._emit(completed)
            in_namespace, in_name = self.dataset_namespace, out_name

    # -- writing and sending -------------------------------------------------------------------
    def _emit(self, event: RunEvent, *, strict: bool = False) -> None:
        """One object per event in the store, written atomically (a local file appears whole, an S3
        object is one PUT), then the endpoint, if any."""
        data = Serde.to_json(event).encode()
        job = re.sub(r"[^A-Za-z0-9._-]", "_", event.job.name)
        state = event.eventType.value if event.eventType else "OTHER"
        key = f"{self.prefix}/{self._seq:04d}-{job}-{state}.json"
        self._seq += 1
        try:
            self.store.put(key, data)
            self.keys.append(key)
        except Exception as err:
            if strict:
                raise
            run_logger(__name__).warning("lineage: could not write %s %s to the store: %s", event.job.name, state, err)
        self._send(event)

    def _send(self, event: RunEvent) -> None:
        if self._client is None:
            return
        if self._send_error is not None:  # the endpoint failed once: the rest of the run goes without it
            self.unsent += 1
            return
        try:
            self._client.emit(copy.deepcopy(event))  # the client adds its own facets to what it sends
        except Exception as err:
            self._send_error = redact(f"{type(err).__name__}: {err}")[:500]
            self.unsent += 1
            run_logger(__name__).warning(
                "lineage: the OpenLineage endpoint failed (%s); this run's events stay in %s only",
                self._send_error, self.store.uri(self.prefix),
            )


# -- reading back -------------------------------------------------------------------------------
def run_prefixes(store: Store, run_id: str) -> list[str]:
    """The store folders of a run's events (``_lineage/<day>/<run id>``; a retried run can span days)."""
    run_id = lineage_run_id(run_id)
    return [f"{LINEAGE_DIR}/{day}/{run_id}" for day in store.children(LINEAGE_DIR) if run_id in store.children(f"{LINEAGE_DIR}/{day}")]


def read_events(store: Store | str, run_id: str) -> list[dict]:
    """A run's events as written, in order (give the flow run id or its lineage runId)."""
    store = store if isinstance(store, Store) else Store(store)
    events = []
    for prefix in run_prefixes(store, run_id):
        names = [n for n in store.children(prefix) if n.endswith(".json") and n[:1].isdigit()]
        events += [json.loads(store.get(f"{prefix}/{n}")) for n in sorted(names, key=lambda n: int(n.split("-", 1)[0]))]
    return events


__all__ = [
    "CUSTOM_FACET_SCHEMAS",
    "LINEAGE_DIR",
    "LineageRecorder",
    "dataset_for_uri",
    "lineage_run_id",
    "make_client",
    "read_events",
    "run_prefixes",
    "redact",
    "store_namespace",
]
