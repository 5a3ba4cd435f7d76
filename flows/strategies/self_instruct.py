"""Self-Instruct: new tasks from the seed pool, plus Ensemble-Instruct's agreement when the
recipe names solver members (``distillery/stages/self_instruct.py``)."""

from __future__ import annotations

import polars as pl
from prefect import get_run_logger

from distillery.accounting import StageResult
from flows.strategies.base import Made, Strategy, register, templates
from schemas.recipe import Recipe
from tasks.self_instruct import ensemble_agreement, self_instruct


@register
class SelfInstruct(Strategy):
    name = "self_instruct"

    @staticmethod
    def enabled(recipe: Recipe) -> bool:
        return bool(recipe.self_instruct.per_seed)

    def run(self, generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> Made:
        logger, cfg = get_run_logger(), recipe.self_instruct
        size = recipe.generation.shard_size * cfg.per_seed
        made = self_instruct(generator, seeds, cfg, recipe.generation.seed, size)
        logger.info("self-instruct: %d seeds -> %d new tasks kept, dropped %s", seeds.height, made.kept.height, made.count.dropped or "none")
        if not cfg.members:
            return Made({"self-instruct": made}, made.kept)
        agreed = ensemble_agreement(generator, made.kept, cfg, recipe.generation.seed, size) if made.kept.height else StageResult.empty("agreement")
        logger.info("agreement: %d of %d new tasks kept, dropped %s", agreed.count.rows_out, agreed.count.rows_in, agreed.count.dropped or "none")
        return Made({"self-instruct": made, "agreement": agreed}, agreed.kept)

    def lineage(self, recipe: Recipe) -> dict:
        """The Self-Instruct settings and its prompt templates, by name and version."""
        names = ["new_task", *(["solve"] if recipe.self_instruct.members else [])]
        return {**recipe.self_instruct.model_dump(mode="json"), "prompt_templates": templates("self_instruct", names)}
