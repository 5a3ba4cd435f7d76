"""Evol-Instruct: ``evolve.rounds`` rounds of rewrites on the generation engines, each round's
surviving instructions the next round's parents; one stage (``evolve-<round>``) per round
(``distillery/stages/evolve.py``)."""

from __future__ import annotations

from collections import Counter

import polars as pl
from prefect import get_run_logger

from distillery.accounting import StageResult
from flows.strategies.base import Made, Strategy, register, templates
from schemas.recipe import Recipe
from tasks.evolve import evolve_shard


@register
class Evolve(Strategy):
    name = "evolve"

    @staticmethod
    def enabled(recipe: Recipe) -> bool:
        return bool(recipe.evolve.rounds)

    def run(self, generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> Made:
        logger = get_run_logger()
        rounds, current, size = {}, seeds, recipe.generation.shard_size
        for round_no in range(1, recipe.evolve.rounds + 1):
            stage = f"evolve-{round_no}"
            if current.height == 0:
                rounds[stage] = StageResult.empty(stage)
                continue
            shards = [current.slice(start, size) for start in range(0, current.height, size)]
            futures = [evolve_shard.submit(generator, i, shard, round_no, recipe.evolve, recipe.generation.seed) for i, shard in enumerate(shards)]
            result = StageResult.combine([f.result() for f in futures])
            logger.info("evolve round %d: %d instructions -> %d kept, eliminated %s", round_no, current.height, result.kept.height, result.count.dropped or "none")
            rounds[stage] = result
            current = result.kept
        return Made(rounds, current)

    def lineage(self, recipe: Recipe) -> dict:
        """The evolve settings and each operation's prompt template, by name and version."""
        return {**recipe.evolve.model_dump(mode="json"), "prompt_templates": templates("evol_instruct", recipe.evolve.operations)}

    def stats(self, made: Made, seeds: pl.DataFrame, published: dict[str, Counter]) -> dict:
        """Per round: instructions in, kept, eliminated by reason, and the operations that survived."""
        rounds = {}
        for round_no, result in enumerate(made.stages.values(), start=1):
            kept = result.kept
            operations = Counter(kept["evol_operation"].to_list()) if kept.height else Counter()
            rounds[str(round_no)] = {
                "instructions": result.count.rows_in,
                "kept": result.count.rows_out,
                "eliminated": dict(sorted(result.count.dropped.items())),
                "kept_by_operation": dict(sorted(operations.items())),
            }
        return {"evolve": {"rounds": rounds}}
