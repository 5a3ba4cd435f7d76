"""The lineage dashboard (``distillery ui``): server-rendered pages over a store, local or S3.

- ``/``: the data sets and their versions, and the lineage graph across them (server-side SVG):
  seed sources, data set versions, models, recipes, flow runs and reward models, with edges
  parent -> child, model -> version, recipe -> version, flow run -> version, training data ->
  reward model, reward model -> the versions it scored and version -> its pairs companion.
- ``/d/NAME/VERSION``: one version's card, plots, parents, companions and lineage around it.
- ``/d/NAME/VERSION/rows`` and ``/d/NAME/VERSION/rejects``: a sample browser over the published
  rows and over the rejected ones, filtered by stage and reason.

Everything is read through :class:`distillery.store.Store` (so an ``s3://`` store works the same)
and shards through ``read_shards`` (checksums verified). Versions are immutable, so manifests and
shard tables are cached in memory; data set listings and tags are read on every request. Pages
are Jinja2 templates with autoescaping on; the card's markdown is rendered with raw HTML off. No
JavaScript, nothing loaded from outside the server.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from distillery.store import VERSION_DIR, Store, VersionNotFound, parse_version_uri
from distillery.uri_io import StorageError

TEMPLATES = Path(__file__).parent / "ui_templates"
PAGE_SIZE = 50
LONG_TEXT = 160  # characters shown before a cell folds into a <details> expander
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp"}


class NotFound(LookupError):
    """A data set, version, tag or file that is not in the store: a 404 with this message."""


# ------------------------------------------------------------------------------ store access
class StoreIndex:
    """Cached reads of one store: manifests and shard tables never change once published."""

    def __init__(self, store: Store, *, frames_cached: int = 8) -> None:
        self.store = store
        self._manifests: dict[tuple[str, str], dict] = {}
        self._frames: OrderedDict[tuple[str, str, str], object] = OrderedDict()
        self._frames_cached = frames_cached
        self._lock = threading.Lock()

    def datasets(self) -> list[str]:
        return self.store.datasets()

    def versions(self, name: str) -> list[str]:
        try:
            return self.store.versions(name)
        except ValueError:  # not a valid data set name
            return []

    def tags(self, name: str) -> dict[str, str]:
        return self.store.tags(name)

    def manifest(self, name: str, ref: str = "latest") -> dict:
        """The manifest ``ref`` (vNNNN, latest or a tag) names; :class:`NotFound` with a clear message if none."""
        if VERSION_DIR.match(ref) and (name, ref) in self._manifests:
            return self._manifests[name, ref]
        try:
            manifest = self.store.manifest(name, ref)
        except ValueError as err:  # a name or tag that cannot exist
            raise NotFound(str(err)) from None
        except VersionNotFound as err:
            versions = self.versions(name)
            if not versions:
                known = ", ".join(self.datasets()) or "none"
                raise NotFound(f"{self.store.uri(name)}: no data set {name!r} in this store (data sets: {known})") from None
            raise NotFound(f"{err} (versions: {', '.join(versions)})") from None
        self._manifests[name, manifest["version"]] = manifest
        return manifest

    def local_version(self, uri: str, default_version: str | None = None) -> tuple[str, str] | None:
        """(name, vNNNN) when ``uri`` names a complete version of this store, else None."""
        try:
            parsed = parse_version_uri(uri, default_version=default_version)
        except (ValueError, OSError):
            return None
        if parsed is None or parsed[0].root != self.store.root:
            return None
        try:
            return parsed[1], self.manifest(parsed[1], parsed[2])["version"]
        except (NotFound, StorageError):
            return None

    def frame(self, manifest: dict, kind: str):
        """A version's rows (``shards``) or rejects (``reject_shards``) as a polars frame, checksums verified."""
        from distillery.stages.publish import read_shards

        key = (manifest["dataset"], manifest["version"], kind)
        with self._lock:
            if key in self._frames:
                self._frames.move_to_end(key)
                return self._frames[key]
        if not manifest.get(kind):
            import polars as pl

            frame = pl.DataFrame()
        else:
            frame = read_shards(self.store, manifest, kind)
        with self._lock:
            self._frames[key] = frame
            while len(self._frames) > self._frames_cached:
                self._frames.popitem(last=False)
        return frame

    def entries(self) -> list[dict]:
        """Every data set with its tags and its versions' manifests, oldest version first."""
        out = []
        for name in self.datasets():
            tags = self.tags(name)
            manifests = [self.manifest(name, v) for v in self.versions(name)]
            if manifests:
                out.append({"name": name, "tags": tags, "manifests": manifests})
        return out


