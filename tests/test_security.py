"""Security (issue 6): names and paths cannot leave the store, and credentials never appear in
logs, manifests, lineage events, cards, plots or any other artifact.

- Data set names, tags, store keys, version URIs and the dashboard's URLs are checked here
  against ``../``-style escapes, with real CLI subprocesses and a real uvicorn server.
- A real ``distillery curate`` runs against moto's S3 server on loopback with distinctive
  credentials in the environment (AWS keys, a session token, an OpenLineage URL with a password
  and an API key, sent to a real HTTP endpoint on loopback); every object in the bucket, the
  events the endpoint received, the CLI's output, the Prefect database and the run's Ray logs are
  searched for them.
- URIs that carry credentials (``s3://KEY:SECRET@bucket``, ``http://user:pass@host``, an
  ``s3://`` URI with a query string) are refused with the secret masked; a recipe field that holds
  one is a recipe error, so a secret can never reach a manifest's ``recipe``.
- Recipes run no code nobody wrote: templates from recipes (``--set``, the file, a deployment's
  ``overrides``) that reach Python's internals are recipe errors naming the field (exit 2) before
  anything starts, and the stages render in Jinja2's sandbox; YAML alias bombs ("billion
  laughs"), self-referring aliases and endless nesting are refused within a second.
- The Prefect server's API auth (``PREFECT_SERVER_API_AUTH_STRING``: 401 without or with a wrong
  string, 200 with it) is tested in ``tests/test_deployments.py``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest

from distillery.store import Store, open_version, parse_version_uri
from distillery.uri_io import StorageError, read_bytes, s3_client
from tests.conftest import free_port
from tests.test_store_publish import publish_demo, sample_rows

ROOT = Path(__file__).resolve().parents[1]
ESCAPES = ["../x", "a/../../b", "..", "/etc/passwd", "x/..", "demo/../../etc"]


@pytest.fixture(autouse=True)
def _own_prefect_home(tmp_path, monkeypatch, shared_prefect):
    """Each CLI run here gets its own Prefect home: Prefect creates the folder without its
    parents, so an inherited PREFECT_HOME may not be usable. The runs report to the session's
    ``prefect server`` (``shared_prefect``) rather than each starting a temporary one."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout
    )


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------ (a) nothing leaves the store
def test_names_tags_and_keys_cannot_leave_the_store(tmp_path):
    store_dir = tmp_path / "team" / "store"
    store = Store(str(store_dir))
    publish_demo(store, sample_rows(2))
    before = _tree(tmp_path)
    for name in ESCAPES:
        with pytest.raises(ValueError, match="data set name"):
            store.claim_version(name, "run")
        with pytest.raises(ValueError, match="data set name"):
            store.manifest(name)
        with pytest.raises(ValueError, match="data set name"):
            store.tags(name)
    for tag in ["a/b", "../x", "..", "../../etc/passwd", "x/../..", "latest", "v0001"]:
        with pytest.raises(ValueError, match="tag"):
            store.tag("demo", tag, "v0001")
        with pytest.raises(ValueError, match="tag"):
            store.untag("demo", tag)
    for key in ["../outside", "demo/../../outside", "/tmp/outside", "demo/v0001/../../../outside", "demo\\..\\..\\outside"]:
        with pytest.raises(ValueError, match="would leave the store"):
            store.put(key, b"written outside")
        for read in (store.get, store.exists, store.delete, store.children):
            with pytest.raises(ValueError, match="would leave the store"):
                read(key)
    assert _tree(tmp_path) == before  # nothing written anywhere, inside or out
    assert store.manifest("demo")["version"] == "v0001"  # and the store still works


