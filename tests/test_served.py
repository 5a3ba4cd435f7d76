"""The served-model backend's HTTP behaviour, against a real HTTP server on 127.0.0.1 that answers
the way endpoints fail: 429 with ``Retry-After``, 5xx, a 4xx that must not be retried, a body
that is not a chat completion, a connection refused. The waits are recorded, not slept.
(tests/flows/test_served_backend.py runs the whole pipeline against a real ``vllm serve``.)"""

import socket

import pytest

from distillery.engine import SamplingSettings
from distillery.served import MissingKey, ServedModel, backoff, render_request, retry_after
from schemas.recipe import ModelConfig, StructuredOutput
from tests.openai_endpoint import Endpoint

SAMPLING = SamplingSettings(temperature=0.5, top_p=0.9, max_tokens=20)


def _model(url: str, **kw) -> ModelConfig:
    return ModelConfig(backend="openai", base_url=url, name="m", **kw)


def _req(text: str, seed: int = 1, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "sampling_seed": seed, **kw}


def test_retries_honour_retry_after_and_back_off_on_5xx():
    server = Endpoint({
        "busy": [(429, {"Retry-After": "2"}, "slow down"), (429, {"Retry-After": "0.5"}, "slow down")],
        "flaky": [(503, {}, "overloaded"), (502, {}, "bad gateway")],
    })
    waits: list[float] = []
    served = ServedModel(_model(server.url, max_retries=3), sleep=waits.append)
    try:
        got = served.generate(0, [_req("busy"), _req("flaky")], SAMPLING)
    finally:
        served.shutdown()
        server.shutdown()
    assert [r["completion"] for r in got] == ["echo busy", "echo flaky"]
    assert all(r["error"] is None and r["num_tokens"] == 3 and r["prompt_tokens"] == 7 for r in got)  # usage recorded
    assert 2.0 in waits and 0.5 in waits  # exactly what Retry-After asked
    others = sorted(w for w in waits if w not in (2.0, 0.5))
    assert len(others) == 2 and 0.375 <= others[0] <= 0.625 and 0.75 <= others[1] <= 1.25  # 0.5 s, then 1 s, +-25%
    assert served.progress()["retries"] == 4 and served.progress()["errors"] == 0
    body = server.seen[0]["body"]
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == ("m", 0.5, 0.9, 20, 1)


def test_what_will_not_get_better_is_an_error_result_not_a_failed_run():
    server = Endpoint({
        "bad": [(400, {}, "max_tokens is too large")],
        "down": [(500, {}, "boom")] * 5,
        "garbage": [(200, {"Content-Type": "application/json"}, '{"not": "a completion"}')],
    })
    waits: list[float] = []
    served = ServedModel(_model(server.url, max_retries=2), sleep=waits.append)
    try:
        got = served.generate(0, [_req("bad"), _req("down"), _req("garbage"), _req("fine")], SAMPLING)
    finally:
        served.shutdown()
        server.shutdown()
    bad, down, garbage, fine = got
    assert bad["completion"] is None and "1 attempt(s)" in bad["error"] and "HTTP 400: max_tokens is too large" in bad["error"]
    assert "3 attempt(s)" in down["error"] and "HTTP 500: boom" in down["error"]  # 1 + max_retries
    assert "not a chat completion" in garbage["error"]
    assert fine["completion"] == "echo fine"
    assert len(waits) == 2  # only the 500s were retried
    assert served.progress()["errors"] == 3


def test_a_refused_connection_is_retried_then_an_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    served = ServedModel(_model(f"http://127.0.0.1:{port}/v1", max_retries=2), sleep=waits.append)
    (got,) = served.generate(0, [_req("anyone?")], SAMPLING)
    served.shutdown()
    assert got["finish_reason"] == "error" and "ConnectError" in got["error"] and len(waits) == 2


def test_the_key_comes_from_the_named_variable_and_a_prefix_continues_the_assistant(monkeypatch):
    server = Endpoint({})
    monkeypatch.setenv("MY_ENDPOINT_KEY", "sk-test-123")
    served = ServedModel(_model(server.url, api_key_env="MY_ENDPOINT_KEY"))
    try:
        served.generate(3, [_req("judge this", response_prefix="Score:")], SAMPLING)
        identity = served.identity()
    finally:
        served.shutdown()
        server.shutdown()
    seen = server.seen[0]
    assert seen["auth"] == "Bearer sk-test-123"
    assert seen["body"]["messages"][-1] == {"role": "assistant", "content": "Score:"} and seen["body"]["continue_final_message"] is True
    assert identity == {"name": "m", "endpoint": server.url, "id": "m", "root": "/models/m", "owned_by": "vllm"}
    monkeypatch.delenv("MY_ENDPOINT_KEY")
    with pytest.raises(MissingKey, match="MY_ENDPOINT_KEY is not set"):
        ServedModel(_model(server.url, api_key_env="MY_ENDPOINT_KEY"))


def test_helpers():
    assert retry_after("3") == 3.0 and retry_after("9999") == 120.0 and retry_after("soon") is None and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert all(0.375 <= backoff(1) <= 0.625 for _ in range(20)) and backoff(20) <= 37.5
    a = render_request(_req("q"))
    assert a == render_request(_req("q", seed=9)) and a != render_request(_req("q", response_prefix="Score:"))  # the seed is keyed apart


def test_structured_output_goes_as_response_format_or_structured_outputs():
    server = Endpoint({})
    served = ServedModel(_model(server.url))
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    try:
        for constraint in ({"json_schema": schema}, {"regex": "Score: (10|[1-9])"}, {"choice": ["yes", "no"]}, None):
            spec = StructuredOutput(**constraint).spec() if constraint else None
            served.generate(0, [_req("constrained?")], SamplingSettings(0.5, 0.9, 20, spec))
    finally:
        served.shutdown()
        server.shutdown()
    bodies = [seen["body"] for seen in server.seen]
    assert bodies[0]["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert "structured_outputs" not in bodies[0]
    assert bodies[1]["structured_outputs"] == {"regex": "Score: (10|[1-9])"} and "response_format" not in bodies[1]
    assert bodies[2]["structured_outputs"] == {"choice": ["yes", "no"]}
    assert "response_format" not in bodies[3] and "structured_outputs" not in bodies[3]
