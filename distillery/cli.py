"""The ``distillery`` command line.

Exit codes: 0 success; 1 a run failed (the message says why); 2 bad usage or a bad recipe
(the message names the field). ``distillery run`` prints progress on standard error and the
published version's URI as the last line of standard output.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys

from schemas.recipe import RecipeError, load_recipe


def _fail(message: str, code: int) -> int:
    print(f"distillery: error: {message}", file=sys.stderr)
    return code


def preflight(store: str, inputs: list[str] = ()) -> int | None:
    """Before Prefect and Ray start (tens of seconds), check what a run needs: the store answers
    (a folder, or a bucket that can be listed with these credentials), each input file exists and
    is not empty, and ``RAY_ADDRESS`` (when set) answers. An exit code and the message if not."""
    from distillery.engine import Unreachable, check_ray_address
    from distillery.stages.ingest import EmptyInput, UnreadableInput, preflight_input
    from distillery.store import Store
    from distillery.uri_io import StorageError, is_s3

    try:
        target = Store(store)
    except (ValueError, StorageError) as err:  # credentials in it, '..' in an S3 prefix, not s3://
        return _fail(f"--store: {err}", 2)
    try:
        if is_s3(target.root):
            target.children("")  # one LIST: the endpoint, the bucket and the credentials
        for uri in inputs:
            preflight_input(uri)
        check_ray_address()
    except (StorageError, EmptyInput, UnreadableInput, Unreachable) as err:
        return _fail(str(err), 1)
    except ValueError as err:  # a version URI that climbs out of its store
        return _fail(str(err), 2)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.limit is not None:
        overrides.append(f"seeds.limit={args.limit}")
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as err:
        return _fail(str(err), 2)
    from distillery.model_setup import ModelNotFound, resolve_model_path
    from distillery.served import MissingKey, api_key

    try:
        if recipe.model.backend == "openai":
            api_key(recipe.model)  # its variable is set (fail now, not at the first request)
        else:
            resolve_model_path(recipe.model.path)  # fail in a second, not after Prefect and Ray start
    except ModelNotFound as err:
        return _fail(f"model.path: {err}", 1)
    except MissingKey as err:
        return _fail(str(err), 1)
    inputs = [recipe.seeds.path] if recipe.seeds and recipe.seeds.path else [recipe.glan.taxonomy] if recipe.glan.taxonomy else []
    failed = preflight(args.store, inputs)
    if failed is not None:
        return failed
    from flows.synthesize import synthesize

    return _run_and_print_uri(lambda: synthesize(recipe, store=args.store), summary=lambda uri: run_summary(uri, args.store))


def run_summary(uri: str, store: str) -> str:
    """A few lines for the end of a run: rows in and published, the correct share, where the
    version is and how to look at it. Never fails the run (the URI line follows regardless)."""
    import shlex

    from distillery.store import Store

    try:
        name, version = uri.rstrip("/").split("/")[-2:]
        manifest = json.loads(Store(store).get(f"{name}/{version}/manifest.json"))
    except Exception as err:  # the published version is there; only its summary is missing
        return f"published {uri} (no summary: {err})"
    counts, stats = manifest.get("counts", {}), manifest.get("stats", {})
    program = sys.argv[0] if os.path.basename(sys.argv[0]) == "distillery" else "distillery"  # as it was called (.venv/bin/distillery)
    if os.path.isabs(program) and program.startswith(os.getcwd() + os.sep):
        program = os.path.relpath(program)
    lines = [f"published {name} {version}: {counts.get('published', '?')} rows from {counts.get('input', '?')} input rows ({counts.get('rejected', 0)} rejected, each with its reason)"]
    if stats.get("samples_generated"):
        share = stats.get("correct_share")
        lines.append(
            f"  samples: {stats['samples_generated']} generated, {stats.get('samples_correct', 0)} verified correct"
            + (f" ({100 * share:.0f}% of those with a reference)" if share is not None else "")
            + (f", {stats['generation_tokens_per_second']:.0f} output tok/s" if stats.get("generation_tokens_per_second") else "")
        )
    lines.append(f"  data:      {uri}/data")
    lines.append(f"  card:      {program} datasets show {name} {version} --store {shlex.quote(store)}")
    lines.append(f"  dashboard: {program} ui --store {shlex.quote(store)}")
    return "\n".join(lines)


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class _NoTracebackFor(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback; for the errors the CLI reports
    as one line (a full disk, an unreadable input, a store that cannot be reached) the traceback
    is noise, so those records keep their message line and lose the stack."""

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if err is not None and (isinstance(err, self.expected) or (isinstance(err, OSError) and err.errno in _NO_SPACE)):
            record.exc_info, record.exc_text = None, None
        return True