def version_href(name: str, version: str, sub: str = "", **query) -> str:
    """``/d/NAME/VERSION[/SUB][?QUERY]``; empty query values are left out."""
    href = f"/d/{quote(name)}/{quote(version)}" + (f"/{sub}" if sub else "")
    query = {k: v for k, v in query.items() if v not in (None, "")}
    return href + (f"?{urlencode(query)}" if query else "")


# ------------------------------------------------------------------------------ lineage graph
NODE_TYPES = {  # type -> (legend label, order in a column)
    "source": ("seed source", 0),
    "model": ("model", 1),
    "recipe": ("recipe", 2),
    "run": ("flow run", 3),
    "version": ("data set version", 4),
    "external": ("outside this store", 5),
}
EDGE_KINDS = {  # kind -> legend label
    "parent": "parent → child",
    "trained_on": "training data → reward model",
    "scores": "reward model → scored version",
    "companion": "version → its pairs",
    "model": "model used",
    "recipe": "recipe used",
    "run": "made by flow run",
}
HIDEABLE = ("source", "model", "recipe", "run")


@dataclass
class Node:
    id: str
    type: str
    label: str
    sub: str = ""
    title: str = ""
    href: str | None = None
    css: str = ""


@dataclass
class Edge:
    src: str
    dst: str
    kind: str
    title: str = ""


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edge] = field(default_factory=dict)

    def add_node(self, node: Node) -> str:
        self.nodes.setdefault(node.id, node)
        return node.id

    def add_edge(self, src: str, dst: str, kind: str, title: str = "") -> None:
        # one edge per pair; the specific kinds (training data, scores, companion) win over "parent"
        if (src, dst) not in self.edges or self.edges[src, dst].kind == "parent":
            self.edges[src, dst] = Edge(src, dst, kind, title)


def _short_kind(kind: str | None) -> str:
    return {"sft-chain-of-thought": "sft", "preference-pairs": "pairs", "reward-model": "reward model"}.get(kind or "", kind or "samples")


def version_node_id(name: str, version: str) -> str:
    return f"version:{name}/{version}"


def _version_node(index: StoreIndex, manifest: dict, tags: dict[str, str] | None = None) -> Node:
    name, version = manifest["dataset"], manifest["version"]
    counts = manifest.get("counts") or {}
    kind = manifest.get("kind")
    unit = "examples" if kind == "reward-model" else "pairs" if kind == "preference-pairs" else "rows"
    here = [t for t, v in (tags or {}).items() if v == version]
    title = f"{index.store.uri(f'{name}/{version}')}\nkind: {kind or 'unspecified'}\ncreated: {manifest.get('created_at')}"
    title += f"\npublished: {counts.get('published')}, rejected: {counts.get('rejected')}" + (f"\ntags: {', '.join(here)}" if here else "")
    return Node(
        version_node_id(name, version),
        "version",
        f"{name} {version}",
        f"{_short_kind(kind)} · {counts.get('published', '?')} {unit}" + (f" · {', '.join(here)}" if here else ""),
        title,
        version_href(name, version),
        f"kind-{(kind or 'samples').replace('_', '-')}",
    )


def _source_node(uri: str, parent: dict | None = None) -> Node:
    if "/" in uri and not uri.startswith("builtin:"):
        head, _, tail = uri.rstrip("/").rpartition("/")
        label, sub = tail, head
    else:
        label, _, sub = uri.partition("?")
    title = uri + (f"\nrows read: {parent.get('rows')}" if parent and parent.get("rows") is not None else "")
    title += f"\nsha256: {parent['sha256']}" if parent and parent.get("sha256") else ""
    return Node(f"source:{uri}", "source", label, sub, title)


