"""Row accounting: every row that enters a stage leaves it kept or rejected with a reason.

A stage returns a :class:`StageResult`: the rows it passes on, the rows it drops (as rejects
with the stage, a reason and the whole row kept as JSON), and a :class:`StageCount` whose
numbers must add up (``rows_out == rows_in * fanout - sum(dropped)``). Shards of one stage
combine by summing, so the manifest's counts are the same however the work was split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import polars as pl

REJECT_SCHEMA = {
    "stage": pl.Utf8,
    "reason": pl.Utf8,
    "detail": pl.Utf8,
    "seed_id": pl.Utf8,
    "sample_id": pl.Utf8,
    "record": pl.Utf8,  # the rejected row itself, as JSON (or the raw input line at ingest)
}


class AccountingError(AssertionError):
    """A stage's counts do not add up: a bug, never bad input."""


@dataclass
class StageCount:
    stage: str
    rows_in: int
    rows_out: int
    fanout: int = 1
    dropped: dict[str, int] = field(default_factory=dict)

    def check(self) -> StageCount:
        expected = self.rows_in * self.fanout - sum(self.dropped.values())
        if self.rows_out != expected:
            msg = (
                f"stage {self.stage!r}: rows_out={self.rows_out} but rows_in*fanout - dropped = "
                f"{self.rows_in}*{self.fanout} - {sum(self.dropped.values())} = {expected}"
            )
            raise AccountingError(msg)
        return self

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "fanout": self.fanout,
            "dropped": dict(sorted(self.dropped.items())),
        }

    @staticmethod
    def combine(counts: list[StageCount]) -> StageCount:
        if not counts:
            msg = "cannot combine zero stage counts"
            raise ValueError(msg)
        dropped: Counter[str] = Counter()
        for c in counts:
            dropped.update(c.dropped)
        first = counts[0]
        return StageCount(
            stage=first.stage,
            rows_in=sum(c.rows_in for c in counts),
            rows_out=sum(c.rows_out for c in counts),
            fanout=first.fanout,
            dropped=dict(dropped),
        ).check()


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECT_SCHEMA)


def rows_to_rejects(
    stage: str, rows: pl.DataFrame, reason: str | list[str], detail: str | list[str | None] | None = None
) -> pl.DataFrame:
    """Turn dropped rows into rejects that keep the whole row as JSON."""
    if rows.height == 0:
        return empty_rejects()

    def column(value, name):
        if isinstance(value, list):
            return pl.Series(name, value, dtype=pl.Utf8)
        return pl.lit(value, dtype=pl.Utf8).alias(name)

    def id_column(name):
        return pl.col(name).cast(pl.Utf8) if name in rows.columns else pl.lit(None, dtype=pl.Utf8)

    return rows.select(
        pl.lit(stage).alias("stage"),
        column(reason, "reason"),
        column(detail, "detail"),
        id_column("seed_id").alias("seed_id"),
        id_column("sample_id").alias("sample_id"),
        pl.struct(pl.all()).struct.json_encode().alias("record"),
    )


@dataclass
class StageResult:
    stage: str
    kept: pl.DataFrame
    rejects: pl.DataFrame
    count: StageCount
    meta: dict = field(default_factory=dict)  # what a stage tells the manifest (e.g. ingest's parent)

    @staticmethod
    def split(
        stage: str,
        rows: pl.DataFrame,
        drops: list[tuple[str, pl.Expr]],
        *,
        fanout: int = 1,
        rows_in: int | None = None,
        detail: pl.Expr | None = None,
    ) -> StageResult:
        """Keep the rows no drop rule matches; the first matching rule names a dropped row's reason.

        ``detail``, evaluated on the dropped rows, says more than the reason (e.g. the values compared).
        """
        reason = pl.lit(None, dtype=pl.Utf8)
        for name, rule in reversed(drops):
            reason = pl.when(rule.fill_null(False)).then(pl.lit(name)).otherwise(reason)
        tagged = rows.with_columns(reason.alias("__reason"))
        kept = tagged.filter(pl.col("__reason").is_null()).drop("__reason")
        dropped = tagged.filter(pl.col("__reason").is_not_null())
        reasons = dropped["__reason"].to_list()
        details = dropped.select(detail.cast(pl.Utf8)).to_series().to_list() if detail is not None and dropped.height else None
        rejects = rows_to_rejects(stage, dropped.drop("__reason"), reasons, details)
        counts = dict(Counter(reasons))
        n_in = rows.height if rows_in is None else rows_in
        return StageResult(stage, kept, rejects, StageCount(stage, n_in, kept.height, fanout, counts).check())

    @staticmethod
    def from_reasons(
        stage: str, rows: pl.DataFrame, reasons: list[str | None], details: list[str | None], *, rows_in: int, fanout: int = 1
    ) -> StageResult:
        """Keep the rows whose reason is None; the others become rejects with their reason and detail
        (for stages that decide row by row in Python, e.g. on a model's answers)."""
        failed = pl.Series([r is not None for r in reasons], dtype=pl.Boolean)
        dropped = [(r, d) for r, d in zip(reasons, details, strict=True) if r is not None]
        rejects = rows_to_rejects(stage, rows.filter(failed), [r for r, _ in dropped], [d for _, d in dropped]) if dropped else empty_rejects()
        kept = rows.filter(~failed) if rows.height else rows
        return StageResult(stage, kept, rejects, StageCount(stage, rows_in, kept.height, fanout, dict(Counter(r for r, _ in dropped))).check())

    @staticmethod
    def empty(stage: str, fanout: int = 1) -> StageResult:
        """A stage that received no rows (all were dropped upstream)."""
        return StageResult(stage, pl.DataFrame(), empty_rejects(), StageCount(stage, 0, 0, fanout))

    @staticmethod
    def combine(results: list[StageResult]) -> StageResult:
        kept = pl.concat([r.kept for r in results], how="diagonal_relaxed") if results else pl.DataFrame()
        rejects = pl.concat([r.rejects for r in results]) if results else empty_rejects()
        return StageResult(results[0].stage, kept, rejects, StageCount.combine([r.count for r in results]))
