"""The dashboard's pages through Starlette's TestClient (no browser): what each page shows, the
lineage graph's nodes and edges, escaping, clear 404s, and the same pages over an S3 store."""

import hashlib
import json
import re
import shutil
import uuid
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from distillery import ui
from distillery.cli import main
from distillery.store import Store
from tests.ui_store import SCRIPT, shared_ui_store

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shared_ui_store(tmp_path_factory)


@pytest.fixture(scope="module")
def client(built):
    return TestClient(ui.create_app(built[0]))


def _count(html: str, element_id: str) -> int:
    return int(re.search(rf'id="{element_id}"><strong>(\d+)</strong>', html).group(1))


def _edges(html: str) -> set[tuple[str, str, str]]:
    return set(re.findall(r'<path class="edge (\w+)" d="[^"]*" marker-end="[^"]*" data-src="([^"]*)" data-dst="([^"]*)"', html))


def test_index_lists_every_version_and_draws_the_lineage(client, built):
    root, made = built
    html = client.get("/").text
    for key, manifest in made.items():
        name, version = key.split("/")
        assert f'data-dataset="{name}" data-version="{version}"' in html
        assert f'href="/d/{name}/{version}"' in html
    assert '<span class="badge tag">stable</span>' in html
    edges = {(kind, src, dst) for kind, src, dst in _edges(html)}
    assert ("parent", "version:samples/v0002", "version:best/v0001") in edges
    assert ("trained_on", "version:samples/v0001", "version:rm/v0001") in edges
    assert ("scores", "version:rm/v0001", "version:best/v0001") in edges
    assert ("companion", "version:best/v0001", "version:best-pairs/v0001") in edges
    assert ("parent", "source:builtin:one-step?count=4&amp;seed=0", "version:samples/v0001") in edges
    model = f"model:{made['samples/v0001']['generator']['model']}@{made['samples/v0001']['generator']['model_sha256']}"
    assert ("model", model, "version:rm/v0001") in edges and ("model", model, "version:best/v0001") in edges
    assert ("recipe", f"recipe:{'e5' * 32}", "version:best-pairs/v0001") in edges
    # one flow run made both best and its pairs: one node, two edges
    run = "run:44444444-aaaa-4bbb-8ccc-000000000004"
    assert {("run", run, "version:best/v0001"), ("run", run, "version:best-pairs/v0001")} <= edges
    # version nodes are links to their pages
    assert '<a href="/d/best/v0001" class="node-link" data-node="version:best/v0001">' in html
    # hiding the flow runs and recipes removes their nodes and edges
    hidden = client.get("/?hide=run,recipe").text
    assert 'data-node="run:' not in hidden and 'data-node="recipe:' not in hidden and 'data-node="model:' in hidden


def test_layout_runs_left_to_right_without_overlaps(client, built):
    index = ui.StoreIndex(Store(built[0]))
    graph = ui.build_graph(index, index.entries())
    drawn = ui.layout(graph)
    boxes = {n["id"]: n for n in drawn["nodes"]}
    assert set(boxes) == set(graph.nodes)
    for (src, dst), _edge in graph.edges.items():
        assert boxes[src]["x"] < boxes[dst]["x"], (src, dst)  # every edge points right
    columns = {}
    for n in drawn["nodes"]:
        columns.setdefault(n["x"], []).append(n["y"])
    for ys in columns.values():
        ys.sort()
        assert all(b - a >= ui.NODE_H for a, b in zip(ys, ys[1:]))  # no two boxes overlap
        assert all(0 <= y <= drawn["height"] - ui.NODE_H for y in ys)