def build_graph(index: StoreIndex, entries: list[dict], hide: set[str] = frozenset()) -> Graph:
    """The lineage of every version in ``entries`` (see the module docstring for the edges)."""
    graph = Graph()
    tags_of = {e["name"]: e["tags"] for e in entries}

    def version_id(ref: tuple[str, str]) -> str:
        return graph.add_node(_version_node(index, index.manifest(*ref), tags_of.get(ref[0])))

    def external(uri: str, what: str) -> str:
        return graph.add_node(Node(f"external:{uri}", "external", what, uri, uri))

    for entry in entries:
        for m in entry["manifests"]:
            vid = graph.add_node(_version_node(index, m, entry["tags"]))
            for parent in m.get("parents") or []:
                uri = str(parent.get("uri"))
                ref = index.local_version(uri)
                if ref:
                    graph.add_edge(version_id(ref), vid, "parent", f"parent: {uri}")
                else:
                    graph.add_edge(graph.add_node(_source_node(uri, parent)), vid, "parent", f"parent: {uri}")
            training = (m.get("training_data") or {}).get("uri")
            if training:
                ref = index.local_version(training, "latest")
                src = version_id(ref) if ref else external(training, "training data")
                graph.add_edge(src, vid, "trained_on", f"trained on {training}")
            generator = m.get("generator") or {}
            model = generator.get("model") or (m.get("base_model") or {}).get("name")
            if model:
                sha = generator.get("model_sha256") or (m.get("base_model") or {}).get("sha256") or ""
                owner, _, short = model.rpartition("/")
                sub = " · ".join(x for x in (owner, sha[:12]) if x)
                title = f"{model}\nsha256: {sha or 'unknown'}\nengine: {generator.get('engine_version') or generator.get('engine') or '?'}"
                mid = graph.add_node(Node(f"model:{model}@{sha}", "model", short or model, sub, title))
                graph.add_edge(mid, vid, "model", "base model" if m.get("kind") == "reward-model" else "generated by")
            recipe_hash = m.get("recipe_hash")
            if recipe_hash:
                recipe_name = (m.get("recipe") or {}).get("name") or "?"
                title = f"recipe {recipe_name}\nsha256: {recipe_hash}"
                graph.add_edge(graph.add_node(Node(f"recipe:{recipe_hash}", "recipe", f"recipe {recipe_name}", f"sha256 {recipe_hash[:12]}", title)), vid, "recipe")
            run_id = m.get("flow_run_id")
            if run_id:
                rid = graph.add_node(Node(f"run:{run_id}", "run", f"flow run {str(run_id)[:8]}", "Prefect flow run", f"flow run {run_id}"))
                graph.add_edge(rid, vid, "run")
            reward_model = (m.get("scorer") or {}).get("reward_model")
            if reward_model:
                ref = index.local_version(reward_model, "latest")
                src = version_id(ref) if ref else external(reward_model, "reward model")
                pinned = ref is not None and (VERSION_DIR.match(reward_model.rstrip("/").rsplit("/", 1)[-1]) is not None)
                graph.add_edge(src, vid, "scores", f"scored by {reward_model}" + ("" if pinned or not ref else f" (resolves to {ref[1]} now)"))
            for what, uri in (m.get("companions") or {}).items():
                ref = index.local_version(str(uri))
                dst = version_id(ref) if ref else external(str(uri), what.replace("_", " "))
                graph.add_edge(vid, dst, "companion", what.replace("_", " "))
    if hide:
        keep = {k for k, n in graph.nodes.items() if n.type not in hide}
        graph.nodes = {k: n for k, n in graph.nodes.items() if k in keep}
        graph.edges = {k: e for k, e in graph.edges.items() if e.src in keep and e.dst in keep}
    return graph


def neighbourhood(graph: Graph, node_id: str) -> Graph:
    """The part of ``graph`` upstream and downstream of one node."""
    succs, preds = defaultdict(set), defaultdict(set)
    for src, dst in graph.edges:
        succs[src].add(dst)
        preds[dst].add(src)
    keep = {node_id}
    for links in (succs, preds):
        todo = [node_id]
        while todo:
            for nxt in links[todo.pop()] - keep:
                keep.add(nxt)
                todo.append(nxt)
    return Graph({k: n for k, n in graph.nodes.items() if k in keep}, {k: e for k, e in graph.edges.items() if e.src in keep and e.dst in keep})