def test_version_uris_cannot_climb_out_of_their_store(tmp_path):
    inside, other = Store(str(tmp_path / "store")), Store(str(tmp_path / "other"))
    publish_demo(inside, sample_rows(2))
    publish_demo(other, sample_rows(3))
    message = "'..' is not allowed after the start of a version URI"
    for uri in [f"{tmp_path}/store/../other/demo/v0001", f"{tmp_path}/store/demo@stable/../../other/demo", f"{tmp_path}/store/x/../../other/demo/v0001", "s3://bucket/team/../other/demo/v0001"]:
        with pytest.raises(ValueError, match=message):
            parse_version_uri(uri, default_version="latest")
        with pytest.raises(ValueError, match=message):
            open_version(uri, what="dedup.against")
    with pytest.raises(ValueError, match="tag '..'"):
        open_version(f"{tmp_path}/store/demo@..", what="dedup.against")
    with pytest.raises(ValueError, match="'..' is not allowed in an S3 store URI"):
        Store("s3://bucket/team/../other")
    # a relative path may start with ../ (relative to the working folder), and names the same version
    relative = os.path.relpath(tmp_path / "store", Path.cwd())
    store, manifest = open_version(f"{relative}/demo/v0001", what="input")
    assert store.root == inside.root and manifest["version"] == "v0001"


def test_the_cli_refuses_escaping_names_and_writes_nothing_outside(tmp_path):
    store_dir = tmp_path / "store"
    Store(str(store_dir))
    publish_demo(Store(str(store_dir)), sample_rows(2))
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": "Adding 2 and 2 gives 4 apples for the basket."}) + "\n")
    before = _tree(tmp_path)

    out = _cli("curate", str(data), "--name", "../escaped", "--store", str(store_dir))
    assert out.returncode == 2 and "field 'name': Value error, recipe names are 1-64 of a-z 0-9 . _ - and start with a letter or digit (got '../escaped')" in out.stderr
    out = _cli("curate", str(data), "--name", "ok", "--set", "publish.dataset=../../etc", "--store", str(store_dir))
    assert out.returncode == 2 and "field 'publish.dataset'" in out.stderr
    out = _cli("curate", f"{store_dir}/../other/demo/v0001", "--name", "ok", "--store", str(store_dir))
    assert out.returncode == 2 and "'..' is not allowed after the start of a version URI" in out.stderr
    for name in ["../x", "a/../../b", "/etc"]:
        out = _cli("datasets", "--store", str(store_dir), "show", name)
        assert out.returncode == 2 and f"data set name {name!r}" in out.stderr and "Traceback" not in out.stderr
    out = _cli("datasets", "--store", str(store_dir), "show", "demo", "../../etc/passwd")
    assert out.returncode == 2 and "tag '../../etc/passwd'" in out.stderr and "Traceback" not in out.stderr
    out = _cli("datasets", "--store", str(store_dir), "tag", "demo", "../../pwned")
    assert out.returncode == 1 and "tag '../../pwned'" in out.stderr
    assert _tree(tmp_path) == before


