"""Formats trainers read: the TRL columns of each kind of version, the problem-level split, and
``distillery export`` (a version as a folder that ``datasets.load_dataset(DIR)`` opens as it is).

Published versions keep their own columns (``prompt`` is the chat template as rendered for the
generating model, ``completion`` its text) and carry the conversation besides:

- ``sft-chain-of-thought``: ``messages``, the system and user turns the model was sent (the
  recipe's ``generation.system_prompt`` and ``prompt_template``, as ``build_messages`` renders
  them) and the assistant's completion;
- ``preference-pairs``: ``prompt_messages``, the same system and user turns;
- ``process-supervision``: TRL's stepwise layout already (``prompt``, ``completions``, ``labels``).

An export is TRL's own layout (its trainers read a ``prompt`` string as a prompt-completion row,
so the TRL names hold only conversations there): SFT rows ``messages``; pairs ``prompt`` (a list
of messages), ``chosen`` and ``rejected`` (one assistant message each); the strings they came
from as ``*_text``; every other column as published. Curated versions are exported as they are.

The split is by problem family (``root_id`` of an evolved instruction, ``variant_of`` of a
difficulty variant, else ``seed_id``), from a hash: no problem on both sides, the same split on
every run and machine, whatever the shard size.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import yaml

from distillery.stages.synthesize import build_messages, derived_seed
from schemas.recipe import GenerationConfig

MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
MESSAGES = pl.List(MESSAGE)
SPLITS = ("train", "test")
_PLOT_PATH = re.compile(r"plots/[A-Za-z0-9_.-]+\.png")
FORMATS = ("parquet", "jsonl")
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"))


class ExportError(ValueError):
    """A version that cannot be exported as asked; the message names the argument."""


def _prompt(question: str, cfg: GenerationConfig, cache: dict) -> list[dict[str, str]]:
    if question not in cache:
        cache[question] = build_messages(question, cfg)
    return cache[question]


def with_messages(rows: pl.DataFrame, cfg: GenerationConfig) -> pl.DataFrame:
    """SFT rows with ``messages``: the turns each sample's model was sent, then its completion."""
    cache: dict = {}
    values = [
        [*_prompt(q, cfg, cache), {"role": "assistant", "content": c}]
        for q, c in zip(rows["question"].to_list(), rows["completion"].to_list(), strict=True)
    ]
    return rows.with_columns(pl.Series("messages", values, dtype=MESSAGES))


def with_prompt_messages(pairs: pl.DataFrame, cfg: GenerationConfig) -> pl.DataFrame:
    """Preference pairs with ``prompt_messages``: the turns both answers were written for."""
    cache: dict = {}
    values = [_prompt(q, cfg, cache) for q in pairs["prompt"].to_list()]
    return pairs.with_columns(pl.Series("prompt_messages", values, dtype=MESSAGES))


def problem_key(rows: pl.DataFrame) -> pl.Expr:
    """The problem family a row belongs to: what the split keeps on one side."""
    family = [c for c in ("root_id", "variant_of", "seed_id", "sample_id") if c in rows.columns]
    if not family:
        msg = "the split needs a problem id: the rows have none of root_id, variant_of, seed_id, sample_id"
        raise ExportError(msg)
    return pl.coalesce([pl.col(c).cast(pl.Utf8) for c in family])


def split_of(keys: list[str | None], test_share: float) -> list[str]:
    """``"test"`` for about ``test_share`` of the problem keys (a hash of each), else ``"train"``."""
    bound = test_share * 2**31
    return ["test" if key is not None and derived_seed("split", key) < bound else "train" for key in keys]


def with_split(rows: pl.DataFrame, test_share: float) -> pl.DataFrame:
    keys = rows.select(problem_key(rows).alias("key"))["key"].to_list() if rows.height else []
    return rows.with_columns(pl.Series("split", split_of(keys, test_share), dtype=pl.Utf8))


def _message(role: str, column: str) -> pl.Expr:
    return pl.struct(pl.lit(role).alias("role"), pl.col(column).cast(pl.Utf8).alias("content"))


def _turns(*turns: tuple[str, str]) -> pl.Expr:
    """A list of messages per row: ``(role, column)`` for each turn."""
    return pl.concat_list([_message(role, column) for role, column in turns])


def trainer_rows(kind: str | None, rows: pl.DataFrame) -> pl.DataFrame:
    """One shard of a version in TRL's layout for its kind (see the module's docstring)."""
    if kind == "sft-chain-of-thought":
        if "messages" not in rows.columns:  # a version published before the column existed
            rows = rows.with_columns(_turns(("user", "question"), ("assistant", "completion")).alias("messages"))
        return rows.rename({c: f"{c}_text" for c in ("prompt", "completion") if c in rows.columns})
    if kind == "preference-pairs":
        prompt = pl.col("prompt_messages") if "prompt_messages" in rows.columns else _turns(("user", "prompt_text"))
        texts = rows.rename({c: f"{c}_text" for c in ("prompt", "chosen", "rejected")})
        out = texts.with_columns(prompt.alias("prompt"), _turns(("assistant", "chosen_text")).alias("chosen"), _turns(("assistant", "rejected_text")).alias("rejected"))
        return out.drop("prompt_messages", strict=False)
    return rows


def _shards(store, manifest: dict) -> Iterator[pl.DataFrame]:
    from distillery.stages.publish import read_shard

    for shard in manifest["shards"]:
        yield read_shard(store, manifest, shard)


