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