NODE_W, NODE_H, COL_GAP, ROW_GAP, MARGIN = 204, 42, 66, 14, 12
DUMMY_H, DUMMY_GAP = 4, 5  # a long edge's waypoint in a column it crosses
LABEL_CHARS, SUB_CHARS = 27, 32


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _pack(col: list[str], want: dict[str, float], height: dict[str, float]) -> dict[str, float]:
    """Tops as near ``want`` as the order and spacing allow: the mean of packing downwards from
    the top and upwards from the bottom (both keep the spacing, so their mean does too)."""

    def gap(a: str, b: str) -> float:
        return DUMMY_GAP if a.startswith("~") and b.startswith("~") else ROW_GAP

    down, up = {}, {}
    for i, n in enumerate(col):
        down[n] = want[n] if i == 0 else max(want[n], down[col[i - 1]] + height[col[i - 1]] + gap(col[i - 1], n))
    for i in range(len(col) - 1, -1, -1):
        n = col[i]
        up[n] = want[n] if i == len(col) - 1 else min(want[n], up[col[i + 1]] - height[n] - gap(n, col[i + 1]))
    return {n: (down[n] + up[n]) / 2 for n in col}


def layout(graph: Graph, current: str | None = None) -> dict:
    """A layered left-to-right layout (after Sugiyama). A node's column is its longest path from a
    root, and a root sits one column before its first child. An edge that spans columns runs
    through a waypoint in each column between (one chain per source, shared by its edges). Each
    column is ordered by the barycentre of its neighbours, sweeping right and left, and then
    nodes move towards their neighbours' heights as far as the spacing allows."""
    nodes, edges = graph.nodes, list(graph.edges.values())
    succs, preds = defaultdict(list), defaultdict(list)
    for e in edges:
        succs[e.src].append(e.dst)
        preds[e.dst].append(e.src)
    # topological order (Kahn); nodes on a cycle (there should be none) follow in name order
    indegree = {n: len(preds[n]) for n in nodes}
    ready = sorted(n for n, d in indegree.items() if d == 0)
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for s in sorted(succs[n]):
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    order += sorted(set(nodes) - set(order))
    rank = {n: i for i, n in enumerate(order)}
    layer: dict[str, int] = {}
    for n in order:
        layer[n] = max((layer[p] + 1 for p in preds[n] if p in layer and rank[p] < rank[n]), default=0)
    for n in reversed(order):  # roots move right, next to their first child
        if not preds[n] and succs[n]:
            layer[n] = max(0, min(layer[s] for s in succs[n]) - 1)
    # waypoints of long edges; links between neighbouring columns
    height = {n: float(NODE_H) for n in nodes}
    links: set[tuple[str, str]] = set()
    route: dict[tuple[str, str], list[str]] = {}
    for src in order:
        far = max((layer[d] for d in succs[src] if layer[d] > layer[src] + 1), default=None)
        chain = [f"~{src}~{c}" for c in range(layer[src] + 1, far)] if far else []
        for c, waypoint in zip(range(layer[src] + 1, far or 0), chain):
            layer[waypoint], height[waypoint] = c, float(DUMMY_H)
        links.update(zip([src, *chain], chain))
        for dst in succs[src]:
            span = layer[dst] - layer[src]
            if span >= 1:
                route[src, dst] = chain[: span - 1]
                links.add(((chain[span - 2] if span > 1 else src), dst))
    lpreds, lsuccs = defaultdict(list), defaultdict(list)
    for a, b in links:
        lsuccs[a].append(b)
        lpreds[b].append(a)
    columns: dict[int, list[str]] = defaultdict(list)
    for n in sorted(height, key=lambda n: (NODE_TYPES[nodes[n].type][1], nodes[n].label, n) if n in nodes else (9, "", n)):
        columns[layer[n]].append(n)
    span = range(max(columns, default=-1) + 1)

    def centre(n: str) -> float:
        return y[n] + height[n] / 2

    def stack(col: list[str]) -> None:
        top = 0.0
        for n in col:
            y[n] = top
            top += height[n] + ROW_GAP

    y: dict[str, float] = {}
    for col in columns.values():
        stack(col)
    for _ in range(6):  # order: barycentre sweeps
        for sweep, near in ((span, lpreds), (reversed(span), lsuccs)):
            for c in sweep:
                col = columns.get(c, [])
                bary = {n: sum(centre(m) for m in near[n]) / len(near[n]) if near[n] else centre(n) for n in col}
                col.sort(key=lambda n: bary[n])
                stack(col)
    for _ in range(8):  # heights: towards the neighbours
        for sweep, near in ((span, lpreds), (reversed(span), lsuccs), (span, None)):
            for c in sweep:
                col = columns.get(c, [])
                want = {}
                for n in col:
                    around = near[n] if near is not None else lpreds[n] + lsuccs[n]
                    want[n] = (sum(centre(m) for m in around) / len(around) - height[n] / 2) if around else y[n]
                y.update(_pack(col, want, height))
    top = min(y.values(), default=0.0)
    for n in y:
        y[n] += MARGIN - top
    x = {n: MARGIN + layer[n] * (NODE_W + COL_GAP) for n in height}
    placed = [
        {
            "id": n,
            "type": node.type,
            "x": x[n],
            "y": round(y[n], 1),
            "label": _clip(node.label, LABEL_CHARS),
            "sub": _clip(node.sub, SUB_CHARS),
            "title": node.title or node.label,
            "href": node.href,
            "css": f"node {node.type} {node.css}" + (" current" if n == current else ""),
        }
        for n, node in nodes.items()
    ]
    paths = []
    for e in edges:
        if (e.src, e.dst) in route:
            points = [(x[e.src] + NODE_W, centre(e.src))]
            for w in route[e.src, e.dst]:
                points += [(x[w], centre(w)), (x[w] + NODE_W, centre(w))]
            points.append((x[e.dst], centre(e.dst)))
        else:  # only on a cycle: from the right side to the right side
            points = [(x[e.src] + NODE_W, centre(e.src)), (x[e.dst] + NODE_W, centre(e.dst))]
        d = f"M{points[0][0]:.0f},{points[0][1]:.1f}"
        for i, ((x1, y1), (x2, y2)) in enumerate(zip(points, points[1:])):
            if i % 2:  # across a column, through its waypoint
                d += f" L{x2:.0f},{y2:.1f}"
            else:  # across a gap between columns
                bend = max(abs(x2 - x1) / 2, 30)
                d += f" C{x1 + bend:.0f},{y1:.1f} {x2 - bend:.0f},{y2:.1f} {x2:.0f},{y2:.1f}"
        paths.append({"d": d, "kind": e.kind, "title": e.title or EDGE_KINDS.get(e.kind, e.kind), "src": e.src, "dst": e.dst})
    ncols = max(layer.values(), default=-1) + 1
    return {
        "nodes": placed,
        "edges": sorted(paths, key=lambda p: list(EDGE_KINDS).index(p["kind"]), reverse=True),  # parents drawn last, on top
        "width": max(ncols * (NODE_W + COL_GAP) - COL_GAP + 2 * MARGIN, 0),
        "height": round(max((y[n] + height[n] for n in y), default=0) + MARGIN),
        "node_w": NODE_W,
        "node_h": NODE_H,
        "node_types": {t: NODE_TYPES[t][0] for t in NODE_TYPES if any(n.type == t for n in nodes.values())},
        "edge_kinds": {k: EDGE_KINDS[k] for k in EDGE_KINDS if any(e.kind == k for e in edges)},
    }


