"""Prefect task for the verify stage: one shard of samples, checked on a Ray worker."""

import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery.accounting import StageResult
from distillery.stages.verify import verify_samples
from schemas.recipe import VerifyConfig

# SPREAD: on a cluster, the shards go to every node's spare CPUs (the engines' placement group
# holds theirs) instead of piling onto the driver's node first; on one node it changes nothing.
_verify_remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(verify_samples)


@task(name="verify-shard", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE, task_run_name="verify-shard-{shard_index}")
def verify_shard(shard_index: int, generated: StageResult, cfg: VerifyConfig) -> StageResult:
    """Verify the samples one synthesize shard passed on (``generated.kept``)."""
    return ray.get(_verify_remote.remote(generated.kept, cfg))