class _Uvicorn:
    """The dashboard in a real uvicorn server on loopback, in a thread."""

    def __init__(self, store: str) -> None:
        import uvicorn

        from distillery.ui import create_app

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(store), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def get(self, raw_path: str) -> tuple[int, str]:
        """GET exactly this path: http.client sends it as it is (no dot-segment clean-up)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", raw_path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_the_dashboard_serves_nothing_outside_the_store(tmp_path):
    marker = f"outside-the-store-{uuid.uuid4().hex}"
    store_dir = tmp_path / "store"
    store = Store(str(store_dir))
    publish_demo(store, sample_rows(2))
    (tmp_path / "secret.txt").write_text(marker)
    outside = sample_rows(1).with_columns(pl.lit(marker).alias("completion"))
    outside.write_parquet(tmp_path / "outside.parquet")
    # a version whose manifest points at files outside the store (written by whoever can write the store)
    manifest = json.loads((store_dir / "demo/v0001/manifest.json").read_text())
    import hashlib

    digest = hashlib.sha256((tmp_path / "outside.parquet").read_bytes()).hexdigest()
    manifest.update(version="v0002", shards=[{"path": "../../../outside.parquet", "rows": 1, "bytes": 1, "sha256": digest}])
    manifest["plots"] = [{"path": "plots/../../../secret.txt", "sha256": None}]
    (store_dir / "demo/v0002").mkdir()
    (store_dir / "demo/v0002/manifest.json").write_text(json.dumps(manifest))

    server = _Uvicorn(str(store_dir))
    try:
        assert server.get("/d/demo/v0001/rows")[0] == 200  # the server works
        for path in [
            "/d/../secret.txt",
            "/d/..%2F..%2Fsecret.txt",
            "/d/demo/..%2F..%2F..%2Fsecret.txt",
            "/d/demo/../../../secret.txt/rows",
            "/d/%2E%2E/v0001/rows",
            "/d/demo/%2E%2E%2F%2E%2E%2Fsecret.txt/rows",
            "/d/demo/v0001/plots/..%2F..%2F..%2Fsecret.txt",
            "/d/demo/v0001/plots/%2E%2E",
            "/d/demo/v0002/plots/..%2F..%2F..%2Fsecret.txt",
            "/d/demo/v0001/manifest.json/../../../../secret.txt",
            "/../../secret.txt",
            "/d/demo/..%5C..%5Csecret.txt/rows",
        ]:
            status, body = server.get(path)
            assert status in (400, 404), (path, status)
            assert marker not in body, path
        status, body = server.get("/d/%2E%2E/etc")
        assert status == 404 and "data set name" in body
        # the tampered version: its shard path would leave the store, so it is refused, not read
        status, body = server.get("/d/demo/v0002/rows")
        assert status == 500 and "would leave the store" in body and marker not in body
    finally:
        server.stop()


# ------------------------------------------------------------------ (b) credentials never leak
def test_uris_with_credentials_are_refused_with_the_secret_masked(tmp_path):
    secret = f"uri-secret-{uuid.uuid4().hex[:12]}"
    for uri in [f"s3://AKIAEXAMPLE:{secret}@bucket/seeds.jsonl", f"http://user:{secret}@127.0.0.1:9/seeds.jsonl", f"s3://bucket/seeds.jsonl?X-Amz-Signature={secret}"]:
        with pytest.raises(StorageError) as err:
            read_bytes(uri)
        assert secret not in str(err.value) and ("***" in str(err.value))
        with pytest.raises(StorageError) as err:
            Store(uri)
        assert secret not in str(err.value)
    store = tmp_path / "store"
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"completion": "Adding 2 and 2 gives 4 apples for the basket."}) + "\n")
    runs = {
        ("curate", f"s3://AKIAEXAMPLE:{secret}@bucket/rows.jsonl", "--name", "x", "--store", str(store)): (
            1, "s3://***@bucket/rows.jsonl: it has credentials (user:password@); give credentials through the environment"),
        ("curate", f"http://user:{secret}@127.0.0.1:9/rows.jsonl", "--name", "x", "--store", str(store)): (
            1, "http://***@127.0.0.1:9/rows.jsonl: it has credentials (user:password@)"),
        ("curate", "http://127.0.0.1:9/rows.jsonl", "--name", "x", "--store", str(store)): (
            1, "http://127.0.0.1:9/rows.jsonl: unsupported URI scheme 'http'; use a local path or s3://bucket/key"),
        ("curate", str(data), "--name", "x", "--store", f"s3://AKIAEXAMPLE:{secret}@bucket/store"): (2, "--store: s3://***@bucket/store: it has credentials"),
        ("curate", str(data), "--name", "x", "--store", str(store), "--set", f"dedup.against=[s3://k:{secret}@bucket/store/x]"): (
            2, "field 'dedup.against.0': it has credentials (user:password@). A recipe is stored in every manifest, so it must hold no secrets"),
        ("run", "recipes/gsm8k-cot.yaml", "--set", f"seeds.path=s3://bucket/seeds.jsonl?X-Amz-Signature={secret}", "--store", str(store)): (
            2, "field 'seeds.path': an s3:// URI cannot have a query string (?...)"),
    }
    for args, (code, message) in runs.items():
        out = _cli(*args)
        assert out.returncode == code, (args, out.stderr)
        assert message in out.stderr, (args, out.stderr)
        assert secret not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert not store.exists()


class _LineageEndpoint(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append((self.path, dict(self.headers), body))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


def _files_containing(folder: Path, secrets: list[str], since: float = 0.0) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        try:
            if not path.is_file() or path.stat().st_mtime < since:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        hits += [f"{path}: {s[:6]}..." for s in secrets if s.encode() in data]
    return hits


def test_a_real_curate_on_s3_leaks_no_credential_anywhere(s3, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL")  # the embedded server: its database is checked below, in PREFECT_HOME
    tag = uuid.uuid4().hex[:10]
    secrets = {
        "AWS_ACCESS_KEY_ID": f"AKIALEAKTEST{tag.upper()}",
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{tag}-do-not-print",
        "AWS_SESSION_TOKEN": f"aws-session-token-{tag}-do-not-print",
        "OPENLINEAGE_API_KEY": f"ol-api-key-{tag}-do-not-print",
    }
    ol_password = f"ol-password-{tag}"
    everything = [*secrets.values(), ol_password]
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), _LineageEndpoint)
    endpoint.received = []
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()

    bucket = f"leak-{tag}"
    s3.create_bucket(Bucket=bucket)
    rows = [{"id": f"r{i}", "completion": f"Worker {i} packs {3 * i + 7} boxes and then {5 * i + 11} more, {8 * i + 18} in all on day {i}."} for i in range(6)]
    body = "\n".join(json.dumps(r) for r in rows) + "\n{broken json\n"
    s3.put_object(Bucket=bucket, Key="in/rows.jsonl", Body=body.encode())
    env = {
        **secrets,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "OPENLINEAGE_URL": f"http://lineage:{ol_password}@127.0.0.1:{endpoint.server_address[1]}",
        # this run's own Ray temp folder: its logs are searched below, and no other run's are there
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="rayl", dir="/tmp"),  # short: Ray's socket paths have a length limit
    }
    started = time.time()
    try:
        # signature tasks of 2 rows: the run's dedup goes through Ray (whose logs are searched below)
        out = _cli("curate", f"s3://{bucket}/in/rows.jsonl", "--name", "leaktest", "--store", f"s3://{bucket}/store", "--set", "id_column=id", "--set", "dedup.signature_task_rows=2", env=env)
    finally:
        endpoint.shutdown()
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == f"s3://{bucket}/store/leaktest/v0001"

    # the output and every object in the bucket: manifest, card, plots, data, rejects, lineage, signatures
    assert not [s for s in everything if s in out.stdout + out.stderr]
    keys = [o["Key"] for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
    for part in ("store/leaktest/v0001/manifest.json", "store/leaktest/v0001/card.md", "store/leaktest/v0001/data/", "store/leaktest/v0001/rejects/", "store/_lineage/"):
        assert any(k.startswith(part) for k in keys), (part, keys)
    for key in keys:
        data = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not [s for s in everything if s.encode() in data], key
    manifest = json.loads(s3_client().get_object(Bucket=bucket, Key="store/leaktest/v0001/manifest.json")["Body"].read())
    assert manifest["counts"]["stages"][0]["dropped"] == {"invalid_json": 1}  # the run did real work

    # the lineage endpoint got the events, with the API key in the header and nowhere in the events
    assert endpoint.received, "no lineage event reached the endpoint"
    for _, headers, event in endpoint.received:
        assert not [s for s in everything if s.encode() in event]
    # (the client sends the URL's user:password as basic auth, which wins over the API key's bearer)
    sent = {h.get("Authorization") or "" for _, h, _ in endpoint.received}
    assert all(a == f"Bearer {secrets['OPENLINEAGE_API_KEY']}" or ol_password in base64.b64decode(a.removeprefix("Basic ")).decode() for a in sent), sent

    # the Prefect database (flow run parameters and logs) and this run's Ray logs
    prefect_home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    assert prefect_home.is_dir()
    assert not _files_containing(prefect_home, everything, since=started - 1)
    ray_sessions = Path(env["RAY_TMPDIR"]) / "ray"
    assert list(ray_sessions.glob("session_*/logs/*")), "the run wrote no Ray log"
    assert not _files_containing(ray_sessions, everything, since=started - 1)
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


# ------------------------------------------------------------------ (c) recipes run no code nobody wrote
def _escapes(marker: Path) -> list[str]:
    """Server-side template injections that run ``touch MARKER`` outside a sandbox."""
    cmd = f"touch {marker}"
    return [
        f"{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}",
        f"{{{{ joiner.__init__.__globals__['os'].system('{cmd}') }}}}",
        f"{{{{ lipsum.__globals__['os'].popen('{cmd}').read() }}}}",
        "{{ question.__class__.__mro__[1].__subclasses__() }}",
        "{{ (question|attr('__class__')) }}",
        f"{{{{ (cycler|attr('_' ~ '_init__')|attr('_' ~ '_globals__'))['os'].popen('{cmd}').read() }}}}",
        "{{ '{0.__class__.__mro__}'.format(question) }}",
        f"{{% if question == 'never' %}}{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}{{% endif %}}",
        "{% include '/etc/passwd' %}",
    ]


def test_recipe_templates_are_sandboxed_and_checked_before_anything_starts(tmp_path):
    """A template from a recipe (``--set``, the file, a deployment's ``overrides``) that reaches
    Python's internals is a recipe error naming the field (exit 2) in seconds, before Prefect,
    Ray or an engine starts; the command never runs. The stages render in Jinja2's sandbox too,
    and the shipped templates still render there."""
    from jinja2.exceptions import SecurityError

    from distillery.prompts import PROMPTS, load_template
    from distillery.stages.score import judge_requests
    from distillery.stages.synthesize import build_messages
    from flows.deployments import curate_dataset, synthesize_recipe
    from schemas.recipe import GenerationConfig, RecipeError, load_recipe

    marker = tmp_path / "pwned"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"question": "What is 1+1?", "answer": "#### 2"}) + "\n")
    store = tmp_path / "store"
    escapes = _escapes(marker)
    for template in escapes:  # in-process: the same check the CLI makes
        for field in ("generation.prompt_template", "score.judge.template"):
            with pytest.raises(RecipeError, match=f"field '{field}': Value error, (refused template|not a valid Jinja2 template)"):
                load_recipe("recipes/gsm8k-cot.yaml", [f"seeds.path={seeds}", f"{field}={template}"])
    started = time.monotonic()
    for template in escapes[:2]:
        out = _cli("run", "recipes/gsm8k-cot.yaml", "--set", f"seeds.path={seeds}", "--set", f"generation.prompt_template={template}", "--store", str(store), timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert re.search(r"field 'generation.prompt_template': Value error, refused template: line 1: attribute '__\w+__': names starting with '_' are not allowed", out.stderr)
    recipe = tmp_path / "judge.yaml"
    recipe.write_text(f"name: judge\nseeds: {{path: {seeds}}}\nscore:\n  method: judge\n  judge:\n    template: \"{escapes[2]}\"\n")
    out = _cli("run", str(recipe), "--store", str(store), timeout=120)
    assert out.returncode == 2 and "field 'score.judge.template': Value error, refused template" in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - started < 60  # three CLI calls: no Prefect, no Ray, no engine started
    assert not store.exists()

    # a scheduled deployment gets the same check through its overrides (the flow's own function, no server)
    with pytest.raises(RecipeError, match="field 'generation.prompt_template'"):
        synthesize_recipe.fn("recipes/gsm8k-cot.yaml", store=str(store), overrides=[f"seeds.path={seeds}", f"generation.prompt_template={escapes[0]}"])
    with pytest.raises(RecipeError, match="an alias refers to a value that contains it"):  # and a curate deployment its YAML checks
        curate_dataset.fn(str(seeds), "x", store=str(store), overrides=["description=&a [*a]"])

    # the stages render in the sandbox even for a template that skipped validation
    unchecked = GenerationConfig.model_construct(**{**GenerationConfig().model_dump(), "prompt_template": escapes[0]})
    with pytest.raises(SecurityError):
        build_messages("What is 1+1?", unchecked)
    with pytest.raises(SecurityError):
        judge_requests(pl.DataFrame({"question": ["q"], "completion": ["c"], "sample_id": ["s"]}), template=escapes[0])
    assert not marker.exists()

    # what templates may do is unchanged: variables, filters, loops, conditions; the shipped ones render
    fine = "{% for word in question.split() %}{{ word | upper }} {% endfor %}{% if question|length > 3 %}(long){% endif %} Answer briefly."
    recipe_ok = load_recipe("recipes/gsm8k-cot.yaml", [f"seeds.path={seeds}", f"generation.prompt_template={fine}"])
    assert build_messages("two words", recipe_ok.generation)[-1]["content"] == "TWO WORDS (long) Answer briefly."
    values = {"question": "Q", "tasks": ["a", "b"], "concepts": ["x", "y"], "discipline": "d", "field": "f", "subject": "s", "session": 1, "sessions": 4, "prompt": "P", "answer": "4", "predicted": "3", "judge": ""}
    for path in sorted(PROMPTS.glob("*/*.j2")):
        assert load_template(path.parent.name, path.stem).render(**values).strip(), path

    # a template that is merely wrong names the variable it lacks, one that never ends is stopped
    for template, message in [
        ("{{ questoin }}", "the template fails with sample values: 'questoin' is undefined (it can use: question)"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "did not finish rendering a sample question within 2 s"),
        # a huge power is computed in C, holding the GIL: only ending the render's process stops it
        ("{% set n = question|length %}{% if (n * 1000) ** (n * 10000000) > 3 %}big{% endif %}", "did not finish rendering a sample question within 2 s"),
        ("{% for i in range(100000) %}{{ question * 100 }}{% endfor %}", "renders more than 1,000,000 characters"),
        ("{{ question * 10 ** 9 }}", "needs more than 1,024 MiB of memory to render a sample question"),
        ("{{ " * 5000 + "question" + " }}" * 5000, "not a valid Jinja2 template"),
    ]:
        started = time.monotonic()
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe("recipes/gsm8k-cot.yaml", [f"seeds.path={seeds}", f"generation.prompt_template={template}"])
        assert time.monotonic() - started < 10
    # ... and nothing of them goes on running here: a render left in a thread of this process kept
    # spinning (and holding the GIL) for the rest of the process's life
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.5


def _billion_laughs() -> str:
    lines = ["name: laughs", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    lines.append("description: *i")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bombs_and_endless_nesting_are_refused_within_a_second(tmp_path):
    """A recipe under 1 KB whose aliases expand to 9^9 values, one that refers to itself, one
    nested 100,000 levels deep: exit 2 with the reason, within a second of loading, whether the
    YAML comes as the file, a --set value, or a deployment's overrides. Ordinary aliases still work."""
    from flows.deployments import synthesize_recipe
    from schemas.recipe import RecipeError, load_recipe

    laughs = _billion_laughs()
    assert len(laughs.encode()) < 1024
    cases = {
        "laughs.yaml": (laughs, "is refused: its aliases expand to more than 100,000 values (an alias bomb, a 'billion laughs' file?)"),
        "self.yaml": ("name: x\ndescription: &a [1, *a]\n", "is refused: an alias refers to a value that contains it (line 2): a recursive structure"),
        "deep.yaml": ("name: x\ndescription: " + "[" * 100_000 + "]" * 100_000 + "\n", "is refused: it nests more than 64 levels deep"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        started = time.monotonic()
        with pytest.raises(RecipeError, match=re.escape(f"recipe {path} {message}")):
            load_recipe(path)
        assert time.monotonic() - started < 1.0, name
        started = time.monotonic()
        out = _cli("run", str(path), "--store", str(tmp_path / "store"), timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert f"distillery: error: recipe {path} {message}" in out.stderr
        assert time.monotonic() - started < 30  # the interpreter's start and imports; the refusal itself is under a second
        out = _cli("curate", str(path), "--name", "x", "--recipe", str(path), "--store", str(tmp_path / "store"), timeout=60)
        assert out.returncode == 2 and message in out.stderr

    for value, message in [
        ("&a [1, *a]", "--set description: the value is refused: an alias refers to a value that contains it"),
        ("[" * 100_000, "--set description: the value is refused: it nests more than 64 levels deep"),
    ]:  # a --set value is YAML too, and so is a deployment's override
        started = time.monotonic()
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe("recipes/gsm8k-cot.yaml", ["seeds.path=x.jsonl", f"description={value}"])
        assert time.monotonic() - started < 1.0
        with pytest.raises(RecipeError, match=re.escape(message)):
            synthesize_recipe.fn("recipes/gsm8k-cot.yaml", overrides=["seeds.path=x.jsonl", f"description={value}"])

    # aliases that expand to a sensible size are a YAML feature, still allowed
    shared = tmp_path / "shared.yaml"
    shared.write_text("name: shared\nseeds: {path: x.jsonl}\nself_instruct:\n  members: [&m {temperature: 0.2}, *m]\n")
    recipe = load_recipe(shared)
    assert [m.temperature for m in recipe.self_instruct.members] == [0.2, 0.2]
