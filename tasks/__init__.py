"""Prefect tasks: thin wrappers around the stage functions in ``distillery.stages``.

Each task module wraps one stage in a few lines (retries, names, logging); the logic and its
tests live with the stage. Flows in ``flows/`` compose these tasks.
"""