# ------------------------------------------------------------------------------ cards and cells
def render_markdown(text: str, base: str) -> Markup:
    """Markdown to HTML with raw HTML off (it is escaped); relative links and images resolve
    against ``base`` (the version's folder on this server, e.g. ``/d/NAME/v0001/``)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            attr = "src" if child.type == "image" else "href" if child.type == "link_open" else None
            if attr and child.attrs.get(attr):
                url = str(child.attrs[attr])
                if not urlsplit(url).scheme and not url.startswith(("/", "#")):
                    child.attrs[attr] = base + url
    return Markup(md.renderer.render(tokens, md.options, {}))  # noqa: S704 - markdown-it escaped all text (html off)


def cell(value, *, column: str = "") -> dict:
    """A table cell: ``kind`` (null, bool, num, text, long) and the text to show."""
    if value is None:
        return {"kind": "null", "text": "—"}
    if isinstance(value, bool):
        return {"kind": "bool", "text": "true" if value else "false", "css": "yes" if value else "no"}
    if isinstance(value, float):
        return {"kind": "num", "text": f"{value:.4g}"}
    if isinstance(value, int):
        return {"kind": "num", "text": str(value)}
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False, indent=1)
    text = str(value)
    if len(text) > LONG_TEXT or text.count("\n") > 2:
        return {"kind": "long", "short": _clip(" ".join(text.split()), LONG_TEXT - 40), "text": text}
    return {"kind": "text", "text": text}


def record_cell(record: str | None) -> dict:
    """A reject's ``record`` (the dropped row as JSON): a one-line excerpt, the whole row pretty-printed."""
    if record is None:
        return cell(None)
    try:
        row = json.loads(record)
    except ValueError:
        return {"kind": "long", "short": _clip(" ".join(record.split()), 120), "text": record}
    if not isinstance(row, dict):
        return {"kind": "long", "short": _clip(record, 120), "text": record}
    excerpt = next((str(row[k]) for k in ("completion", "chosen", "question", "prompt", "text") if row.get(k)), record)
    return {"kind": "long", "short": _clip(" ".join(excerpt.split()), 120), "text": json.dumps(row, ensure_ascii=False, indent=2)}


