"""Prefect task for the publish stage: shards, rejects, card, then the manifest last."""

import re

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from distillery.stages.publish import Published, publish_version


@task(name="publish", cache_policy=NO_CACHE)
def publish(store, dataset, rows, rejects, **kwargs) -> Published:
    published = publish_version(store, dataset, rows, rejects, **kwargs)
    counts = published.manifest["counts"]
    create_markdown_artifact(
        key="published-" + re.sub(r"[^a-z0-9-]", "-", dataset),
        markdown=f"Published [{published.uri}]({published.uri}): {counts['published']} rows of {counts['input']} input rows.",
        description=f"{dataset} {published.manifest['version']}",
    )
    return published


@task(name="publish-reward-model", cache_policy=NO_CACHE)
def publish_reward(store, name, weight, examples, rejects, **kwargs) -> Published:
    from distillery.stages.publish import publish_reward_model

    published = publish_reward_model(store, name, weight, examples, rejects, **kwargs)
    metrics = published.manifest["metrics"]
    create_markdown_artifact(
        key="reward-model-" + re.sub(r"[^a-z0-9-]", "-", name),
        markdown=(
            f"Reward model [{published.uri}]({published.uri}): {metrics['n']} examples, "
            f"ROC AUC train {metrics['auc_train']}, held-out {metrics['auc_heldout']}."
        ),
        description=f"{name} {published.manifest['version']}",
    )
    return published


@task(name="publish", cache_policy=NO_CACHE)
def publish_shards(store, dataset, data, rejects, **kwargs) -> Published:
    """``publish`` for a table already written as local Parquet parts (sharded curation)."""
    from distillery.stages.publish import publish_parts

    from prefect.context import TaskRunContext

    published = publish_parts(store, dataset, data, rejects, **kwargs)
    counts = published.manifest["counts"]
    if TaskRunContext.get() is None:  # called as a plain function (tests): no Prefect API
        return published
    create_markdown_artifact(
        key="published-" + re.sub(r"[^a-z0-9-]", "-", dataset),
        markdown=f"Published [{published.uri}]({published.uri}): {counts['published']} rows of {counts['input']} input rows.",
        description=f"{dataset} {published.manifest['version']}",
    )
    return published
