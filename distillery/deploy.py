"""``distillery deploy``: register the deployments of ``infra/prefect.yaml`` with a Prefect server.

Before ``prefect deploy`` runs, the work pool the file names (a ``process`` pool) and the ``gpu``
global concurrency limit (one slot per GPU) are created when missing, so the command works on
a fresh server. The deployments themselves are registered by Prefect's own
``prefect deploy --prefect-file infra/prefect.yaml`` (run from the project directory, without
prompts), so the YAML means exactly what Prefect's documentation says.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_FILE = PROJECT_DIR / "infra" / "prefect.yaml"
DEFAULT_POOL = "distillery"


class DeployError(RuntimeError):
    """Deployment cannot proceed; the message says why."""


def detect_gpus() -> int:
    """GPUs on this machine, by ``nvidia-smi -L`` (0 when there is none or no driver)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def ensure_work_pool(name: str) -> bool:
    """Create the ``process`` work pool ``name`` if it does not exist. True if it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            return True
        if pool.type != "process":
            msg = f"work pool {name!r} exists with type {pool.type!r}; the deployments need a 'process' pool (choose another --pool)"
            raise DeployError(msg)
        return False


def ensure_gpu_limit(slots: int | None, name: str = "gpu") -> tuple[int, bool]:
    """Create the global concurrency limit ``name`` with ``slots`` (default: this machine's GPUs)
    if it is missing; with an explicit ``slots``, set an existing one to it. Returns (slots, changed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            wanted = detect_gpus() if slots is None else slots
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=wanted))
            return wanted, True
        if slots is not None and limit.limit != slots:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots))
            return slots, True
        return limit.limit, False


def deploy(
    prefect_file: Path = DEFAULT_FILE,
    names: list[str] | None = None,
    *,
    pool: str = DEFAULT_POOL,
    store: str = "store",
    gpus: int | None = None,
    project_dir: Path = PROJECT_DIR,
    log=print,
) -> None:
    """Create the pool and the ``gpu`` limit, then ``prefect deploy`` the file's deployments."""
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        msg = "PREFECT_API_URL is not set: point it at a running `prefect server` (e.g. http://127.0.0.1:4200/api)"
        raise DeployError(msg)
    prefect_file = Path(prefect_file).resolve()
    if not prefect_file.is_file():
        raise DeployError(f"--file: {prefect_file} not found")
    if "://" not in store:  # a local store: absolute, so runs write where the deployer meant
        store = str((Path.cwd() / store).resolve())

    created = ensure_work_pool(pool)
    log(f"work pool {pool!r} (process): {'created' if created else 'exists'}")
    slots, changed = ensure_gpu_limit(gpus)
    log(f"global concurrency limit 'gpu': {slots} slot(s){' (set)' if changed else ''}")

    cmd = [sys.executable, "-m", "prefect", "deploy", "--prefect-file", str(prefect_file)]
    if names:
        for name in names:
            cmd += ["--name", name]
    else:
        cmd.append("--all")
    env = {**os.environ, "DISTILLERY_WORK_POOL": pool, "DISTILLERY_STORE": store, "PREFECT_CLI_PROMPT": "false"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    out = subprocess.run(cmd, cwd=project_dir, env=env, check=False)
    if out.returncode != 0:
        raise DeployError(f"`prefect deploy` failed (exit {out.returncode}); its output is above")
