"""A generator that answers from a script: the fast tier's stand-in for the vLLM engines.

``ScriptedGenerator`` has the engine pool's interface (``generate(shard_index, requests,
sampling)`` -> one result dict per request, in order: ``completion``, ``finish_reason``,
``num_tokens``, ``prompt_tokens``, ``error``, ``prompt``; ``shutdown()``; ``started_in``,
``actor_failures``), so the real ``synthesize`` flow runs in-process with it in place of
``EnginePool`` (the seam: ``flows.synthesize.ENGINE_POOL_FACTORY``, set by ``install``). Everything
the flow does around generation is the real code: the generation cache wraps it, the strategies
build their requests and parse the answers, verify runs on Ray, then scoring, curation, selection,
pairs, publish and lineage.

The script: answers planted for a request (by its messages, response prefix and sampling seed,
optionally also its sampling settings: what makes a real request distinct), else by the user
message's text, else rules (callables ``(request, sampling) -> str | dict | None``, the first that
answers wins), else the default (a string, or a callable ``(request, sampling) -> str | dict``).
An answer is a completion, or a dict over the result's fields (``finish_reason``, ``error``...).

It counts what reached "the engine": ``calls`` (shard index, number of requests, sampling per
``generate``), ``requests`` (every request, in order), ``sources`` (per request: "planted",
"content", "rule" or "default"), and ``unused()`` (planted answers nobody asked for: a test
that plants must ask for them, or its requests are not the flow's).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

from distillery.engine import SamplingSettings

Answer = str | dict[str, Any]
Rule = Callable[[dict[str, Any], SamplingSettings], Answer | None]

DEFAULT_ANSWER = "I am not sure. The answer is 0"


_WORDS = (
    "first second then next finally so thus here we note count add take away share split each every group part "
    "whole half double triple total sum difference product quotient left over more fewer equal step check again carefully "
    "clearly simply quickly slowly apples pencils coins boxes bags rows pages marbles stickers cards books"
).split()


def distinct_text(key: str, answer: str, words: int = 12) -> str:
    """A completion ending in "The answer is ``answer``" whose words are drawn from ``key`` (a
    seeded hash): completions with different keys share no run of words, so curation's
    near-duplicate check keeps them all unless a test means it to drop one."""
    digest = hashlib.sha256(key.encode()).digest()
    return " ".join(_WORDS[b % len(_WORDS)] for b in digest[:words]).capitalize() + f". The answer is {answer}"


def _prompt_key(request: dict[str, Any]) -> str:
    return json.dumps([request["messages"], request.get("response_prefix", "")], sort_keys=True)


def _sampling_key(sampling: SamplingSettings) -> tuple:
    return (float(sampling.temperature), float(sampling.top_p), int(sampling.max_tokens))


def user_text(request: dict[str, Any]) -> str:
    """The last user message's content (what a template rendered)."""
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "user")


class ScriptedGenerator:
    def __init__(
        self, default: Answer | Rule = DEFAULT_ANSWER, *, rules: list[Rule] | None = None, model_dir: str | None = None, record: bool = True
    ) -> None:
        self.default = default
        self.record = record  # False: keep no per-request record (benchmarks of a million requests)
        self.rules: list[Rule] = list(rules or [])
        self.model_dir = model_dir  # set by ``install``: results carry the prompt rendered as the engine renders it
        self.planted: dict[tuple, Answer] = {}
        self.by_content: dict[str, Answer] = {}
        self.asked: set[tuple] = set()
        self.calls: list[tuple[int, int, SamplingSettings]] = []
        self.requests: list[dict[str, Any]] = []
        self.sources: list[str] = []
        self.started_in: float | None = None  # as an engine pool whose engines never started
        self.actor_failures = 0
        self.shut_down = 0
        self._lock = threading.Lock()  # the flow's shards run in threads

    # -- the script ---------------------------------------------------------------------------
    def plant(self, request: dict[str, Any], answer: Answer, sampling: SamplingSettings | None = None) -> None:
        """``answer`` for this request (its messages, response prefix and sampling seed; with
        ``sampling``, only under those sampling settings)."""
        key = (_prompt_key(request), int(request["sampling_seed"]), _sampling_key(sampling) if sampling else None)
        self.planted[key] = answer

    def on_content(self, text: str, answer: Answer) -> None:
        """``answer`` for every request whose user message is ``text`` (any seed, any sampling)."""
        self.by_content[text] = answer

    def rule(self, fn: Rule) -> Rule:
        """Add a rule (usable as a decorator)."""
        self.rules.append(fn)
        return fn

    def unused(self) -> list[tuple]:
        return [k for k in self.planted if k not in self.asked]

    # -- the seam -------------------------------------------------------------------------------
    def install(self, monkeypatch) -> ScriptedGenerator:
        """Make ``flows.synthesize`` use this generator instead of starting vLLM engines on Ray."""
        import flows.synthesize

        def factory(model_path: str, engine, seed: int = 0) -> ScriptedGenerator:
            self.model_dir = model_path
            return self

        monkeypatch.setattr(flows.synthesize, "ENGINE_POOL_FACTORY", factory)
        return self

    # -- the engine pool's interface --------------------------------------------------------------
    def _answer(self, request: dict[str, Any], sampling: SamplingSettings) -> tuple[Answer, str]:
        prompt, seed = _prompt_key(request), int(request["sampling_seed"])
        for key in ((prompt, seed, _sampling_key(sampling)), (prompt, seed, None)):
            if key in self.planted:
                with self._lock:
                    self.asked.add(key)
                return self.planted[key], "planted"
        text = user_text(request)
        if text in self.by_content:
            return self.by_content[text], "content"
        for rule in self.rules:
            answer = rule(request, sampling)
            if answer is not None:
                return answer, "rule"
        return (self.default(request, sampling) if callable(self.default) else self.default), "default"

    def _render(self, request: dict[str, Any]) -> str:
        if self.model_dir:
            from distillery.generation_cache import render

            return render(self.model_dir, request["messages"]) + request.get("response_prefix", "")
        return user_text(request) + request.get("response_prefix", "")

    def generate(self, shard_index: int, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        if not requests:
            return []
        results, sources = [], []
        for request in requests:
            answer, source = self._answer(request, sampling)
            fields = answer if isinstance(answer, dict) else {"completion": answer}
            prompt = self._render(request)
            result = {"completion": None, "finish_reason": "stop", "num_tokens": 0, "prompt_tokens": len(prompt.split()), "error": None, "prompt": prompt}
            result.update(fields)
            if result["error"] is not None:
                result.update(completion=None, finish_reason="error", num_tokens=0)
            elif "num_tokens" not in fields:
                result["num_tokens"] = len((result["completion"] or "").split())
            results.append(result)
            sources.append(source)
        if not self.record:
            return results
        with self._lock:
            self.calls.append((shard_index, len(requests), sampling))
            self.requests.extend(requests)
            self.sources.extend(sources)
        return results

    def shutdown(self) -> None:
        self.shut_down += 1