def _run_and_print_uri(run, summary=None) -> int:
    """Run a flow; print its version URI as the last line of stdout, or the error (exit 1).
    ``summary(uri)``: lines for standard error before it."""
    from distillery.engine import EngineLost, Unreachable
    from distillery.model_setup import ModelNotFound
    from distillery.stages.collapse import CollapseGateFailed
    from distillery.stages.ingest import EmptyInput, UnreadableInput
    from distillery.store import VersionNotFound
    from distillery.uri_io import StorageError

    quiet = _NoTracebackFor((StorageError, EmptyInput, UnreadableInput, ModelNotFound, VersionNotFound, CollapseGateFailed, EngineLost, Unreachable, RecipeError))
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(quiet)
    try:
        uri = run()
    except (ModelNotFound, StorageError, VersionNotFound, CollapseGateFailed, ValueError, EngineLost, Unreachable) as err:
        return _fail(str(err), 1)
    except OSError as err:
        if err.errno in _NO_SPACE:  # a full disk outside the store (spill folders, temporary files)
            return _fail(f"{err.filename or 'a local file'}: no space left on device; free some space (or set TMPDIR to a larger disk) and run again", 1)
        raise
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # before the URI, so no worker output follows it
    if summary is not None:
        print(summary(uri), file=sys.stderr)
    sys.stderr.flush()
    print(uri, flush=True)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from schemas.recipe import CurateRecipe

    overrides = [f"name={args.name}", *(args.set or [])]
    try:
        recipe = load_recipe(args.recipe, overrides, model=CurateRecipe)
    except RecipeError as err:
        return _fail(str(err), 2)
    failed = preflight(args.store, [args.input])
    if failed is not None:
        return failed
    from flows.curate import curate

    return _run_and_print_uri(lambda: curate(recipe, input_uri=args.input, store=args.store))


def cmd_train_reward_model(args: argparse.Namespace) -> int:
    from distillery.store import check_name

    try:
        check_name(args.name)
    except ValueError as err:
        return _fail(f"--name: {err}", 2)
    if not 0 < args.heldout_fraction < 1:
        return _fail(f"--heldout-fraction: must be between 0 and 1 (exclusive), got {args.heldout_fraction}", 2)
    from distillery.model_setup import ModelNotFound, resolve_model_path
    from distillery.store import VersionNotFound
    from distillery.uri_io import StorageError
    from distillery.stages.reward_training import resolve_input

    try:  # fail in a second, not after Prefect starts
        resolve_model_path(args.base_model)
    except ModelNotFound as err:
        return _fail(f"--base-model: {err}", 1)
    try:
        resolve_input(args.input)
    except (ValueError, VersionNotFound, StorageError) as err:
        return _fail(str(err), 1)
    from flows.train_reward_model import train_reward_model

    return _run_and_print_uri(
        lambda: train_reward_model(
            args.input, args.name, store=args.store, heldout_fraction=args.heldout_fraction, seed=args.seed, l2=args.l2, base_model=args.base_model, dtype=args.dtype
        )
    )


