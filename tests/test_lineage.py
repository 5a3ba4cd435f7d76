"""OpenLineage events (``distillery/lineage.py``): written into the store, one object per event;
every one valid against the official OpenLineage JSON schema (vendored in
``tests/data/openlineage/``) and its facets against theirs; START then COMPLETE per job, stage
runs parented by the flow run, row counts equal to the stage counts, FAIL with the error message;
and sent, the same events, to a real HTTP endpoint when ``OPENLINEAGE_URL`` names one, without
failing the run when the endpoint is down.

The unit tests need no Prefect server, Ray or vLLM; the last test runs the ``train_reward_model``
flow in embedded Prefect (no Ray, no vLLM) up to its clear error on unusable data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from distillery.accounting import StageCount, empty_rejects
from distillery.lineage import (
    CUSTOM_FACET_SCHEMAS,
    LINEAGE_DIR,
    LineageRecorder,
    dataset_for_uri,
    lineage_run_id,
    read_events,
    redact,
    store_namespace,
)
from distillery.stages.publish import publish_version
from distillery.store import Store

OL = Path(__file__).resolve().parent / "data" / "openlineage"
CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
FACETS = "https://openlineage.io/spec/facets"
# $id -> (vendored file, sha256 of the upstream bytes; see tests/data/openlineage/README.md)
VENDORED = {
    CORE: ("OpenLineage-2-0-2.json", "69f68bee00b9beac88a87059c0102410e7bb05f3f43c46d02a0409831eceb0d2"),
    f"{FACETS}/2-0-4/JobTypeJobFacet.json": ("facets/JobTypeJobFacet-2-0-4.json", "11c12cab95a411ca31066c80d2bb4aefd37bbcadbda5e4d343d2069853b907d5"),
    f"{FACETS}/1-2-0/SchemaDatasetFacet.json": ("facets/SchemaDatasetFacet-1-2-0.json", "50236a779aa64baa0bad0055391838bd22fcb36ce667c41d60ada80915e899b6"),
    f"{FACETS}/1-0-1/ErrorMessageRunFacet.json": ("facets/ErrorMessageRunFacet-1-0-1.json", "b11b4ee8b0f99f6846264f87cad48390255c7ef142ce623216660c7097be0ea6"),
    f"{FACETS}/1-1-0/DocumentationJobFacet.json": ("facets/DocumentationJobFacet-1-1-0.json", "b5823685c20c712d9ee1e3b310ad6ca426be7b46db60acd9f23248811af3c8d4"),
    f"{FACETS}/1-1-0/DocumentationDatasetFacet.json": ("facets/DocumentationDatasetFacet-1-1-0.json", "bad5c041d679e73b2faea43506860428f48d80710ad1354a2d2393475143285f"),
}
# Standard facets whose official schema text could not be vendored (README): checked as core
# base facets by the event schema, and field by field by check_unvendored below.
UNVENDORED = {
    f"{FACETS}/1-2-0/ParentRunFacet.json",
    f"{FACETS}/1-0-2/OutputStatisticsOutputDatasetFacet.json",
    f"{FACETS}/1-0-3/DataQualityMetricsInputDatasetFacet.json",
    f"{FACETS}/1-0-0/TagsRunFacet.json",  # added by the client to what it sends
}


def _registry() -> Registry:
    resources = [(uri, Resource.from_contents(json.loads((OL / path).read_bytes()))) for uri, (path, _) in VENDORED.items()]
    resources += [(schema["$id"], Resource.from_contents(schema)) for schema in CUSTOM_FACET_SCHEMAS.values()]
    return Registry().with_resources(resources)


REGISTRY = _registry()
KNOWN = set(VENDORED) | {schema["$id"] for schema in CUSTOM_FACET_SCHEMAS.values()}


def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _facets(event: dict):
    """(where, name, facet) for every facet of an event."""
    for name, facet in (event["run"].get("facets") or {}).items():
        yield "run", name, facet
    for name, facet in (event["job"].get("facets") or {}).items():
        yield "job", name, facet
    for side, key in (("inputs", "inputFacets"), ("outputs", "outputFacets")):
        for ds in event.get(side) or []:
            for kind in ("facets", key):
                for name, facet in (ds.get(kind) or {}).items():
                    yield f"{side}/{ds['name']}/{kind}", name, facet


def check_unvendored(name: str, facet: dict) -> None:
    url = facet["_schemaURL"].split("#")[0]
    if url.endswith("ParentRunFacet.json"):
        uuid.UUID(facet["run"]["runId"])
        assert set(facet["job"]) >= {"namespace", "name"}
    elif url.endswith("OutputStatisticsOutputDatasetFacet.json"):
        assert isinstance(facet["rowCount"], int) and facet["rowCount"] >= 0
    elif url.endswith("DataQualityMetricsInputDatasetFacet.json"):
        assert isinstance(facet["columnMetrics"], dict) and isinstance(facet["rowCount"], int)
    elif url.endswith("TagsRunFacet.json"):
        assert all(set(t) >= {"key", "value"} for t in facet["tags"])


def validate(event: dict) -> None:
    """The event against the core schema (the whole document, and as a RunEvent), then each facet
    against the schema its ``_schemaURL`` names."""
    for ref in (CORE, f"{CORE}#/$defs/RunEvent"):
        errors = sorted(_validator(ref).iter_errors(event), key=str)
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    for where, name, facet in _facets(event):
        url = facet["_schemaURL"]
        base = url.split("#")[0]
        if base in KNOWN:
            errors = list(_validator(url).iter_errors(facet))
            assert not errors, f"{where}/{name}: {[e.message for e in errors]}"
        else:
            assert base in UNVENDORED, f"{where}/{name}: no schema for {url}"
            check_unvendored(name, facet)


# -- a run, without Prefect -----------------------------------------------------------------------
SFT_STAGES = [
    StageCount("ingest", 6, 5, 1, {"invalid_json": 1}),
    StageCount("synthesize", 5, 9, 2, {"empty_completion": 1}),
    StageCount("verify", 9, 6, 1, {"incorrect": 3}),
    StageCount("quality", 6, 5, 1, {"too_short": 1}),
    StageCount("dedup", 5, 4, 1, {"exact_duplicate": 1}),
    StageCount("select", 4, 3, 1, {"not_best": 1}),
]
PAIR_STAGES = [StageCount("pair", 2, 2, 2, {"one_label": 1, "fewer_pairs": 1})]


def _rows(n: int, prefix: str) -> pl.DataFrame:
    return pl.DataFrame({"sample_id": [f"{prefix}-{i}" for i in range(n)], "completion": [f"answer {i}" for i in range(n)], "reward": [0.5] * n})


def _publish(store: Store, name: str, rows: pl.DataFrame, stages: list[StageCount], run_id: str):
    meta = {"description": f"{name} rows", "kind": name, "flow_run_id": run_id}
    return publish_version(
        store, name, rows, empty_rejects(), input_rows=stages[0].rows_in, stages=stages, run_id=run_id, metadata=meta, shard_rows=10, contract="curated"
    )


def _run(store: Store, seeds: Path, *, fail: BaseException | None = None, client=None) -> LineageRecorder:
    """What the synthesize flow does: START, the seeds in, pairs then SFT published, COMPLETE
    (or the pairs published and then an error)."""
    flow_run_id = str(uuid.uuid4())
    recorder = LineageRecorder("synthesize", flow_run_id, store, recipe_hash="a" * 64, code_version="0.1.0+gtest", description="a test run", client=client)
    try:
        with recorder:
            recorder.annotate(model="tiny-model")
            recorder.input({"uri": str(seeds), "rows": 6, "sha256": "b" * 64})
            pairs = _publish(store, "demo-pairs", _rows(2, "pair"), PAIR_STAGES, flow_run_id)
            recorder.output(pairs, PAIR_STAGES, schema=_rows(2, "pair").schema, after="dedup")
            if fail is not None:
                raise fail
            sft = _publish(store, "demo", _rows(3, "s"), SFT_STAGES, flow_run_id)
            recorder.output(sft, SFT_STAGES, schema=_rows(3, "s").schema)
    except Exception as err:
        if err is not fail:
            raise
    return recorder


@pytest.fixture
def no_endpoint(monkeypatch):
    for name in list(os.environ):
        if name.startswith("OPENLINEAGE"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(Path(__file__).resolve().parent)  # no openlineage.yml here


def _by_run(events: list[dict]) -> dict[str, list[dict]]:
    runs = defaultdict(list)
    for e in events:
        runs[e["run"]["runId"]].append(e)
    return runs


def test_vendored_schemas_are_the_official_files():
    for uri, (path, digest) in VENDORED.items():
        data = (OL / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, path
        schema = json.loads(data)
        assert schema["$id"] == uri
        Draft202012Validator.check_schema(schema)
    for schema in CUSTOM_FACET_SCHEMAS.values():
        Draft202012Validator.check_schema(schema)


def test_the_validator_refuses_what_the_schema_refuses(tmp_path, no_endpoint):
    """The checks have teeth: no job, a bad runId, a facet without its required field."""
    store = Store(str(tmp_path / "store"))
    recorder = _run(store, tmp_path / "seeds.jsonl")
    complete = read_events(store, recorder.flow_run_id)[-1]
    validate(complete)
    with pytest.raises(AssertionError):
        validate({k: v for k, v in complete.items() if k != "job"})
    with pytest.raises(AssertionError):
        validate({**complete, "run": {**complete["run"], "runId": "not-a-uuid"}})
    job_type = dict(complete["job"]["facets"]["jobType"])
    del job_type["integration"]
    with pytest.raises(AssertionError):
        validate({**complete, "job": {**complete["job"], "facets": {"jobType": job_type}}})
    verified = next(e for e in read_events(store, recorder.flow_run_id) if e["job"]["name"] == "synthesize.verify" and e["eventType"] == "COMPLETE")
    facet = dict(verified["inputs"][0]["inputFacets"]["distillery_rowAccounting"])  # one of ours, without a required field
    del facet["rowsIn"]
    with pytest.raises(AssertionError):
        validate({**verified, "inputs": [{**verified["inputs"][0], "inputFacets": {"distillery_rowAccounting": facet}}]})


def test_a_runs_events_are_in_the_store_valid_and_add_up(tmp_path, no_endpoint):
    store = Store(str(tmp_path / "store"))
    seeds = tmp_path / "seeds.jsonl"
    recorder = _run(store, seeds)
    events = read_events(store, recorder.flow_run_id)
    assert [(e["job"]["name"], e["eventType"]) for e in events][:1] == [("synthesize", "START")]
    assert (events[-1]["job"]["name"], events[-1]["eventType"]) == ("synthesize", "COMPLETE")
    assert len(events) == 2 + 2 * (len(SFT_STAGES) + len(PAIR_STAGES)) == len(recorder.keys)
    for e in events:
        validate(e)
        assert e["job"]["namespace"] == "distillery"
        assert e["producer"].startswith("urn:distillery:")

    # one object per event, under _lineage/<day>/<run id>/, which is not a data set
    day = recorder.started_at.strftime("%Y-%m-%d")
    files = sorted(p.name for p in (tmp_path / "store" / LINEAGE_DIR / day / recorder.run_id).iterdir())
    assert files[0] == "0000-synthesize-START.json" and files[-1].endswith("-synthesize-COMPLETE.json") and len(files) == len(events)
    assert json.loads((tmp_path / "store" / recorder.keys[0]).read_text()) == events[0]
    assert store.datasets() == ["demo", "demo-pairs"]
    assert recorder.run_id == events[0]["run"]["runId"] == recorder.flow_run_id  # a Prefect id is a UUID: the same id

    # START then COMPLETE, once each, per run; stage runs parented by the flow run
    runs = _by_run(events)
    assert len(runs) == 1 + len(SFT_STAGES) + len(PAIR_STAGES)
    for run_id, run_events in runs.items():
        assert [e["eventType"] for e in run_events] == ["START", "COMPLETE"]
        assert run_events[0]["eventTime"] <= run_events[1]["eventTime"]
        assert len({e["job"]["name"] for e in run_events}) == 1
        if run_id != recorder.run_id:
            for e in run_events:
                parent = e["run"]["facets"]["parent"]
                assert parent["run"] == {"runId": recorder.run_id}
                assert parent["job"] == {"namespace": "distillery", "name": "synthesize"}
                assert parent["root"]["run"]["runId"] == recorder.run_id

    # row counts are the stage counts; each stage takes what the one before passed on
    namespace = store_namespace(store)
    assert namespace == (tmp_path / "store").as_uri()
    stage_done = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] != "synthesize"}
    assert list(stage_done) == ["synthesize.pair", *[f"synthesize.{c.stage}" for c in SFT_STAGES]]
    previous = ("file", str(seeds))
    for count in SFT_STAGES:
        e = stage_done[f"synthesize.{count.stage}"]
        (inp,), (out,) = e["inputs"], e["outputs"]
        assert (inp["namespace"], inp["name"]) == previous
        assert inp["inputFacets"]["dataQualityMetrics"]["rowCount"] == count.rows_in
        acc = inp["inputFacets"]["distillery_rowAccounting"]
        assert (acc["stage"], acc["rowsIn"], acc["rowsOut"], acc["fanout"], acc["dropped"]) == (count.stage, count.rows_in, count.rows_out, count.fanout, count.dropped)
        assert acc["rowsOut"] == acc["rowsIn"] * acc["fanout"] - sum(acc["dropped"].values())
        assert acc["rejects"] == "demo/v0001/rejects"
        assert out["outputFacets"]["outputStatistics"]["rowCount"] == count.rows_out
        assert out["namespace"] == namespace
        previous = (out["namespace"], out["name"])
    assert previous == (namespace, "demo/v0001")  # the last stage's output is the version itself
    assert stage_done["synthesize.dedup"]["outputs"][0]["name"] == "demo/v0001@dedup"
    pair = stage_done["synthesize.pair"]
    assert (pair["inputs"][0]["namespace"], pair["inputs"][0]["name"]) == (namespace, "demo/v0001@dedup")  # pairs start from what dedup kept
    assert pair["outputs"][0]["name"] == "demo-pairs/v0001" and pair["outputs"][0]["outputFacets"]["outputStatistics"]["rowCount"] == 2

    # the flow run: its inputs, both versions out with schema and store identity, recipe and code
    start, complete = runs[recorder.run_id]
    assert start["job"]["facets"]["jobType"]["jobType"] == "FLOW" and stage_done["synthesize.verify"]["job"]["facets"]["jobType"]["jobType"] == "STAGE"
    assert start["job"]["facets"]["documentation"]["description"] == "a test run"
    (seed_in,) = complete["inputs"]
    assert (seed_in["namespace"], seed_in["name"]) == ("file", str(seeds))
    assert seed_in["facets"]["distillery"]["sha256"] == "b" * 64 and seed_in["inputFacets"]["dataQualityMetrics"]["rowCount"] == 6
    outputs = {o["name"]: o for o in complete["outputs"]}
    assert set(outputs) == {"demo/v0001", "demo-pairs/v0001"}
    sft = outputs["demo/v0001"]
    assert sft["namespace"] == namespace and sft["outputFacets"]["outputStatistics"]["rowCount"] == 3
    assert [(f["name"], f["type"]) for f in sft["facets"]["schema"]["fields"]] == [("sample_id", "String"), ("completion", "String"), ("reward", "Float64")]
    ident = sft["facets"]["distillery"]
    assert (ident["version"], ident["manifest"], ident["contract"], ident["kind"]) == ("v0001", "demo/v0001/manifest.json", "curated@1.0.0", "demo")
    manifest = store.manifest("demo")
    assert sft["outputFacets"]["outputStatistics"]["size"] == sum(s["bytes"] for s in manifest["shards"])
    run_facet = complete["run"]["facets"]["distillery_run"]
    assert run_facet == {**run_facet, "flowRunId": recorder.flow_run_id, "recipeHash": "a" * 64, "codeVersion": "0.1.0+gtest", "model": "tiny-model"}
    assert "recipe" not in json.dumps(complete["run"]["facets"]).replace("recipeHash", "")


def test_a_raising_flow_ends_with_fail_and_its_error(tmp_path, no_endpoint, monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "tok-3f9a1c77")
    store = Store(str(tmp_path / "store"))
    error = RuntimeError("seeds unreadable at s3://alice:hunter22@bucket/seeds.jsonl (token tok-3f9a1c77)")
    recorder = _run(store, tmp_path / "seeds.jsonl", fail=error)
    events = read_events(store, recorder.flow_run_id)
    for e in events:
        validate(e)
    start, fail = (e for e in events if e["run"]["runId"] == recorder.run_id)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert events[-1] == fail
    message = fail["run"]["facets"]["errorMessage"]
    assert message["message"].startswith("RuntimeError: seeds unreadable") and message["programmingLanguage"] == "PYTHON"
    assert "RuntimeError" in message["stackTrace"]
    text = json.dumps(events)
    assert "hunter22" not in text and "tok-3f9a1c77" not in text and "s3://***@bucket" in message["message"]
    # the version published before the error is in the lineage, with its stage; nothing else is
    assert [o["name"] for o in fail["outputs"]] == ["demo-pairs/v0001"]
    pair_events = [e for e in events if e["job"]["name"] == "synthesize.pair"]
    assert [e["eventType"] for e in pair_events] == ["START", "COMPLETE"]
    assert pair_events[1]["inputs"][0]["name"] == str(tmp_path / "seeds.jsonl")  # no dedup output to start from: the run's input


def test_an_interrupted_run_is_an_abort(tmp_path, no_endpoint):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(KeyboardInterrupt), LineageRecorder("curate", "local-7", store):
        raise KeyboardInterrupt
    events = read_events(store, "local-7")
    assert [e["eventType"] for e in events] == ["START", "ABORT"]
    assert events[0]["run"]["runId"] == lineage_run_id("local-7") == str(uuid.uuid5(uuid.NAMESPACE_URL, "distillery:flow-run:local-7"))
    for e in events:
        validate(e)


def test_a_retried_flow_run_keeps_both_attempts(tmp_path, no_endpoint):
    store = Store(str(tmp_path / "store"))
    run_id = str(uuid.uuid4())
    with pytest.raises(ValueError), LineageRecorder("curate", run_id, store):
        raise ValueError("first attempt")
    with LineageRecorder("curate", run_id, store):
        pass
    assert [e["eventType"] for e in read_events(store, run_id)] == ["START", "FAIL", "START", "COMPLETE"]


def test_a_store_that_cannot_take_the_start_fails_the_run_before_any_work(tmp_path, no_endpoint):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError), LineageRecorder("curate", "local-1", Store(str(tmp_path / "file"))):
        pytest.fail("the body must not run")


def test_input_identities():
    assert dataset_for_uri("s3://bucket/seeds/train.jsonl") == ("s3://bucket", "seeds/train.jsonl")
    assert dataset_for_uri("/data/store/demo/v0003") == ("file:///data/store", "demo/v0003")
    assert dataset_for_uri("s3://bucket/team/demo/v0012") == ("s3://bucket/team", "demo/v0012")
    assert dataset_for_uri("builtin:one-step?count=8&seed=0") == ("builtin", "one-step?count=8&seed=0")
    assert dataset_for_uri("https://bob:pw@example.org/x/seeds.jsonl") == ("https://***@example.org", "/x/seeds.jsonl")
    assert dataset_for_uri("seeds.jsonl")[1] == str(Path("seeds.jsonl").resolve())
    assert store_namespace(Store("s3://bucket/prefix/")) == "s3://bucket/prefix"
    assert redact("http://u:p4ss@h/x") == "http://***@h/x"
    # one rule for URIs everywhere (distillery.uri_io.redact_uri): a bare token@ is a secret too
    assert redact("pull https://ghp_abc123@github.com/o/r failed") == "pull https://***@github.com/o/r failed"
    assert dataset_for_uri("https://tok3n@example.org/x/seeds.jsonl") == ("https://***@example.org", "/x/seeds.jsonl")


# -- a real HTTP endpoint -------------------------------------------------------------------------
class _Lineage(BaseHTTPRequestHandler):
    received: list[tuple[str, dict, bytes]]

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, dict(self.headers), body))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Lineage)
    server.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.received
    server.shutdown()
    server.server_close()


def test_events_go_to_an_openlineage_endpoint_too(tmp_path, no_endpoint, endpoint, monkeypatch):
    url, received = endpoint
    monkeypatch.setenv("OPENLINEAGE_URL", url)
    monkeypatch.setenv("OPENLINEAGE_API_KEY", "ol-key-5be1f09d")
    env_before = dict(os.environ)
    store = Store(str(tmp_path / "store"))
    recorder = _run(store, tmp_path / "seeds.jsonl", client="auto")
    assert dict(os.environ) == env_before  # the client's copies of the URL and key are gone again
    stored = read_events(store, recorder.flow_run_id)
    assert len(received) == len(stored) and recorder.unsent == 0
    sent = []
    for path, headers, body in received:
        assert path == "/api/v1/lineage" and headers["Content-Type"] == "application/json"
        assert headers["Authorization"] == "Bearer ol-key-5be1f09d"
        assert b"ol-key-5be1f09d" not in body
        event = json.loads(body)
        validate(event)
        sent.append(event)
    # the same events, in the same order; the client adds only its own tags facet
    for s in sent:
        tags = s["run"]["facets"].pop("tags")
        assert {t["key"] for t in tags["tags"]} == {"openlineage_client_version"}
    assert sent == stored
    assert all("ol-key-5be1f09d" not in (tmp_path / "store" / key).read_text() for key in recorder.keys)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_dead_endpoint_is_a_warning_and_the_run_goes_on(tmp_path, no_endpoint, monkeypatch):
    monkeypatch.setenv("OPENLINEAGE_URL", f"http://127.0.0.1:{_closed_port()}")
    store = Store(str(tmp_path / "store"))
    records = _Records()
    logger = logging.getLogger("distillery.lineage")  # outside a Prefect run, the recorder logs here
    logger.addHandler(records)
    try:
        recorder = _run(store, tmp_path / "seeds.jsonl", client="auto")
    finally:
        logger.removeHandler(records)
    events = read_events(store, recorder.flow_run_id)
    assert events[-1]["eventType"] == "COMPLETE" and len(events) == len(recorder.keys) == recorder.unsent
    warnings = records.messages
    assert any("OpenLineage endpoint failed" in w for w in warnings), warnings
    assert any(f"{len(events)} of {len(events)} events not sent" in w for w in warnings), warnings
    assert store.manifest("demo")["version"] == "v0001"


# -- a real flow: embedded Prefect, no Ray, no vLLM ----------------------------------------------
@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = tmp_path_factory.mktemp("prefect")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield home
        APILogWorker.drain_all(timeout=10)
        SubprocessASGIServer().stop()


def test_a_failing_flow_run_records_start_and_fail(prefect_home, tmp_path, no_endpoint):
    """``train_reward_model`` on a version without usable problems: the flow raises its clear error,
    and the store has the flow run's START and FAIL, with the version it read as its input."""
    from distillery.model_setup import ModelNotFound, resolve_model_path
    from flows.train_reward_model import train_reward_model

    try:
        resolve_model_path("embedded")
    except ModelNotFound as err:
        pytest.skip(str(err))
    store = Store(str(tmp_path / "store"))
    rows = pl.DataFrame({"sample_id": ["a-0", "a-1"], "seed_id": ["a", "a"], "completion": ["x", "y"], "question": ["q", "q"], "correct": [True, True]})
    source = _publish(store, "samples", rows, [StageCount("ingest", 2, 2)], "r")
    with pytest.raises(ValueError, match="problem\\(s\\) with both correct and incorrect samples") as raised:
        train_reward_model(source.uri, "rm", store=store.root)
    (prefix,) = [f"{LINEAGE_DIR}/{d}/{r}" for d in store.children(LINEAGE_DIR) for r in store.children(f"{LINEAGE_DIR}/{d}")]
    events = read_events(store, prefix.rsplit("/", 1)[1])
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [("train_reward_model", "START"), ("train_reward_model", "FAIL")]
    for e in events:
        validate(e)
    fail = events[1]
    assert str(raised.value)[:80] in fail["run"]["facets"]["errorMessage"]["message"]
    assert [(i["namespace"], i["name"]) for i in fail["inputs"]] == [(store_namespace(store), "samples/v0001")]
    assert fail["outputs"] == [] and fail["run"]["facets"]["distillery_run"]["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    uuid.UUID(fail["run"]["facets"]["distillery_run"]["flowRunId"])  # the Prefect flow run id
    assert store.datasets() == ["samples"]


def test_a_curate_flow_run_records_every_stage(prefect_home, tmp_path, no_endpoint):
    """``curate`` end to end (embedded Prefect; no Ray for this small input): START, a START and a COMPLETE per stage
    with the manifest's counts, COMPLETE with the input file and the published version."""
    from flows.curate import curate
    from schemas.recipe import CurateRecipe

    text = "Worker {i} packs {a} boxes and then {b} more boxes, so the total is {a} + {b} = {c} boxes for order {i}."
    rows = [{"id": f"r{i}", "completion": text.format(i=i, a=3 * i + 7, b=5 * i + 11, c=8 * i + 18)} for i in range(6)]
    rows += [{"id": "dup", "completion": rows[0]["completion"]}, {"id": "short", "completion": "42"}]
    source = tmp_path / "input.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    store = Store(str(tmp_path / "store"))
    recipe = CurateRecipe(name="demo", id_column="id", description="curated demo")
    uri = curate(recipe, str(source), store=store.root)
    manifest = store.manifest("demo")
    assert uri == store.uri("demo/v0001")
    events = read_events(store, manifest["flow_run_id"])
    for e in events:
        validate(e)
    stages = [s["stage"] for s in manifest["counts"]["stages"]]
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("curate", "START"),
        *[(f"curate.{s}", t) for s in stages for t in ("START", "COMPLETE")],
        ("curate", "COMPLETE"),
    ]
    done = {e["job"]["name"]: e for e in events if e["eventType"] == "COMPLETE"}
    for s in manifest["counts"]["stages"]:
        acc = done[f"curate.{s['stage']}"]["inputs"][0]["inputFacets"]["distillery_rowAccounting"]
        assert (acc["rowsIn"], acc["rowsOut"], acc["fanout"], acc["dropped"]) == (s["rows_in"], s["rows_out"], s["fanout"], s["dropped"])
        assert done[f"curate.{s['stage']}"]["run"]["facets"]["parent"]["run"]["runId"] == events[0]["run"]["runId"]
    assert done["curate.ingest"]["inputs"][0]["inputFacets"]["distillery_rowAccounting"]["dropped"] == {"invalid_json": 1}
    complete = events[-1]
    assert [(i["namespace"], i["name"]) for i in complete["inputs"]] == [("file", str(source))]
    (out,) = complete["outputs"]
    assert (out["namespace"], out["name"]) == (store_namespace(store), "demo/v0001")
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == manifest["counts"]["published"]
    assert complete["run"]["facets"]["distillery_run"]["recipeHash"] == manifest["recipe_hash"]
    assert complete["job"]["facets"]["documentation"]["description"] == "curated demo"


