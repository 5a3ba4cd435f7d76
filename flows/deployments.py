"""Deployment entry flows: what `infra/prefect.yaml` schedules and `distillery deploy` registers.

The pipeline flows take a validated ``Recipe`` object. A deployment's parameters have to be
JSON with a schema the Prefect UI and `prefect deployment run --param` can fill in, so these
thin flows take a recipe *path* plus ``--set``-style overrides, load the recipe exactly as
`distillery run` does, and call the pipeline flow as a subflow. They return the published
version's URI (also the flow run's result).

GPU runs hold slots of the Prefect global concurrency limit ``gpu`` (one slot per GPU, created
by `distillery deploy`) for as long as their vLLM engines need the GPUs, so two scheduled runs
on one machine queue instead of fighting over a GPU. CPU runs (``engine.gpus_per_replica: 0``)
take no slot.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from prefect import flow

from distillery.logs import run_logger

GPU_LIMIT = "gpu"  # the name of the global concurrency limit (slots = GPUs on the machine)


def gpus_needed(engine) -> int:
    """Whole GPUs one run's engines occupy: replicas x gpus_per_replica x tensor_parallel_size."""
    return math.ceil(engine.replicas * engine.gpus_per_replica * engine.tensor_parallel_size)


@contextmanager
def gpu_slots(engine):
    """Hold ``gpus_needed(engine)`` slots of the ``gpu`` limit (nothing for a CPU engine)."""
    gpus = gpus_needed(engine)
    if gpus <= 0:
        yield 0
        return
    from prefect.concurrency.sync import concurrency

    run_logger(__name__).info("waiting for %d slot(s) of the %r concurrency limit", gpus, GPU_LIMIT)
    # strict: a missing limit is an error (run `distillery deploy`), not an unlimited free-for-all
    with concurrency(GPU_LIMIT, occupy=gpus, strict=True):
        yield gpus


@flow(name="synthesize-recipe", log_prints=True)
def synthesize_recipe(recipe_path: str, store: str = "store", overrides: list[str] | None = None) -> str:
    """Run a recipe file (with ``key=value`` overrides, as `distillery run --set`) and publish a version.

    Relative paths (the recipe, a local store) resolve against the project directory, which the
    deployment's pull step makes the working directory.
    """
    from flows.synthesize import synthesize
    from schemas.recipe import load_recipe

    recipe = load_recipe(recipe_path, list(overrides or []))
    with gpu_slots(recipe.engine):
        return synthesize(recipe, store=store)


@flow(name="curate-dataset", log_prints=True)
def curate_dataset(
    input_uri: str, name: str, store: str = "store", recipe_path: str | None = None, overrides: list[str] | None = None
) -> str:
    """Curate a JSONL/Parquet file or a published version (as `distillery curate`) into data set ``name``."""
    from flows.curate import curate
    from schemas.recipe import CurateRecipe, load_recipe

    recipe = load_recipe(recipe_path, [f"name={name}", *(overrides or [])], model=CurateRecipe)
    return curate(recipe, input_uri=input_uri, store=store)
