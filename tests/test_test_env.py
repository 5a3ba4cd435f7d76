"""Plain ``pytest`` runs the tests with the same settings as ``make test`` (issue: a first
end-to-end test failed under ``python -m pytest`` because Prefect's start-up timeout lived only
in the Makefile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DUMP = "DISTILLERY_DUMP_TEST_SETTINGS"
# What a user's shell has: nothing of Prefect's, Hugging Face's or ours.
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_", "TRANSFORMERS_", "DISTILLERY_", "MAKE", "MFLAGS"))}


def _settings() -> dict:
    from prefect.settings import get_current_settings

    s = get_current_settings()
    return {
        "ephemeral_startup_timeout_s": s.server.ephemeral.startup_timeout_seconds,
        "prefect_home": str(Path(s.home).resolve()),
        "logging_level": s.logging.level,
        "analytics": s.server.analytics_enabled,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "transformers_offline": os.environ.get("TRANSFORMERS_OFFLINE"),
    }


@pytest.mark.skipif(DUMP not in os.environ, reason="prints this run's settings for the test below")
def test_dump_settings():
    Path(os.environ[DUMP]).write_text(json.dumps(_settings()))


def _dumped(cmd: list[str], out: Path) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env={**CLEAN, DUMP: str(out)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_plain_pytest_sees_the_settings_of_make_test(tmp_path):
    test = "tests/test_test_env.py::test_dump_settings"
    plain = _dumped([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], tmp_path / "plain.json")
    # -o model: the environment is there already (the test must not reinstall it)
    make = _dumped(["make", "-s", "-o", "model", "test", f"PY={sys.executable}", f"PYTEST_ARGS=-q -p no:cacheprovider {test}"], tmp_path / "make.json")
    assert plain == make
    # ...and they are the ones the tests need: a start-up timeout a busy 2-core machine meets,
    # no model hub, a Prefect home that exists
    assert plain["ephemeral_startup_timeout_s"] >= 120
    assert plain["hf_hub_offline"] == "1" and plain["transformers_offline"] == "1"
    assert Path(plain["prefect_home"]).is_dir()


def test_this_session_has_them_too():
    s = _settings()
    assert s["ephemeral_startup_timeout_s"] >= 120 and s["hf_hub_offline"] == "1"


def test_a_wait_for_output_stops_when_the_process_exits():
    import threading
    import time

    from tests.procs import wait_for_event_or_exit

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('boom: no engine')"], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "shard 0" in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)no shard finished: the process exited \(1\) first:.*boom: no engine"):
        wait_for_event_or_exit(proc, seen, 600, "no shard finished", lambda: "".join(lines))
    assert time.monotonic() - started < 30  # not the 600 s it would wait for a live process
