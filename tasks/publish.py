"""Prefect tasks for the publish stage: parts, rejects, plots, card, then the manifest last."""

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from distillery.stages.publish import Published, publish_parts, publish_reward_model


def _artifact(key: str, markdown: str, description: str) -> None:
    if TaskRunContext.get() is not None:  # called as a plain function (tests): no Prefect API
        create_markdown_artifact(key=re.sub(r"[^a-z0-9-]", "-", key), markdown=markdown, description=description)


@task(name="publish", cache_policy=NO_CACHE)
def publish(store, dataset, data, rejects, **kwargs) -> Published:
    """A version of ``data`` (``publish.PartWriter`` parts, closed) and its ``rejects``."""
    published = publish_parts(store, dataset, data, rejects, **kwargs)
    counts = published.manifest["counts"]
    _artifact(
        "published-" + dataset,
        f"Published [{published.uri}]({published.uri}): {counts['published']} rows of {counts['input']} input rows.",
        f"{dataset} {published.manifest['version']}",
    )
    return published


@task(name="publish-reward-model", cache_policy=NO_CACHE)
def publish_reward(store, name, weight, examples, rejects, **kwargs) -> Published:
    published = publish_reward_model(store, name, weight, examples, rejects, **kwargs)
    metrics = published.manifest["metrics"]
    _artifact(
        "reward-model-" + name,
        f"Reward model [{published.uri}]({published.uri}): {metrics['n']} examples, "
        f"ROC AUC train {metrics['auc_train']}, held-out {metrics['auc_heldout']}.",
        f"{name} {published.manifest['version']}",
    )
    return published