def size_category(rows: int) -> str:
    return next((name for bound, name in _SIZE_CATEGORIES if rows < bound), "n>10M")


@dataclass
class Exported:
    folder: Path
    rows: dict[str, int] = field(default_factory=dict)  # per split
    files: list[str] = field(default_factory=list)


def dataset_card(manifest: dict, exported: Exported, fmt: str) -> str:
    """README.md: a Hugging Face dataset card (YAML header: license, configs and splits, size
    category, tags) over the version's own card (counts, lineage, plots)."""
    from distillery.stages.publish import render_card

    recipe = manifest.get("recipe") or {}
    license_id = (recipe.get("publish") or {}).get("license") or "other"
    total = sum(exported.rows.values())
    suffix = "parquet" if fmt == "parquet" else "jsonl"
    header = {
        "license": license_id,
        "pretty_name": f"{manifest['dataset']} {manifest['version']}",
        "size_categories": [size_category(total)],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "distillery", *([manifest["kind"]] if manifest.get("kind") else [])],
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"data/{s}-*.{suffix}"} for s in SPLITS if exported.rows.get(s)] or [{"split": "train", "path": f"data/train-*.{suffix}"}],
            }
        ],
    }
    columns = {
        "sft-chain-of-thought": "`messages` (system, user, assistant): TRL's SFTTrainer reads it as it is.",
        "preference-pairs": "`prompt` (system and user messages), `chosen` and `rejected` (one assistant message each): TRL's DPOTrainer reads them as they are.",
        "process-supervision": "`prompt`, `completions` (the steps) and `labels` (one per step): TRL's stepwise-supervision layout (PRMTrainer).",
    }.get(manifest.get("kind") or "", "the version's own columns.")
    split_line = ", ".join(f"{s}: {exported.rows[s]} rows" for s in SPLITS if s in exported.rows)
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        render_card(manifest),
        "",
        "## Export",
        "",
        f"- columns: {columns}",
        f"- splits: {split_line or 'train: 0 rows'} (by problem: no problem on both sides)",
        f"- exported from: {manifest.get('uri') or manifest['dataset'] + '/' + manifest['version']}",
        "",
    ]
    return "\n".join(lines)


def _write(frame: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        frame.write_parquet(path)
    else:
        frame.write_ndjson(path)


def export_version(store, manifest: dict, out: str | Path, *, fmt: str = "parquet", test_share: float | None = None) -> Exported:
    """Write ``manifest``'s version to ``out`` in its kind's trainer layout, shard by shard (memory:
    one shard), with a README.md dataset card and the version's plots. ``test_share`` (0 to 1)
    splits by problem; without it a ``split`` column the version was published with decides,
    else every row is ``train``. ``out`` must not exist or be an empty folder: it appears whole
    (written beside it, then renamed) or not at all."""
    if fmt not in FORMATS:
        msg = f"--format {fmt!r}: expected one of {', '.join(FORMATS)}"
        raise ExportError(msg)
    if test_share is not None and not 0.0 <= test_share < 1.0:
        msg = f"--test-share {test_share!r}: must be at least 0 and below 1"
        raise ExportError(msg)
    kind = manifest.get("kind")
    if kind == "reward-model":
        msg = f"{manifest['dataset']}/{manifest['version']} is a reward model, not a data set: export takes a data set's version"
        raise ExportError(msg)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        msg = f"--out {out}: exists and is not an empty folder (export never overwrites)"
        raise ExportError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = "parquet" if fmt == "parquet" else "jsonl"
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        exported = Exported(out)
        (work / "data").mkdir()
        counter = {s: 0 for s in SPLITS}
        schema = None
        for shard in _shards(store, manifest):
            rows = trainer_rows(kind, shard)
            if test_share is not None:
                rows = with_split(rows, test_share)
            elif "split" not in rows.columns:
                rows = rows.with_columns(pl.lit("train").alias("split"))
            schema = schema or rows.schema
            for split in SPLITS:
                part = rows.filter(pl.col("split") == split)
                if part.height:
                    name = f"data/{split}-{counter[split]:05d}.{suffix}"
                    _write(part, work / name, fmt)
                    counter[split] += 1
                    exported.rows[split] = exported.rows.get(split, 0) + part.height
                    exported.files.append(name)
        if not exported.files:  # an empty version: one empty train file, so that it still loads
            name = f"data/train-00000.{suffix}"
            _write(pl.DataFrame(schema=schema) if schema else pl.DataFrame({"split": []}, schema={"split": pl.Utf8}), work / name, fmt)
            exported.rows["train"] = 0
            exported.files.append(name)
        (work / "plots").mkdir()
        for plot in manifest.get("plots") or []:
            if not _PLOT_PATH.fullmatch(str(plot.get("path"))):
                msg = f"{manifest['dataset']}/{manifest['version']}: plot path {plot.get('path')!r} is not plots/NAME.png"
                raise ExportError(msg)
            (work / plot["path"]).write_bytes(store.get(f"{manifest['dataset']}/{manifest['version']}/{plot['path']}"))
        (work / "README.md").write_text(dataset_card(manifest, exported, fmt))
        (work / "export.json").write_text(json.dumps({"version": f"{manifest['dataset']}/{manifest['version']}", "kind": kind, "format": fmt, "test_share": test_share, "rows": exported.rows, "files": exported.files}, indent=2))
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return exported

