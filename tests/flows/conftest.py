"""Fixtures of the fast tier: the real ``synthesize`` flow in-process, with a scripted generator
in place of the vLLM engines (tests/scripted.py), embedded Prefect and a local Ray cluster (for
verify), each started once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def in_process_prefect(tmp_path_factory):
    """Embedded Prefect (the ephemeral server, started by the first flow run) with its database
    under a temporary PREFECT_HOME, as the CLI tests give each run one; stopped at the end."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = tmp_path_factory.mktemp("prefect")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield home
        APILogWorker.drain_all(timeout=10)  # the flow logs reach the server before it stops
        SubprocessASGIServer().stop()  # now, not at exit (when pytest has closed the output it logs to)


@pytest.fixture(scope="session")
def session_ray():
    """A local Ray cluster for the flow's verify tasks (the flow's own ``start_ray`` then finds
    it running); conftest's ``pytest_sessionfinish`` stops it."""
    from distillery.engine import start_ray

    start_ray()


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded model's folder; without it (``make model``) the test is skipped, saying so."""
    from distillery.model_setup import ModelNotFound, resolve_model_path

    try:
        return resolve_model_path("embedded")
    except ModelNotFound as err:
        pytest.skip(str(err))


@pytest.fixture
def scripted(embedded_model, in_process_prefect, session_ray, monkeypatch):
    """A ``ScriptedGenerator`` installed in ``flows.synthesize`` for this test (the cwd is the
    checkout, as for the CLI, so a recipe's relative paths resolve). The flow still reads the
    embedded model's folder: its config for the dtype, its tokenizer for the prompts the cache
    keys, its identity for lineage."""
    from tests.scripted import ScriptedGenerator

    monkeypatch.chdir(ROOT)
    return ScriptedGenerator().install(monkeypatch)
