"""Prefect tasks for reward-model training (``distillery.stages.reward_training``)."""

import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from distillery.stages import reward_training


@task(name="select-examples", cache_policy=NO_CACHE)
def select_examples(rows):
    """Labeled samples of the problems with both correct and incorrect samples; the rest are rejects."""
    return reward_training.training_examples(rows)


@task(name="last-token-features", cache_policy=NO_CACHE)
def last_token_features(model_dir, prompts, completions, batch_size, dtype="float32"):
    """The frozen body's last-token features (transformers on CPU, in ``dtype``); logs progress
    about every 30 seconds."""
    logger = get_run_logger()
    started, last_log = time.perf_counter(), [time.perf_counter()]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last_log[0] >= 30 and done < total:
            last_log[0] = now
            rate = done / (now - started)
            logger.info("features: %d of %d chats (%.1f/s, about %.0fs left)", done, total, rate, (total - done) / rate)

    return reward_training.last_token_features(model_dir, prompts, completions, batch_size, progress=progress, dtype=dtype)


@task(name="fit-head", cache_policy=NO_CACHE)
def fit_head(features, labels, l2, seed):
    """The score head: class-balanced logistic regression without bias."""
    return reward_training.fit_head(features, labels, l2=l2, seed=seed)