def cmd_export(args: argparse.Namespace) -> int:
    from distillery.formats import ExportError, export_version
    from distillery.store import VersionNotFound, open_version

    try:
        store, manifest = open_version(args.version, what="export")
        exported = export_version(store, manifest, args.out, fmt=args.format, test_share=args.test_share)
    except ExportError as err:
        return _fail(str(err), 2)
    except (ValueError, VersionNotFound) as err:
        return _fail(str(err), 1)
    splits = ", ".join(f"{split} {n}" for split, n in exported.rows.items())
    print(f"exported {manifest['dataset']} {manifest['version']} ({manifest.get('kind') or 'data'}): {splits} rows, {len(exported.files)} {args.format} files", file=sys.stderr)
    print(f"  open it: datasets.load_dataset({str(exported.folder)!r})", file=sys.stderr)
    print(exported.folder)
    return 0


def _store(args: argparse.Namespace):
    from distillery.store import Store

    return Store(args.store)


def cmd_datasets_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = []
    for name in store.datasets():
        for version in store.versions(name):
            m = store.manifest(name, version)
            kind = m.get("kind", "")
            rows.append((name, version, kind, m["created_at"], m["counts"]["input"], m["counts"]["published"], store.uri(f"{name}/{version}")))
    if not rows:
        print(f"no data sets in {store.root}", file=sys.stderr)
        return 0
    print(f"{'dataset':24} {'version':8} {'kind':21} {'created':25} {'input':>7} {'published':>9}  uri")
    for name, version, kind, created, n_in, n_out, uri in rows:
        print(f"{name:24} {version:8} {kind:21} {created:25} {n_in:>7} {n_out:>9}  {uri}")
    return 0


def cmd_datasets_show(args: argparse.Namespace) -> int:
    from distillery.store import VersionNotFound

    try:
        manifest = _store(args).manifest(args.name, args.version)
    except VersionNotFound as err:
        return _fail(str(err), 1)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    from distillery.stages.publish import render_card

    print(render_card(manifest))
    return 0


def cmd_datasets_diff(args: argparse.Namespace) -> int:
    import io

    import polars as pl

    from distillery.store import VersionNotFound

    store = _store(args)
    try:
        old, new = store.manifest(args.name, args.old), store.manifest(args.name, args.new)
    except VersionNotFound as err:
        return _fail(str(err), 1)

    def sample_ids(m: dict) -> set[str]:
        base = f"{m['dataset']}/{m['version']}"
        frames = [pl.read_parquet(io.BytesIO(store.get(f"{base}/{s['path']}")), columns=["sample_id"]) for s in m["shards"]]
        return set(pl.concat(frames)["sample_id"].to_list()) if frames else set()

    before, after = sample_ids(old), sample_ids(new)
    print(f"{args.name}: {old['version']} -> {new['version']}")
    print(f"  rows: {len(before)} -> {len(after)} (+{len(after - before)} added, -{len(before - after)} removed, {len(before & after)} in both)")
    print(f"  recipe: {'same' if old['recipe_hash'] == new['recipe_hash'] else 'changed'} ({old['recipe_hash'][:12]} -> {new['recipe_hash'][:12]})")
    print(f"  code: {old['code_version']} -> {new['code_version']}")
    print(f"  model: {old['generator'].get('model')} -> {new['generator'].get('model')}")
    for key in sorted(set(old.get("stats", {})) | set(new.get("stats", {}))):
        a, b = old.get("stats", {}).get(key), new.get("stats", {}).get(key)
        if a != b and not isinstance(a, dict) and not isinstance(b, dict):
            print(f"  {key}: {a} -> {b}")
    return 0


def cmd_datasets_tag(args: argparse.Namespace) -> int:
    from distillery.store import VersionNotFound

    store = _store(args)
    try:
        if args.delete:
            store.untag(args.name, args.tag)
            print(f"{args.name}: removed tag {args.tag}")
        else:
            version = store.tag(args.name, args.tag, args.version)
            print(f"{args.name}@{args.tag} -> {version}")
    except (VersionNotFound, ValueError) as err:
        return _fail(str(err), 1)
    return 0


