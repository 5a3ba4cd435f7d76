"""GLAN, taxonomy-driven generation: the seeds are the taxonomy's subjects; a syllabus per
subject, then problems per session (stages ``syllabus``, ``questions``;
``distillery/stages/glan.py``), and the coverage of every taxonomy node in the stats."""

from __future__ import annotations

from collections import Counter

import polars as pl
from prefect import get_run_logger

from distillery.accounting import StageResult
from distillery.stages.glan import coverage, ingest_taxonomy
from flows.strategies.base import Made, Strategy, register, templates
from schemas.recipe import Recipe
from tasks.glan import write_questions, write_syllabi


@register
class Glan(Strategy):
    name = "glan"
    published_columns = ("subject_id",)

    @staticmethod
    def enabled(recipe: Recipe) -> bool:
        return bool(recipe.glan.taxonomy)

    def ingest(self, recipe: Recipe) -> StageResult:
        return ingest_taxonomy(recipe.glan.taxonomy)

    def run(self, generator, recipe: Recipe, subjects: pl.DataFrame, lineage: dict) -> Made:
        logger, cfg, size = get_run_logger(), recipe.glan, recipe.generation.shard_size
        sessions = write_syllabi(generator, subjects, cfg, recipe.generation.seed, size)
        logger.info("syllabus: %d subjects -> %d sessions, dropped %s", subjects.height, sessions.kept.height, sessions.count.dropped or "none")
        if sessions.kept.height == 0:
            made = StageResult.empty("questions", cfg.per_session)
        else:
            made = write_questions(generator, sessions.kept, cfg, recipe.generation.seed, size * cfg.per_session)
            logger.info("questions: %d sessions -> %d problems, dropped %s", sessions.kept.height, made.kept.height, made.count.dropped or "none")
        return Made({"syllabus": sessions, "questions": made}, made.kept)

    def lineage(self, recipe: Recipe) -> dict:
        """The GLAN settings and its prompt templates, by name and version."""
        return {**recipe.glan.model_dump(mode="json"), "prompt_templates": templates("glan", ("syllabus", "question"))}

    def stats(self, made: Made, seeds: pl.DataFrame, published: dict[str, Counter]) -> dict:
        """Per taxonomy node: sessions, problems, published samples."""
        return {"taxonomy_coverage": coverage(seeds, made.stages["syllabus"].kept, made.stages["questions"].kept, published["subject_id"])}