def test_events_on_an_s3_store(s3, no_endpoint):
    bucket = f"lineage-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    store = Store(f"s3://{bucket}/team")
    recorder = _run(store, Path("/data/seeds.jsonl"))
    events = read_events(store, recorder.flow_run_id)
    assert len(events) == len(recorder.keys) == 2 + 2 * (len(SFT_STAGES) + len(PAIR_STAGES))
    for e in events:
        validate(e)
    assert events[-1]["outputs"][0]["namespace"] == f"s3://{bucket}/team"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="team/_lineage/")["Contents"]]
    assert sorted(keys) == sorted(f"team/{k}" for k in recorder.keys)
    assert store.datasets() == ["demo", "demo-pairs"]


def test_the_job_namespace_can_be_set(tmp_path, no_endpoint, monkeypatch):
    monkeypatch.setenv("OPENLINEAGE_NAMESPACE", "team-a")
    store = Store(str(tmp_path / "store"))
    recorder = _run(store, tmp_path / "seeds.jsonl")
    events = read_events(store, recorder.flow_run_id)
    assert {e["job"]["namespace"] for e in events} == {"team-a"}
    assert {e["run"]["facets"]["parent"]["job"]["namespace"] for e in events if "parent" in e["run"]["facets"]} == {"team-a"}
