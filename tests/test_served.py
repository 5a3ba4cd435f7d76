"""The served-model backend's HTTP behaviour, against a real HTTP server on 127.0.0.1 that answers
the way endpoints fail: 429 with ``Retry-After``, 5xx, a 4xx that must not be retried, a body
that is not a chat completion, a connection refused. The waits are recorded, not slept.
(tests/flows/test_served_backend.py runs the whole pipeline against a real ``vllm serve``.)"""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillery.engine import SamplingSettings
from distillery.served import MissingKey, ServedModel, backoff, render_request, retry_after
from schemas.recipe import ModelConfig

SAMPLING = SamplingSettings(temperature=0.5, top_p=0.9, max_tokens=20)


class Endpoint(ThreadingHTTPServer):
    """Answers each POST with the next scripted reply for its question (then 200s)."""

    def __init__(self, script: dict[str, list[tuple[int, dict, str]]]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.seen, self.lock = script, [], threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, headers: dict, body: str) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self):
        self._send(200, {"Content-Type": "application/json"}, json.dumps({"data": [{"id": "m", "root": "/models/m", "owned_by": "vllm"}]}))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][-1]["content"] if body["messages"][-1]["role"] == "user" else body["messages"][-2]["content"]
        with self.server.lock:
            self.server.seen.append({"body": body, "auth": self.headers.get("Authorization")})
            replies = self.server.script.get(question, [])
            reply = replies.pop(0) if replies else None
        if reply is not None:
            self._send(*reply)
            return
        answer = {"choices": [{"message": {"content": f"echo {question}"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
        self._send(200, {"Content-Type": "application/json"}, json.dumps(answer))


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
