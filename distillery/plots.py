"""PNG plots for a version's data card, drawn from its manifest, published rows and rejects.

Each plot is a pure function of ``(manifest, rows, rejects)`` that returns a matplotlib
:class:`~matplotlib.figure.Figure`, or ``None`` when the version has no data for it (a plot
with nothing to show is left out, never drawn empty). :func:`render_plots` turns them into
``{filename: png_bytes}``.

- ``funnel.png``: rows through the stages, each stage's drops stacked by reason.
- ``lengths.png``: completion lengths (tokens; characters of the text column for curated
  data), published against rejected where the rejects' records carry them.
- ``rewards.png``: rewards of samples, correct against incorrect; chosen against rejected
  scores of preference pairs; a reward model's scores of positives and negatives per split,
  with its ROC AUC.
- ``pass_rate.png``: the share of correct samples per problem (from the rows and rejects, or
  from ``stats.pass_rate_histogram``).
- ``samples_spent.png``: samples spent per problem by adaptive sampling (more than one round).
- ``dedup_contamination.png``: dedup drops by reason and decontamination hits per benchmark.
- ``ngrams.png``: distinct-n and top-k share of the output against the seeds, and the most
  frequent output n-grams.

Figures are built with :class:`Figure` and the Agg canvas directly (no pyplot, no global
state), so rendering is safe from Prefect's worker threads. The PNG bytes are deterministic
for the same inputs: no date or software version is written into them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

WIDTH_IN, HEIGHT_IN, DPI = 10.0, 5.5, 100
SIZE_PX = (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI))  # (width, height) of every PNG
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

KEPT = "#4c72b0"
INPUT = "#8c8c8c"
PUBLISHED = "#55a868"
GOOD, BAD, UNKNOWN = "#55a868", "#c44e52", "#8c8c8c"
OUTPUT, SEEDS = "#4c72b0", "#dd8452"
# drop reasons: distinct colours without the blues and greens used for kept/published rows
DROP_COLOURS = [
    "#c44e52", "#dd8452", "#8172b3", "#937860", "#da8bc3", "#ccb974", "#64b5cd", "#ff9f9b",
    "#b07aa1", "#9c755f", "#f28e2b", "#e15759", "#76b7b2", "#edc948", "#bab0ac", "#d37295",
]

Builder = Callable[[dict, pl.DataFrame, pl.DataFrame], Figure | None]


# --------------------------------------------------------------------------- rendering


def _figure() -> Figure:
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes, with no date or software version in them (deterministic)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def render_plots(manifest: dict, rows: pl.DataFrame | None = None, rejects: pl.DataFrame | None = None) -> dict[str, bytes]:
    """``{filename: png_bytes}`` of every plot the version has data for; the first error is raised."""
    images, _ = _render(manifest, rows, rejects, strict=True)
    return images


def render_plots_safely(manifest: dict, rows: pl.DataFrame | None = None, rejects: pl.DataFrame | None = None) -> tuple[dict[str, bytes], list[dict]]:
    """Like :func:`render_plots`, but a plot that fails is left out and reported, not raised.

    Returns the images and ``[{"plot": filename, "error": "Type: message"}]`` for the failures.
    """
    return _render(manifest, rows, rejects, strict=False)


def _render(manifest: dict, rows: pl.DataFrame | None, rejects: pl.DataFrame | None, *, strict: bool) -> tuple[dict[str, bytes], list[dict]]:
    rows = rows if rows is not None else pl.DataFrame()
    rejects = rejects if rejects is not None else pl.DataFrame()
    images: dict[str, bytes] = {}
    skipped: list[dict] = []
    for name, build in PLOTS.items():
        try:
            fig = build(manifest, rows, rejects)
            if fig is not None:
                images[name] = png_bytes(fig)
        except Exception as exc:
            if strict:
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.warning("plot %s of %s %s not drawn: %s", name, manifest.get("dataset"), manifest.get("version"), error)
            skipped.append({"plot": name, "error": error})
    return images, skipped


# --------------------------------------------------------------------------- helpers


def _stats(manifest: dict) -> dict:
    return manifest.get("stats") or {}


def _column(frame: pl.DataFrame, name: str) -> pl.Series | None:
    return frame[name] if name in frame.columns else None


def _reject_fields(rejects: pl.DataFrame, fields: dict[str, pl.DataType]) -> pl.DataFrame:
    """``stage``, ``reason``, ``seed_id`` and fields of each reject's JSON record (null where absent).

    Rejects at ingest are left out: their record is the raw input line, not a sample.
    """
    columns = {"stage": pl.Utf8, "reason": pl.Utf8, "seed_id": pl.Utf8}
    if rejects.is_empty() or "record" not in rejects.columns:
        return pl.DataFrame(schema={**columns, **fields})
    frame = rejects.filter(pl.col("stage") != "ingest") if "stage" in rejects.columns else rejects
    selected = [pl.col(c).cast(pl.Utf8) if c in frame.columns else pl.lit(None, pl.Utf8).alias(c) for c in columns]
    for field, dtype in fields.items():
        raw = pl.col("record").str.json_path_match(f"$.{field}")
        selected.append((raw == "true" if dtype == pl.Boolean else raw.cast(dtype, strict=False)).alias(field))
    return frame.select(selected)


def _reject_field(rejects: pl.DataFrame, field: str, dtype: pl.DataType) -> pl.DataFrame:
    """:func:`_reject_fields` of one field, the rejects without it dropped."""
    return _reject_fields(rejects, {field: dtype}).drop_nulls(field)


def _bins(*arrays: np.ndarray, max_bins: int = 40, integer: bool = False) -> np.ndarray:
    values = np.concatenate([a for a in arrays if len(a)]).astype(float)
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    if integer:
        step = max(1, int(np.ceil((high - low + 1) / max_bins)))
        return np.arange(np.floor(low), np.ceil(high) + step + 1, step) - 0.5
    edges = np.histogram_bin_edges(values, bins="auto", range=(low, high))
    return edges if len(edges) - 1 <= max_bins else np.linspace(low, high, max_bins + 1)


def _label_bars(ax, bars, values, fmt="{:,}") -> None:
    for bar, value in zip(bars, values):
        ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def _counts(ax, axis: str = "y") -> None:
    """Whole numbers on an axis of counts, light grid lines behind the bars."""
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis=axis, alpha=0.3)
    ax.set_axisbelow(True)


def _title(manifest: dict, what: str) -> str:
    return f"{manifest.get('dataset', '?')} {manifest.get('version', '')}: {what}"


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


# --------------------------------------------------------------------------- the plots


def funnel(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Rows into and out of every stage (input at the top, published at the bottom), drops by reason."""
    counts = manifest.get("counts") or {}
    stages = counts.get("stages") or []
    if not stages or max([counts.get("input", 0)] + [s["rows_in"] * s["fanout"] for s in stages]) == 0:
        return None
    reasons = sorted({reason for s in stages for reason, n in s["dropped"].items() if n})
    colour = {reason: DROP_COLOURS[i % len(DROP_COLOURS)] for i, reason in enumerate(reasons)}
    labels = ["input"] + [s["stage"] + (f" (\u00d7{s['fanout']})" if s["fanout"] != 1 else "") for s in stages] + ["published"]
    y = np.arange(len(labels))

    fig = _figure()
    ax = fig.add_subplot()
    ax.barh(0, counts["input"], color=INPUT, label="input")
    ax.barh(y[1:-1], [s["rows_out"] for s in stages], color=KEPT, label="passed on")
    left = np.array([s["rows_out"] for s in stages], dtype=float)
    for reason in reasons:
        widths = np.array([s["dropped"].get(reason, 0) for s in stages], dtype=float)
        ax.barh(y[1:-1], widths, left=left, color=colour[reason], label=f"dropped: {reason}")
        left += widths
    ax.barh(y[-1], counts["published"], color=PUBLISHED, label="published")

    totals = [counts["input"], *left.tolist(), counts["published"]]
    texts = [f"{counts['input']:,}"]
    for s in stages:
        dropped = sum(s["dropped"].values())
        texts.append(f"{s['rows_out']:,} of {s['rows_in'] * s['fanout']:,}" + (f"  (-{dropped:,})" if dropped else ""))
    texts.append(f"{counts['published']:,}")
    top = max(totals)
    for i, (total, text) in enumerate(zip(totals, texts)):
        ax.text(total + top * 0.01, i, text, va="center", fontsize=9)
    ax.set_xlim(0, top * 1.3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    _counts(ax, "x")
    ax.set_title(_title(manifest, f"row funnel ({counts.get('rejected', 0):,} rows rejected, kept in rejects/)"))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return fig


def lengths(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Completion lengths in tokens (or characters of a curated text column), published versus rejected."""
    if manifest.get("kind") == "reward-model":
        return None
    dropped = _reject_field(rejects, "num_tokens", pl.Int64)["num_tokens"]
    if "num_tokens" in rows.columns or len(dropped):
        unit, kept = "completion tokens", _column(rows, "num_tokens")
    else:
        text_column = (manifest.get("generator") or {}).get("text_column")
        if not text_column:
            return None
        unit = f"characters of {text_column!r}"
        kept = rows[text_column].str.len_chars() if text_column in rows.columns else None
        dropped = _reject_field(rejects, text_column, pl.Utf8)[text_column].str.len_chars()
    kept_values = kept.drop_nulls().to_numpy() if kept is not None else np.array([])
    dropped_values = dropped.to_numpy()
    if not len(kept_values) and not len(dropped_values):
        return None

    bins = _bins(kept_values, dropped_values, integer=True, max_bins=int(np.clip(2 * np.sqrt(len(kept_values) + len(dropped_values)), 10, 40)))
    fig = _figure()
    ax = fig.add_subplot()
    if len(dropped_values):
        ax.hist(dropped_values, bins=bins, color=BAD, alpha=0.55, label=f"rejected (n={len(dropped_values):,}, mean {dropped_values.mean():.1f})")
    if len(kept_values):
        ax.hist(kept_values, bins=bins, color=KEPT, alpha=0.75, label=f"published (n={len(kept_values):,}, mean {kept_values.mean():.1f})")
    ax.set_xlabel(unit)
    ax.set_ylabel("samples")
    _counts(ax)
    ax.legend(fontsize=9)
    ax.set_title(_title(manifest, f"length distribution ({unit})"))
    return fig


def rewards(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Reward distributions: by correctness (samples), chosen vs rejected (pairs), per split (reward models)."""
    if manifest.get("kind") == "reward-model":
        return _reward_model_scores(manifest, rows)
    if {"chosen_score", "rejected_score"} <= set(rows.columns):
        return _pair_scores(manifest, rows)
    columns = {"reward": pl.Float64, "correct": pl.Boolean}
    published = rows.select(
        [pl.col(c).cast(t) if c in rows.columns else pl.lit(None, t).alias(c) for c, t in columns.items()]
    ) if "reward" in rows.columns else pl.DataFrame(schema=columns)
    rejected = _reject_fields(rejects, columns).select(list(columns))
    groups_published = _by_correctness(published)
    everything = _by_correctness(pl.concat([published, rejected])) if not rejected.drop_nulls("reward").is_empty() else {}
    panels = [(f"published ({sum(len(v) for v in groups_published.values()):,} samples)", groups_published)]
    if everything:
        panels.append((f"all scored samples, published and rejected ({sum(len(v) for v in everything.values()):,})", everything))
    panels = [(t, groups) for t, groups in panels if any(len(v) for v in groups.values())]
    if not panels:
        return None
    bins = _bins(*[v for _, groups in panels for v in groups.values()], max_bins=30)
    fig = _figure()
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    colours = {"correct": GOOD, "incorrect": BAD, "no reference": UNKNOWN}
    for ax, (title, groups) in zip(axes, panels):
        bottom = np.zeros(len(bins) - 1)
        for name, values in groups.items():
            if len(values):
                heights, _ = np.histogram(values, bins=bins)
                drawn = heights > 0  # empty bins would pin the y limit at the stack below them
                ax.bar(bins[:-1][drawn], heights[drawn], width=np.diff(bins)[drawn], bottom=bottom[drawn], align="edge",
                       color=colours[name], alpha=0.85, label=f"{name} ({len(values):,}, mean {values.mean():.2f})")
                bottom += heights
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("reward")
        ax.set_ylabel("samples")
        _counts(ax)
        ax.legend(fontsize=8)
    scorer = (manifest.get("scorer") or {}).get("method")
    fig.suptitle(_title(manifest, "reward distribution" + (f" (scored by {scorer})" if scorer and scorer != "none" else "")))
    return fig


def _by_correctness(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    if frame.is_empty():
        return {}
    frame = frame.drop_nulls("reward")
    return {
        "correct": frame.filter(pl.col("correct") == True)["reward"].to_numpy(),  # noqa: E712 (polars expression)
        "incorrect": frame.filter(pl.col("correct") == False)["reward"].to_numpy(),  # noqa: E712
        "no reference": frame.filter(pl.col("correct").is_null())["reward"].to_numpy(),
    }


def _pair_scores(manifest: dict, rows: pl.DataFrame) -> Figure | None:
    pairs = rows.select(pl.col("chosen_score").cast(pl.Float64), pl.col("rejected_score").cast(pl.Float64)).drop_nulls()
    if pairs.is_empty():
        return None
    chosen, rejected = pairs["chosen_score"].to_numpy(), pairs["rejected_score"].to_numpy()
    gap = chosen - rejected
    fig = _figure()
    left, right = fig.subplots(1, 2)
    bins = _bins(chosen, rejected, max_bins=30)
    left.hist(rejected, bins=bins, color=BAD, alpha=0.6, label=f"rejected (mean {rejected.mean():.2f})")
    left.hist(chosen, bins=bins, color=GOOD, alpha=0.6, label=f"chosen (mean {chosen.mean():.2f})")
    left.set_title(f"scores of the {len(pairs):,} pairs", fontsize=10)
    left.set_xlabel("score")
    left.set_ylabel("pairs")
    left.legend(fontsize=8)
    right.hist(gap, bins=_bins(gap, max_bins=30), color=KEPT)
    right.set_title(f"score gap, chosen - rejected (min {gap.min():.2f}, mean {gap.mean():.2f})", fontsize=10)
    right.set_xlabel("gap")
    right.set_ylabel("pairs")
    for ax in (left, right):
        _counts(ax)
    fig.suptitle(_title(manifest, "preference pair scores"))
    return fig


def _reward_model_scores(manifest: dict, rows: pl.DataFrame) -> Figure | None:
    if not {"split", "correct", "reward"} <= set(rows.columns) or rows.is_empty():
        return None
    metrics = manifest.get("metrics") or {}
    splits = [s for s in ("train", "heldout") if s in set(rows["split"].to_list())]
    splits += sorted(set(rows["split"].drop_nulls().to_list()) - set(splits))
    fig = _figure()
    axes = fig.subplots(1, len(splits), sharex=True, squeeze=False)[0]
    bins = np.linspace(0.0, 1.0, 26)
    for ax, split in zip(axes, splits):
        part = rows.filter(pl.col("split") == split)
        positives = part.filter(pl.col("correct") == True)["reward"].drop_nulls().to_numpy()  # noqa: E712
        negatives = part.filter(pl.col("correct") == False)["reward"].drop_nulls().to_numpy()  # noqa: E712
        ax.hist(negatives, bins=bins, color=BAD, alpha=0.6, label=f"incorrect ({len(negatives):,})")
        ax.hist(positives, bins=bins, color=GOOD, alpha=0.6, label=f"correct ({len(positives):,})")
        auc = metrics.get(f"auc_{split}")
        ax.set_title(f"{'held-out' if split == 'heldout' else split}: ROC AUC {'n/a' if auc is None else f'{auc:.3f}'}", fontsize=10)
        ax.set_xlabel("reward = P(correct)")
        ax.set_ylabel("examples")
        _counts(ax)
        ax.legend(fontsize=8)
    fig.suptitle(_title(manifest, "reward model scores of correct and incorrect completions"))
    return fig


def pass_rate(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Problems by their share of correct samples: from every verified sample (published or
    rejected), else from ``stats.pass_rate_histogram``."""
    if manifest.get("kind") == "reward-model":
        return None
    frames = []
    if {"seed_id", "correct"} <= set(rows.columns):
        frames.append(rows.select(pl.col("seed_id").cast(pl.Utf8), pl.col("correct").cast(pl.Boolean)).drop_nulls())
    verified = _reject_field(rejects, "correct", pl.Boolean)
    if not verified.is_empty():
        frames.append(verified.select("seed_id", "correct").drop_nulls())
    samples = pl.concat(frames) if frames else pl.DataFrame()
    if not samples.is_empty():
        per_problem = samples.group_by("seed_id").agg(pl.col("correct").mean().alias("rate"), pl.len().alias("n"))
        rates = per_problem["rate"].round(2).to_list()
        source = f"{per_problem.height:,} problems, {samples.height:,} verified samples (published and rejected)"
        histogram: dict[float, int] = {}
        for rate in rates:
            histogram[rate] = histogram.get(rate, 0) + 1
    else:
        stat = _stats(manifest).get("pass_rate_histogram") or {}
        if not stat:
            return None
        histogram = {float(k): int(v) for k, v in stat.items()}
        source = f"{sum(histogram.values()):,} problems, samples after curation (stats.pass_rate_histogram)"
    keys = sorted(histogram)
    fig = _figure()
    ax = fig.add_subplot()
    if len(keys) <= 25:
        colours = [BAD if k == 0 else GOOD if k == 1 else KEPT for k in keys]
        bars = ax.bar(keys, [histogram[k] for k in keys], width=0.03, color=colours)
        _label_bars(ax, bars, [histogram[k] for k in keys])
    else:
        values = np.repeat(keys, [histogram[k] for k in keys])
        ax.hist(values, bins=np.linspace(0, 1, 21), color=KEPT)
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("pass rate (share of a problem's samples that are correct)")
    ax.set_ylabel("problems")
    _counts(ax)
    none = histogram.get(0.0, 0)
    ax.set_title(_title(manifest, f"pass rate per problem\n{source}; {none:,} with no correct sample"), fontsize=11)
    return fig


def samples_spent(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Adaptive sampling: problems by the samples spent on them (only when it ran more than one round)."""
    sampling = _stats(manifest).get("sampling") or {}
    histogram = {int(k): int(v) for k, v in (sampling.get("samples_spent_histogram") or {}).items()}
    if not histogram or int(sampling.get("rounds") or 0) <= 1:
        return None
    keys = sorted(histogram)
    fig = _figure()
    ax = fig.add_subplot()
    bars = ax.bar([str(k) for k in keys], [histogram[k] for k in keys], color=KEPT)
    _label_bars(ax, bars, [histogram[k] for k in keys])
    ax.set_xlabel(f"samples spent on a problem (budget {sampling.get('budget_per_problem')})")
    ax.set_ylabel("problems")
    _counts(ax)
    total = sampling.get("samples_spent_total", sum(k * v for k, v in histogram.items()))
    ax.set_title(_title(manifest, f"adaptive sampling: {total:,} samples for {sum(histogram.values()):,} problems in {sampling['rounds']} rounds"))
    return fig


def dedup_contamination(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Dedup drops by reason (next to the rows dedup kept) and contamination hits per benchmark."""
    stages = (manifest.get("counts") or {}).get("stages") or []
    dedup = [s for s in stages if s["stage"] == "dedup"]
    drops = {reason: sum(s["dropped"].get(reason, 0) for s in dedup) for s in dedup for reason in s["dropped"]}
    hits = _stats(manifest).get("contamination_hits") or {}
    panels = []
    if sum(drops.values()):
        kept = sum(s["rows_out"] for s in dedup)
        panels.append(("dedup", {"kept": kept, **dict(sorted(drops.items()))}, f"dedup: {sum(drops.values()):,} of {sum(s['rows_in'] for s in dedup):,} rows dropped"))
    if hits:
        panels.append(("contamination", dict(sorted(hits.items())), f"decontamination: {sum(hits.values()):,} rows dropped, hits per benchmark"))
    if not panels:
        return None
    fig = _figure()
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, values, title) in zip(axes, panels):
        names = list(values)
        colours = [KEPT if kind == "dedup" and n == "kept" else DROP_COLOURS[i % len(DROP_COLOURS)] for i, n in enumerate(names)]
        bars = ax.barh([_short(n) for n in names], list(values.values()), color=colours)
        top = max(values.values()) or 1
        for bar, value in zip(bars, values.values()):
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{value:,}", va="center", fontsize=9)
        ax.set_xlim(0, top * 1.2)
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        _counts(ax, "x")
        ax.set_title(title, fontsize=10)
    fig.suptitle(_title(manifest, "duplicates and benchmark contamination"))
    return fig


def ngrams(manifest: dict, rows: pl.DataFrame, rejects: pl.DataFrame) -> Figure | None:
    """Model-collapse statistics: distinct-n and top-k share, output against seeds; top output n-grams."""
    collapse = _stats(manifest).get("collapse") or {}
    output, seeds = collapse.get("output") or {}, collapse.get("seeds") or {}
    if not output.get("texts"):
        return None
    orders = sorted((k for k in output if k.startswith("n") and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if not orders:
        return None
    has_seeds = bool(seeds.get("texts"))
    fig = _figure()
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.5])
    x = np.arange(len(orders))
    width = 0.38 if has_seeds else 0.6
    cfg = (manifest.get("recipe") or {}).get("collapse") or {}
    top_k = cfg.get("top_k")
    panels = (
        ("distinct_n", "distinct-n (unique / total n-grams)", cfg.get("min_distinct_2"), "gate: min 2-gram distinct-n"),
        ("top_k_share", f"share of the top-{top_k or 'k'} n-grams", cfg.get("max_top_k_share"), "gate: max 2-gram share"),
    )
    legend: dict = {}  # one legend for both panels, under them
    for column, (metric, label, threshold, threshold_label) in enumerate(panels):
        ax = fig.add_subplot(grid[0, column])
        out = [output[o][metric] for o in orders]
        if has_seeds:
            ax.bar(x - width / 2, out, width, color=OUTPUT, label=f"output ({output['texts']:,} texts)")
            ax.bar(x + width / 2, [seeds[o][metric] if o in seeds else 0 for o in orders], width, color=SEEDS, label=f"seeds ({seeds['texts']:,} texts)")
        else:
            ax.bar(x, out, width, color=OUTPUT, label=f"output ({output['texts']:,} texts)")
        if threshold is not None and "n2" in orders:  # the recipe's gate reads the output's 2-grams
            i = orders.index("n2")
            ax.hlines(threshold, i - 0.45, i + 0.45, color="black", linestyles="--", linewidth=1.2, label=f"{threshold_label} {threshold:g}")
        ax.set_xticks(x, [f"n={o[1:]}" for o in orders])
        ax.set_ylim(0, 1.05)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        for handle, text in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(text, handle)
    top_order = orders[-1]
    top = (output[top_order].get("top") or [])[:10]
    ax = fig.add_subplot(grid[0, 2])
    if top:
        names = [_short(str(t[0]), 32) for t in top]
        ax.barh(names, [int(t[1]) for t in top], color=OUTPUT)
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("occurrences")
        _counts(ax, "x")
    else:
        ax.set_axis_off()
    ax.set_title(f"most frequent output {top_order[1:]}-grams", fontsize=10)
    order = sorted(legend, key=lambda text: text.startswith("gate"))  # the bars first, then the thresholds
    fig.legend([legend[t] for t in order], order, loc="outside lower center", ncols=len(legend), fontsize=9, frameon=False)
    gate = collapse.get("gate") or {}
    verdict = "" if not gate else (" (gate passed)" if gate.get("passed") else f" (gate FAILED: {len(gate.get('violations') or [])} violations)")
    fig.suptitle(_title(manifest, "n-gram statistics" + verdict))
    return fig


PLOTS: dict[str, Builder] = {
    "funnel.png": funnel,
    "lengths.png": lengths,
    "rewards.png": rewards,
    "pass_rate.png": pass_rate,
    "samples_spent.png": samples_spent,
    "dedup_contamination.png": dedup_contamination,
    "ngrams.png": ngrams,
}
