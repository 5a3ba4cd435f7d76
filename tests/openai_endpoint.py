"""A real HTTP server on 127.0.0.1 that answers like an OpenAI-compatible chat endpoint, from a
script: per question (the last user message) a list of replies ``(status, headers, body)`` that
are sent first, in turn (failures: 429, 5xx, bad bodies), then 200s whose text is
``answer(body)`` (default: "echo QUESTION"). Every request body it saw is in ``seen``.
Used by tests/test_served.py (HTTP behaviour) and tests/flows/test_served_strategies.py (flows)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def question_of(body: dict[str, Any]) -> str:
    """The last user message of a chat request (a response prefix is an assistant message after it)."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


class Endpoint(ThreadingHTTPServer):
    # socketserver's default backlog is 5: more connections at once than that (the client opens
    # up to model.max_concurrency) could be refused, which with max_retries=0 is a failed request
    request_queue_size = 256
    daemon_threads = True

    def __init__(self, script: dict[str, list[tuple[int, dict, str]]] | None = None, answer: Callable[[dict[str, Any]], str] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.seen, self.lock = script or {}, [], threading.Lock()
        self.answer = answer or (lambda body: f"echo {question_of(body)}")
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
        with self.server.lock:
            self.server.seen.append({"body": body, "auth": self.headers.get("Authorization")})
            replies = self.server.script.get(question_of(body), [])
            reply = replies.pop(0) if replies else None
        if reply is not None:
            self._send(*reply)
            return
        text = self.server.answer(body)
        answer = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
        self._send(200, {"Content-Type": "application/json"}, json.dumps(answer))
