"""The strategy interface and its registry (see ``flows/strategies/__init__.py``)."""


from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import polars as pl

from distillery.accounting import StageResult
from schemas.recipe import Recipe


@dataclass
class Made:
    """A strategy's stages by name (in order) and the problems they made."""

    stages: dict[str, StageResult]
    problems: pl.DataFrame


class Strategy:
    name: str = ""  # the recipe section (and the manifest's ``generator`` key)
    published_columns: tuple[str, ...] = ()

    @staticmethod
    def enabled(recipe: Recipe) -> bool:
        raise NotImplementedError

    def ingest(self, recipe: Recipe) -> StageResult | None:
        return None

    def run(self, generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> Made:
        raise NotImplementedError

    def label(self, samples: pl.DataFrame, verdicts: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
        return samples

    def lineage(self, recipe: Recipe) -> dict:
        raise NotImplementedError

    def stats(self, made: Made, seeds: pl.DataFrame, published: dict[str, Counter]) -> dict:
        return {}


REGISTRY: list[type[Strategy]] = []


def register(cls: type[Strategy]) -> type[Strategy]:
    REGISTRY.append(cls)
    return cls


def active(recipe: Recipe) -> Strategy | None:
    """The recipe's strategy, or None: the seeds are the problems."""
    chosen = [cls for cls in REGISTRY if cls.enabled(recipe)]
    return chosen[0]() if chosen else None


def templates(family: str, names) -> dict[str, str]:
    """``{name: "family/name@version"}`` of prompt templates, for a strategy's lineage."""
    from distillery.prompts import load_template

    return {n: load_template(family, n).id for n in names}

