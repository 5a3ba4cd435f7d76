"""The helpers every flow and stage shares for its run: the run logger and the run id."""

import logging

import distillery
from distillery.logs import run_logger


def test_outside_a_run_the_logger_is_the_module_logger():
    assert run_logger("distillery.engine") is logging.getLogger("distillery.engine")


def test_outside_a_flow_run_the_run_id_is_local():
    run_id = distillery.run_id()
    assert run_id.startswith("local-") and run_id[len("local-") :].isdigit()
