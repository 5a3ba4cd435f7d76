"""Prefect tasks for the dedup stage (``distillery.stages.dedup``): MinHash signatures fan out
over shards on Ray workers; duplicates are found over the spilled hash buckets of every shard."""

import numpy as np
import polars as pl
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery import minhash
from distillery.accounting import StageCount
from distillery.engine import start_ray
from distillery.faults import failpoint
from distillery.stages.dedup import EarlierRows, ShardedDedup, load_earlier
from schemas.recipe import DedupConfig

# SPREAD: signature shards use every node of a cluster rather than filling the driver's node first
_signatures_remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(minhash.signatures)


def ray_signatures(cfg: DedupConfig):
    """A signature function that computes the texts in Ray tasks of ``cfg.signature_task_rows``
    rows, or in this process when they fit in one task. Ray starts on first use
    (``distillery.engine.start_ray``): a curate of small inputs starts no cluster."""

    def compute(texts: pl.Series) -> np.ndarray:
        rows = cfg.signature_task_rows
        if len(texts) <= rows:
            return minhash.signatures(texts, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed)
        start_ray()
        parts = [
            _signatures_remote.remote(texts.slice(start, rows), num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed)
            for start in range(0, len(texts), rows)
        ]
        return np.vstack(ray.get(parts))

    return compute


@task(name="dedup-load-against", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_against(cfg: DedupConfig) -> list[EarlierRows]:
    """The signatures of the ``dedup.against`` versions (held in memory for the run)."""
    return [load_earlier(uri, cfg) for uri in cfg.against]


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(spilled: ShardedDedup) -> StageCount:
    """Find the exact and near duplicates among the spilled shards (pass it in ``quote``)."""
    count = spilled.resolve()
    failpoint("dedup")  # chaos tests: crash in the middle of curation
    return count
