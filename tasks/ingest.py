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


@task(name="ingest-existing", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def ingest_existing(uri: str, text_column: str, id_column: str | None, fmt: str) -> StageResult:
    """Read a data set to curate (file or published version); bad rows become rejects."""
    from distillery.stages.ingest import ingest_rows

    return ingest_rows(uri, text_column=text_column, id_column=id_column, fmt=fmt)
