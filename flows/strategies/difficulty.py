"""Difficulty-targeted generation: probe each problem's pass rate with the recipe's own sampling
(the final sampling of the same problems then comes from the generation cache), rewrite the
always- and never-solved problems, keep the variants the ensemble agrees on an answer for, and
label every sample by its problem's pass rate (``distillery/stages/difficulty.py``)."""

from __future__ import annotations

from collections import Counter

import polars as pl
from prefect import get_run_logger

from distillery.accounting import StageCount, StageResult
from distillery.engine import SamplingSettings, in_shards
from distillery.stages.difficulty import label, probe, retarget, variant_requests
from flows.sampling import Verdicts, sample_in_rounds
from flows.strategies.base import Made, Strategy, register, templates
from schemas.recipe import Recipe
from tasks.self_instruct import ensemble_agreement


@register
class Difficulty(Strategy):
    name = "difficulty"
    published_columns = ("difficulty", "variant_direction")

    @staticmethod
    def enabled(recipe: Recipe) -> bool:
        return bool(recipe.difficulty.enabled)

    def run(self, generator, recipe: Recipe, seeds: pl.DataFrame, lineage: dict) -> Made:
        logger, cfg, size, seed = get_run_logger(), recipe.difficulty, recipe.generation.shard_size, recipe.generation.seed
        seen = Verdicts()
        sample_in_rounds(generator, recipe, seeds, lineage, seen)
        probed = probe(seeds, seen.frame())
        requests = variant_requests(probed.kept, run_seed=seed)
        results = in_shards(generator, requests, SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens), size) if requests else []
        targeted = retarget(probed.kept, requests, results, cfg)
        logger.info("retarget: %d problems probed, %d variants kept, dropped %s", seeds.height, targeted.kept.height - seeds.height, targeted.count.dropped or "none")
        originals = targeted.kept.filter(pl.col("variant_of").is_null())
        variants = targeted.kept.filter(pl.col("variant_of").is_not_null())
        agreed = ensemble_agreement(generator, variants, cfg, seed, size) if variants.height else StageResult.empty("agreement")
        kept = pl.concat([originals, agreed.kept], how="diagonal_relaxed") if agreed.kept.height else originals
        count = StageCount("agreement", targeted.kept.height, kept.height, 1, agreed.count.dropped).check()  # originals pass through
        return Made({"probe": probed, "retarget": targeted, "agreement": StageResult("agreement", kept, agreed.rejects, count)}, kept)

    def label(self, samples: pl.DataFrame, verdicts: pl.DataFrame, recipe: Recipe) -> pl.DataFrame:
        return label(samples, recipe.difficulty, verdicts=verdicts)

    def lineage(self, recipe: Recipe) -> dict:
        """The difficulty settings and the rewrite and solve templates, by name and version."""
        names = templates("difficulty", ("harder", "simpler")) | templates("self_instruct", ("solve",))
        return {**recipe.difficulty.model_dump(mode="json"), "prompt_templates": names}

    def stats(self, made: Made, seeds: pl.DataFrame, published: dict[str, Counter]) -> dict:
        """Problems probed and retargeted, and the published samples by difficulty and by origin."""
        probed = made.stages["probe"].kept
        rates = probed["probe_pass_rate"].to_list() if probed.height else []
        final = made.stages["agreement"].kept
        origin = Counter({("original" if k is None else k): v for k, v in published["variant_direction"].items()})
        return {
            "difficulty": {
                "problems_probed": len(rates),
                "always_solved": sum(r == 1.0 for r in rates if r is not None),
                "never_solved": sum(r == 0.0 for r in rates if r is not None),
                "variants_kept": final.filter(pl.col("variant_of").is_not_null()).height if final.height else 0,
                "published_by_difficulty": {str(k): v for k, v in sorted(published["difficulty"].items(), key=lambda kv: str(kv[0]))},
                "published_by_origin": dict(sorted(origin.items())),
            }
        }