ROW_COLUMNS = [
    ["pair_id", "seed_id", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "reason"],
    ["sample_id", "seed_id", "question", "completion", "predicted_answer", "reference_answer", "correct", "reward"],
    ["sample_id", "seed_id", "split", "correct", "logit", "reward"],
]
REJECT_COLUMNS = ["stage", "reason", "detail", "seed_id", "sample_id"]


def row_columns(columns: list[str]) -> list[str]:
    """The columns the rows table shows: the known layout that fits best, else the first eight."""
    best = max(([c for c in preferred if c in columns] for preferred in ROW_COLUMNS), key=len)
    return best if len(best) >= 3 else columns[:8]


# ------------------------------------------------------------------------------ the app
def create_app(store_uri: str) -> Starlette:
    index = StoreIndex(Store(store_uri))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)  # manifests vary by kind: missing fields render empty
    env.globals.update(version_href=version_href, store_root=index.store.root)
    templates = Jinja2Templates(env=env)

    def resolve(request: Request) -> tuple[dict, Response | None]:
        """The manifest the path names, and a redirect when it named a tag or ``latest``."""
        name, ref = request.path_params["name"], request.path_params["version"]
        manifest = index.manifest(name, ref)
        if ref != manifest["version"]:
            rest = request.url.path.split("/", 4)[4:]  # '', 'd', name, ref, rest
            url = version_href(name, manifest["version"], rest[0] if rest else "")
            return manifest, RedirectResponse(url + (f"?{request.url.query}" if request.url.query else ""), status_code=307)
        return manifest, None

    def home(request: Request):
        hide = {h for h in request.query_params.get("hide", "").split(",") if h in HIDEABLE}
        entries = index.entries()
        graph = build_graph(index, entries, hide)
        for entry in entries:  # parents that are versions here link to their page
            entry["parents"] = {m["version"]: [_link(index, p.get("uri")) for p in m.get("parents") or []] for m in entry["manifests"]}
        toggles = []
        for kind in HIDEABLE:
            after = sorted(hide ^ {kind})
            toggles.append({"kind": kind, "label": NODE_TYPES[kind][0] + "s", "shown": kind not in hide, "href": "/" + (f"?hide={','.join(after)}" if after else "")})
        return templates.TemplateResponse(request, "index.html", {"entries": entries, "graph": layout(graph), "toggles": toggles})

    def dataset(request: Request):
        name = request.path_params["name"]
        return RedirectResponse(version_href(name, index.manifest(name)["version"]), status_code=307)

    def version_page(request: Request):
        manifest, redirect = resolve(request)
        if redirect:
            return redirect
        name, version = manifest["dataset"], manifest["version"]
        entries = index.entries()
        tags = next((e["tags"] for e in entries if e["name"] == name), {})
        graph = build_graph(index, entries)
        me = version_node_id(name, version)
        base = f"{name}/{version}"
        try:
            card = index.store.get(f"{base}/card.md").decode()
        except StorageError:
            from distillery.stages.publish import render_card

            card = render_card(manifest)
        card_html = render_markdown(card, version_href(name, version) + "/")

        parents = [{**_link(index, p.get("uri")), "rows": p.get("rows"), "sha256": p.get("sha256")} for p in manifest.get("parents") or []]
        companions = [{"what": k.replace("_", " "), **_link(index, v)} for k, v in (manifest.get("companions") or {}).items()]
        related = []
        if (manifest.get("scorer") or {}).get("reward_model"):
            related.append({"what": "scored by reward model", **_link(index, manifest["scorer"]["reward_model"], "latest")})
        if (manifest.get("training_data") or {}).get("uri"):
            related.append({"what": "trained on", **_link(index, manifest["training_data"]["uri"], "latest")})
        downstream = []
        for (src, dst), edge in sorted(graph.edges.items()):
            if src == me and graph.nodes[dst].type == "version":
                node = graph.nodes[dst]
                what = {"parent": "used as parent by", "trained_on": "trained", "scores": "scored", "companion": "companion"}.get(edge.kind, edge.kind)
                downstream.append({"what": what, "label": node.label, "href": node.href})
        plots = manifest.get("plots") or []
        gallery = [
            {"name": p["path"].rsplit("/", 1)[-1], "src": version_href(name, version) + "/" + p["path"]}
            for p in plots
            if p["path"] not in card and (version_href(name, version) + "/" + p["path"]) not in card_html
        ]
        context = {
            "m": manifest,
            "name": name,
            "version": version,
            "versions": index.versions(name),
            "tags_here": sorted(t for t, v in tags.items() if v == version),
            "is_latest": index.versions(name)[-1:] == [version],
            "card": card_html,
            "parents": parents,
            "companions": companions,
            "related": related,
            "downstream": downstream,
            "gallery": gallery,
            "plots_skipped": manifest.get("plots_skipped") or [],
            "graph": layout(neighbourhood(graph, me), current=me),
            "uri": index.store.uri(base),
        }
        return templates.TemplateResponse(request, "version.html", context)

    def _page(request: Request, total: int) -> tuple[int, int]:
        try:
            page = max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            raise HTTPException(400, "page: must be a whole number") from None
        pages = max(1, -(-total // PAGE_SIZE))
        return min(page, pages), pages

    def rows_page(request: Request):
        import polars as pl

        manifest, redirect = resolve(request)
        if redirect:
            return redirect
        frame = index.frame(manifest, "shards")
        seed = request.query_params.get("seed_id") or None
        if seed and "seed_id" in frame.columns:
            frame = frame.filter(pl.col("seed_id") == seed)
        page, pages = _page(request, frame.height)
        columns = row_columns(frame.columns)
        rows = []
        for row in frame.slice((page - 1) * PAGE_SIZE, PAGE_SIZE).to_dicts():
            rest = {k: v for k, v in row.items() if k not in columns}
            rows.append({"cells": [(c, cell(row[c], column=c)) for c in columns], "rest": json.dumps(rest, ensure_ascii=False, indent=2, default=str)})
        name, version = manifest["dataset"], manifest["version"]
        context = {
            "m": manifest,
            "name": name,
            "version": version,
            "columns": columns,
            "rows": rows,
            "total": frame.height,
            "seed_id": seed,
            "pager": _pager(name, version, "rows", page, pages, frame.height, seed_id=seed),
        }
        return templates.TemplateResponse(request, "rows.html", context)

    def rejects_page(request: Request):
        import polars as pl

        manifest, redirect = resolve(request)
        if redirect:
            return redirect
        name, version = manifest["dataset"], manifest["version"]
        everything = index.frame(manifest, "reject_shards")
        stage, reason = request.query_params.get("stage") or None, request.query_params.get("reason") or None
        seed = request.query_params.get("seed_id") or None
        stage_order = [s["stage"] for s in (manifest.get("counts") or {}).get("stages", [])]
        groups: dict[str, list] = {}
        if {"stage", "reason"} <= set(everything.columns):
            counted = everything.group_by(["stage", "reason"]).len().to_dicts()
            for item in sorted(counted, key=lambda r: (stage_order.index(r["stage"]) if r["stage"] in stage_order else 99, r["stage"] or "", -r["len"], r["reason"] or "")):
                groups.setdefault(item["stage"], []).append(
                    {
                        "reason": item["reason"],
                        "n": item["len"],
                        "href": version_href(name, version, "rejects", stage=item["stage"], reason=item["reason"]),
                        "active": stage == item["stage"] and reason == item["reason"],
                    }
                )
        filters = [
            {
                "stage": s,
                "n": sum(r["n"] for r in reasons),
                "href": version_href(name, version, "rejects", stage=s),
                "active": stage == s and not reason,
                "reasons": reasons,
            }
            for s, reasons in groups.items()
        ]
        # drops the manifest counts that have no rows (e.g. samples never drawn: stopped_early)
        with_rows = {(s, r["reason"]) for s, reasons in groups.items() for r in reasons}
        counted_only = [
            {"stage": s["stage"], "reason": r, "n": n}
            for s in (manifest.get("counts") or {}).get("stages", [])
            for r, n in s.get("dropped", {}).items()
            if n and (s["stage"], r) not in with_rows
        ]
        frame = everything
        if stage and "stage" in frame.columns:
            frame = frame.filter(pl.col("stage") == stage)
        if reason and "reason" in frame.columns:
            frame = frame.filter(pl.col("reason") == reason)
        if seed and "seed_id" in frame.columns:
            frame = frame.filter(pl.col("seed_id") == seed)
        page, pages = _page(request, frame.height)
        columns = [c for c in REJECT_COLUMNS if c in frame.columns]
        rows = []
        for row in frame.slice((page - 1) * PAGE_SIZE, PAGE_SIZE).to_dicts():
            cells = [(c, cell(row.get(c), column=c)) for c in columns]
            rows.append({"cells": cells, "record": record_cell(row.get("record"))})
        context = {
            "m": manifest,
            "name": name,
            "version": version,
            "columns": columns,
            "rows": rows,
            "total": frame.height,
            "all_total": everything.height,
            "filters": filters,
            "counted_only": counted_only,
            "stage": stage,
            "reason": reason,
            "seed_id": seed,
            "pager": _pager(name, version, "rejects", page, pages, frame.height, stage=stage, reason=reason, seed_id=seed),
        }
        return templates.TemplateResponse(request, "rejects.html", context)

    def manifest_json(request: Request):
        manifest, redirect = resolve(request)
        return redirect or JSONResponse(manifest)

    def plot(request: Request):
        manifest, redirect = resolve(request)
        if redirect:
            return redirect
        path = f"plots/{request.path_params['file']}"
        entry = next((p for p in manifest.get("plots") or [] if p.get("path") == path), None)
        suffix = Path(path).suffix.lower()
        if entry is None or suffix not in IMAGE_TYPES:
            listed = ", ".join(p["path"] for p in manifest.get("plots") or []) or "none"
            raise NotFound(f"{index.store.uri(manifest['dataset'] + '/' + manifest['version'])}: no plot {path!r} in the manifest (plots: {listed})")
        data = index.store.get(f"{manifest['dataset']}/{manifest['version']}/{path}")
        if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StorageError(f"{index.store.uri(manifest['dataset'] + '/' + manifest['version'] + '/' + path)}: checksum mismatch (the plot changed after publishing)")
        headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=IMAGE_TYPES[suffix], headers=headers)

    def healthz(request: Request):
        return PlainTextResponse("ok")

    def error_page(request: Request, status: int, title: str, message: str):
        return templates.TemplateResponse(request, "error.html", {"status": status, "title": title, "message": message}, status_code=status)

    async def not_found(request: Request, exc: Exception):
        message = str(exc) if isinstance(exc, NotFound) else getattr(exc, "detail", "") or "no such page"
        if isinstance(exc, HTTPException) and exc.status_code != 404:
            return error_page(request, exc.status_code, "Bad request", str(exc.detail))
        return error_page(request, 404, "Not found", message)

    async def store_error(request: Request, exc: Exception):
        return error_page(request, 502, "Store error", str(exc))

    async def shard_error(request: Request, exc: Exception):
        return error_page(request, 500, "Cannot read this version", f"{type(exc).__name__}: {exc}")

    routes = [
        Route("/", home),
        Route("/healthz", healthz),
        Route("/d/{name}", dataset),
        Route("/d/{name}/{version}", version_page),
        Route("/d/{name}/{version}/rows", rows_page),
        Route("/d/{name}/{version}/rejects", rejects_page),
        Route("/d/{name}/{version}/manifest.json", manifest_json),
        Route("/d/{name}/{version}/plots/{file}", plot),
    ]
    handlers = {NotFound: not_found, HTTPException: not_found, StorageError: store_error, ValueError: shard_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.index = index
    return app


def _link(index: StoreIndex, uri, default_version: str | None = None) -> dict:
    """A URI as a link to its page when it names a version in this store, else as text."""
    ref = index.local_version(str(uri), default_version)
    return {"uri": str(uri), "href": version_href(*ref) if ref else None, "label": f"{ref[0]} {ref[1]}" if ref else str(uri)}


def _pager(name: str, version: str, page_name: str, page: int, pages: int, total: int, **query) -> dict:
    first = (page - 1) * PAGE_SIZE + 1 if total else 0
    return {
        "page": page,
        "pages": pages,
        "first": first,
        "last": min(page * PAGE_SIZE, total),
        "prev": version_href(name, version, page_name, page=page - 1, **query) if page > 1 else None,
        "next": version_href(name, version, page_name, page=page + 1, **query) if page < pages else None,
    }


def serve(store_uri: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    uvicorn.run(create_app(store_uri), host=host, port=port, log_level="warning")