def test_version_page_links_parents_companions_and_serves_plots(client, built):
    root, made = built
    html = client.get("/d/best/v0001").text
    assert '<h1 id="title">best v0001' in html
    assert '<a class="parent" href="/d/samples/v0002">samples v0002</a>' in html
    assert '<a class="companion" href="/d/best-pairs/v0001">best-pairs v0001</a>' in html
    assert 'scored by reward model: <a href="/d/rm/v0001">rm v0001</a>' in html
    assert 'href="/d/best/v0001/rows">kept rows (2)' in html and 'href="/d/best/v0001/rejects">rejected rows (8)' in html
    assert "<h2>Row accounting</h2>" in html and "<table>" in html  # the card, rendered
    assert 'class="node version kind-sft-chain-of-thought current"' in html  # the neighbourhood graph marks this version
    # a reward model's page names its training data; a seeds parent outside the store is text
    rm = client.get("/d/rm/v0001").text
    assert 'trained on: <a href="/d/samples/v0001">samples v0001</a>' in rm
    samples = client.get("/d/samples/v0001").text
    assert '<span class="mono">builtin:one-step?count=4&amp;seed=0</span>' in samples
    assert "used as parent by" not in samples and 'trained: <a href="/d/rm/v0001">' in samples
    for plot in made["best/v0001"].get("plots") or []:  # drawn by publish when matplotlib is there
        assert f'src="/d/best/v0001/{plot["path"]}"' in html  # the card's relative image links resolve here
        response = client.get(f"/d/best/v0001/{plot['path']}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(PNG) and hashlib.sha256(response.content).hexdigest() == plot["sha256"]


def test_plots_listed_in_the_manifest_are_served_and_others_are_not(built, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(built[0], root)
    base = root / "best" / "v0001"
    image = PNG + b"not really a png"
    (base / "plots").mkdir(exist_ok=True)
    (base / "plots" / "extra.png").write_bytes(image)
    (base / "plots" / "unlisted.png").write_bytes(image)
    manifest = json.loads((base / "manifest.json").read_text())
    manifest["plots"] = [*(manifest.get("plots") or []), {"path": "plots/extra.png", "sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image)}]
    (base / "manifest.json").write_text(json.dumps(manifest))
    client = TestClient(ui.create_app(str(root)))
    assert client.get("/d/best/v0001/plots/extra.png").content == image
    page = client.get("/d/best/v0001").text  # not linked from the card: shown in the page's own gallery
    assert '<div class="gallery" id="plots">' in page and '<img src="/d/best/v0001/plots/extra.png" alt="extra.png"' in page
    missing = client.get("/d/best/v0001/plots/unlisted.png")
    assert missing.status_code == 404 and "no plot &#39;plots/unlisted.png&#39; in the manifest" in missing.text
    (base / "plots" / "extra.png").write_bytes(image + b"changed")
    changed = TestClient(ui.create_app(str(root))).get("/d/best/v0001/plots/extra.png")
    assert changed.status_code == 502 and "checksum mismatch" in changed.text


def test_rows_page_counts_and_columns(client, built):
    _, made = built
    for key in ("best/v0001", "samples/v0001", "best-pairs/v0001", "rm/v0001"):
        html = client.get(f"/d/{key}/rows").text
        assert _count(html, "row-count") == made[key]["counts"]["published"], key
        assert html.count("<tr>") - 1 == made[key]["counts"]["published"]  # header + one per row
    assert "<th>chosen</th>" in client.get("/d/best-pairs/v0001/rows").text
    assert "<th>split</th><th>correct</th><th>logit</th>" in client.get("/d/rm/v0001/rows").text
    seed = client.get("/d/best/v0001/rows?seed_id=best-0001").text
    assert _count(seed, "row-count") == 1 and "best-0001-s0" in seed and "best-0000-s0" not in seed


def test_rejects_filter_by_stage_and_reason(client, built):
    _, made = built
    html = client.get("/d/best/v0001/rejects").text
    assert _count(html, "reject-count") == made["best/v0001"]["counts"]["rejected"] == 8
    for stage, reason, n in (("dedup", "near_duplicate", 3), ("quality", "too_short", 4), ("quality", "repetitive", 1)):
        assert f'data-stage="{stage}" data-reason="{reason}">{reason} ({n})</a>' in html
        filtered = client.get(f"/d/best/v0001/rejects?stage={stage}&reason={reason}").text
        assert _count(filtered, "reject-count") == n
        assert filtered.count(f'<td class="text col-reason">{reason}</td>') == n
        assert f'class="reason active" data-stage="{stage}" data-reason="{reason}"' in filtered
    assert _count(client.get("/d/best/v0001/rejects?stage=quality").text, "reject-count") == 5
    assert _count(client.get("/d/best/v0001/rejects?reason=too_short").text, "reject-count") == 4
    assert _count(client.get("/d/best/v0001/rejects?reason=no-such-reason").text, "reject-count") == 0


def test_pages_split_into_pages(client, monkeypatch):
    monkeypatch.setattr(ui, "PAGE_SIZE", 3)
    first = client.get("/d/best/v0001/rejects").text
    assert "rejected rows 1–3 of 8 · page 1 of 3" in first and 'href="/d/best/v0001/rejects?page=2" rel="next"' in first
    last = client.get("/d/best/v0001/rejects?page=3").text
    assert "rejected rows 7–8 of 8 · page 3 of 3" in last and 'rel="prev"' in last and 'rel="next"' not in last
    filtered = client.get("/d/best/v0001/rejects?stage=quality&reason=too_short&page=2").text
    assert "rejected rows 4–4 of 4 · page 2 of 2" in filtered
    assert 'href="/d/best/v0001/rejects?page=1&amp;stage=quality&amp;reason=too_short" rel="prev"' in filtered
    assert "page 3 of 3" in client.get("/d/best/v0001/rejects?page=99").text  # past the end: the last page
    assert client.get("/d/best/v0001/rejects?page=x").status_code == 400


def test_completions_with_html_show_as_text(client):
    raw = SCRIPT
    escaped = "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;"
    for url in ("/d/best/v0001/rows", "/d/best/v0001/rejects", "/d/best/v0001/rejects?reason=too_short", "/d/best-pairs/v0001/rows"):
        html = client.get(url).text
        assert raw not in html and escaped in html, url
        assert "<b>bold</b>" not in html
    assert "&lt;b&gt;bold&lt;/b&gt;" in client.get("/d/best/v0001/rows").text


def test_unknown_data_set_version_and_tag_are_clear_404s(client):
    r = client.get("/d/nope/v0001")
    assert r.status_code == 404
    assert "no data set &#39;nope&#39; in this store (data sets: best, best-pairs, rm, samples)" in r.text
    r = client.get("/d/samples/v0009/rejects")
    assert r.status_code == 404 and "samples/v0009: no such version" in r.text and "(versions: v0001, v0002)" in r.text
    r = client.get("/d/samples/nightly")
    assert r.status_code == 404 and "no version or tag &#39;nightly&#39;" in r.text
    r = client.get("/d/Bad..Name/v0001")
    assert r.status_code == 404 and "data set name" in r.text
    assert client.get("/no/such/page").status_code == 404


def test_tags_and_latest_redirect_to_the_version(client):
    r = client.get("/d/samples/stable/rejects?reason=incorrect", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/d/samples/v0001/rejects?reason=incorrect"
    assert client.get("/d/samples/latest", follow_redirects=False).headers["location"] == "/d/samples/v0002"
    assert client.get("/d/samples", follow_redirects=False).headers["location"] == "/d/samples/v0002"


def test_a_changed_shard_is_an_error_page_not_wrong_rows(built, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(built[0], root)
    shard = next((root / "best" / "v0001" / "rejects").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes() + b"x")
    r = TestClient(ui.create_app(str(root))).get("/d/best/v0001/rejects")
    assert r.status_code == 500 and "checksum mismatch" in r.text


def test_empty_store_says_so(tmp_path):
    html = TestClient(ui.create_app(str(tmp_path))).get("/").text
    assert 'id="empty"' in html and "Nothing to draw" in html


def _mirror_to_s3(s3, root: str, bucket: str) -> str:
    """Upload a local store as if it had been published to S3: the same keys, with the URIs
    inside manifests and cards pointing at the S3 store (shard checksums are unchanged)."""
    s3.create_bucket(Bucket=bucket)
    s3_root = f"s3://{bucket}/team"
    for path in Path(root).rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name in ("manifest.json", "card.md"):
                data = data.replace(root.encode(), s3_root.encode())
            s3.put_object(Bucket=bucket, Key=f"team/{path.relative_to(root)}", Body=data)
    return s3_root


def test_s3_store(s3, built):
    root, made = built
    s3_root = _mirror_to_s3(s3, root, f"ui-{uuid.uuid4().hex[:12]}")
    client = TestClient(ui.create_app(s3_root))
    html = client.get("/").text
    assert s3_root in html and 'data-dataset="best" data-version="v0001"' in html
    assert ("parent", "version:samples/v0002", "version:best/v0001") in _edges(html)
    page = client.get("/d/best/v0001").text
    assert '<a class="parent" href="/d/samples/v0002">samples v0002</a>' in page and f"{s3_root}/best/v0001" in page
    assert _count(client.get("/d/best/v0001/rows").text, "row-count") == made["best/v0001"]["counts"]["published"]
    assert _count(client.get("/d/best/v0001/rejects?stage=quality&reason=too_short").text, "reject-count") == 4
    assert client.get("/d/samples/stable", follow_redirects=False).headers["location"] == "/d/samples/v0001"
    for plot in made["best/v0001"].get("plots") or []:
        assert client.get(f"/d/best/v0001/{plot['path']}").content.startswith(PNG)
    assert client.get("/d/nope/v0001").status_code == 404


def test_cli_refuses_a_store_that_does_not_exist(tmp_path, capsys):
    assert main(["ui", "--store", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
