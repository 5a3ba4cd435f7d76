"""Prefect task for the dedup stage: MinHash signatures fan out over shards on Ray workers;
buckets and clusters run on the combined signatures (``distillery.stages.dedup``)."""

import numpy as np
import polars as pl
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from distillery import minhash
from distillery.accounting import StageResult
from distillery.stages.dedup import dedup_samples, load_earlier
from schemas.recipe import DedupConfig

_signatures_remote = ray.remote(num_cpus=1)(minhash.signatures)


def ray_signatures(cfg: DedupConfig, shard_rows: int = 50_000):
    """A signature function that computes each shard of texts on a Ray worker."""

    def compute(texts: pl.Series) -> np.ndarray:
        if not ray.is_initialized() or len(texts) <= shard_rows:
            return minhash.signatures(texts, num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed)
        parts = [
            _signatures_remote.remote(texts.slice(start, shard_rows), num_perm=cfg.num_perm, ngram=cfg.ngram, seed=cfg.seed)
            for start in range(0, len(texts), shard_rows)
        ]
        return np.vstack(ray.get(parts))

    return compute


@task(name="dedup", cache_policy=NO_CACHE)
def dedup(samples: pl.DataFrame, cfg: DedupConfig, text_column: str = "completion") -> StageResult:
    earlier = [load_earlier(uri, cfg) for uri in cfg.against]
    return dedup_samples(samples, cfg, text_column=text_column, earlier=earlier, signature_fn=ray_signatures(cfg))