def cmd_datasets_tags(args: argparse.Namespace) -> int:
    from distillery.store import VersionNotFound

    store = _store(args)
    try:
        latest = store.manifest(args.name)["version"]
    except VersionNotFound as err:
        return _fail(str(err), 1)
    print(f"latest -> {latest}")
    for tag, version in sorted(store.tags(args.name).items()):
        print(f"{tag} -> {version}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from distillery.store import Store
    from distillery.uri_io import StorageError, is_s3

    store = Store(args.store)
    if not is_s3(store.root) and not os.path.isdir(store.root):
        return _fail(f"--store: {store.root}: no such folder", 1)
    try:
        datasets = store.datasets()  # a wrong bucket or missing credentials fail here, not on the first page
    except StorageError as err:
        return _fail(str(err), 1)
    from distillery.ui import serve

    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"distillery ui: {len(datasets)} data set(s) in {store.root}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"distillery ui: listening on {args.host}: the dashboard has no authentication", file=sys.stderr)
    print(f"http://{shown}:{args.port}/", flush=True)
    serve(store.root, host=args.host, port=args.port)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from distillery.deploy import DeployError, deploy

    if args.gpus is not None and args.gpus < 0:
        return _fail("--gpus: must be 0 or more", 2)
    try:
        deploy(args.file, args.name, pool=args.pool, store=args.store, gpus=args.gpus, log=lambda m: print(m, file=sys.stderr))
    except DeployError as err:
        return _fail(str(err), 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from distillery.stages.reward_training import DEFAULT_L2
    from distillery.deploy import DEFAULT_FILE, DEFAULT_POOL
    from distillery.store import default_store

    parser = argparse.ArgumentParser(prog="distillery", description="Synthesize, verify, curate and publish post-training data.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe end to end; prints the published version's URI last")
    run.add_argument("recipe", help="path to a recipe YAML file (see recipes/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field, e.g. --set generation.temperature=0.7 (repeatable)")
    run.add_argument("--store", default=default_store(), help="store URI: a folder or s3://bucket/prefix (default: $DISTILLERY_STORE or ./store)")
    run.add_argument("--limit", type=int, help="read at most N seed rows")
    run.set_defaults(func=cmd_run)

    curate = sub.add_parser("curate", help="dedup, decontaminate and filter an existing data set; prints the version URI last")
    curate.add_argument("input", help="a JSONL/Parquet file (local or s3://) or a published version STORE/NAME/vNNNN")
    curate.add_argument("--name", required=True, help="the data set name to publish under")
    curate.add_argument("--recipe", help="a curate recipe YAML (see recipes/curate-default.yaml); defaults apply without one")
    curate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a curate recipe field (repeatable)")
    curate.add_argument("--store", default=default_store(), help="store URI (default: $DISTILLERY_STORE or ./store)")
    curate.set_defaults(func=cmd_curate)

    trm = sub.add_parser("train-reward-model", help="fit a reward model on a samples version's verified labels; prints the model's URI last")
    trm.add_argument("input", help="a published samples version STORE/NAME/vNNNN (STORE/NAME: the latest), run with verify.keep=all")
    trm.add_argument("--name", required=True, help="the name to publish the reward model under (in --store)")
    trm.add_argument("--store", default=default_store(), help="store URI (default: $DISTILLERY_STORE or ./store)")
    trm.add_argument("--heldout-fraction", type=float, default=0.25, help="fraction of problems held out for evaluation (default 0.25)")
    trm.add_argument("--seed", type=int, default=0, help="seed of the problem split and the fit (default 0)")
    trm.add_argument("--l2", type=float, default=DEFAULT_L2, help=f"L2 penalty of the logistic regression (default {DEFAULT_L2})")
    trm.add_argument("--base-model", default="embedded", help="the base model folder (default: embedded)")
    trm.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="the frozen body's dtype (default auto: bfloat16 on a CPU with native bfloat16, else float32)")
    trm.set_defaults(func=cmd_train_reward_model)

    export = sub.add_parser("export", help="write a version as a folder trainers read (datasets.load_dataset(DIR)); prints the folder last")
    export.add_argument("version", help="STORE/NAME (the latest version), STORE/NAME/vNNNN or STORE/NAME@TAG")
    export.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    export.add_argument("--format", default="parquet", help="parquet (default) or jsonl")
    export.add_argument("--test-share", type=float, help="split by problem: this share of problems in 'test' (default: the version's own split column, else all 'train')")
    export.set_defaults(func=cmd_export)

    datasets = sub.add_parser("datasets", help="list, show, diff and tag published versions")
    datasets.add_argument("--store", default=default_store(), help="store URI (default: $DISTILLERY_STORE or ./store)")
    dsub = datasets.add_subparsers(dest="datasets_command", required=True)
    dsub.add_parser("list", help="every complete version in the store").set_defaults(func=cmd_datasets_list)
    show = dsub.add_parser("show", help="one version's card (or manifest with --json)")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="latest", help="vNNNN, latest or a tag")
    show.add_argument("--json", action="store_true", help="print the whole manifest")
    show.set_defaults(func=cmd_datasets_show)
    diff = dsub.add_parser("diff", help="what changed between two versions")
    diff.add_argument("name")
    diff.add_argument("old")
    diff.add_argument("new", nargs="?", default="latest")
    diff.set_defaults(func=cmd_datasets_diff)
    tag = dsub.add_parser("tag", help="point a tag at a version (moves it if it exists; copies no data)")
    tag.add_argument("name")
    tag.add_argument("tag", help="the tag, e.g. stable (not 'latest', which is always the newest version)")
    tag.add_argument("version", nargs="?", default="latest", help="vNNNN, latest or another tag (default: latest)")
    tag.add_argument("--delete", action="store_true", help="remove the tag instead")
    tag.set_defaults(func=cmd_datasets_tag)
    tags = dsub.add_parser("tags", help="a data set's tags and the versions they point at")
    tags.add_argument("name")
    tags.set_defaults(func=cmd_datasets_tags)

    dep = sub.add_parser("deploy", help="register infra/prefect.yaml's scheduled deployments with the Prefect server at PREFECT_API_URL")
    dep.add_argument("--file", default=str(DEFAULT_FILE), help="the prefect.yaml to deploy (default: infra/prefect.yaml)")
    dep.add_argument("--name", action="append", help="deploy only this deployment (repeatable; default: all of them)")
    dep.add_argument("--pool", default=DEFAULT_POOL, help=f"the process work pool to create/use (default: {DEFAULT_POOL})")
    dep.add_argument("--store", default=default_store(), help="the store the deployments publish to (default: $DISTILLERY_STORE or ./store)")
    dep.add_argument("--gpus", type=int, help="slots of the 'gpu' concurrency limit (default when creating it: the GPUs nvidia-smi lists)")
    dep.set_defaults(func=cmd_deploy)

    ui = sub.add_parser("ui", help="serve the lineage dashboard over a store (prints its URL)")
    ui.add_argument("--store", default=default_store(), help="store URI (default: $DISTILLERY_STORE or ./store)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from distillery import apply_run_env

    apply_run_env()  # before Prefect is imported: it reads its settings once
    args = build_parser().parse_args(argv)
    from distillery.uri_io import StorageError

    try:
        return args.func(args)
    except StorageError as err:  # an unreachable store, wrong credentials, a missing object
        return _fail(str(err), 1)
    except ValueError as err:
        if args.command == "datasets":  # a data set name or tag that cannot exist (e.g. '../x')
            return _fail(str(err), 2)
        raise


if __name__ == "__main__":
    sys.exit(main())
