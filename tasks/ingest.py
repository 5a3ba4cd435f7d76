"""Prefect task for the ingest stage (``distillery.stages.ingest``)."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.ingest import ingest_seeds
from schemas.recipe import SeedsConfig


@task(name="ingest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest(cfg: SeedsConfig) -> StageResult:
    """Read and contract-check the seeds; bad rows become rejects, never errors."""
    return ingest_seeds(cfg)
