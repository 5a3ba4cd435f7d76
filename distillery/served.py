"""A served model as the generation backend: an OpenAI-compatible endpoint (``vllm serve``,
SGLang, TGI, a hosted API) in place of the run's own vLLM engines (``model.backend: openai``).

``ServedModel`` has the engine pool's interface (``generate(shard_index, requests, sampling)``,
``capacity()``, ``progress()``, ``shutdown()``), so the strategies, the judge, the sampler and the
generation cache use it unchanged. Each request is one ``POST {base_url}/chat/completions``:

- at most ``model.max_concurrency`` requests in flight over all shards (one semaphore);
- ``model.timeout_s`` per attempt; retries (``model.max_retries``) on 429, 5xx, a timeout or a
  refused connection, with exponential backoff (0.5 s doubling, at most 30 s, with jitter), or
  exactly what a ``Retry-After`` header asks (seconds or an HTTP date, at most 120 s);
- a request that still fails (or gets a 4xx other than 429) becomes an error result, so a
  ``generation_error`` reject with the status and the server's message, not a failed run;
- the key, if any, comes from the environment variable ``model.api_key_env`` names (sent as
  ``Authorization: Bearer``), never from the recipe, and is never logged or recorded;
- token usage (``usage.prompt_tokens``/``completion_tokens``) is each result's token counts.

A request's ``response_prefix`` (the judge's "Score:") is sent as the start of the assistant's
turn with vLLM's ``continue_final_message`` (other servers may ignore it and answer afresh).
The generation cache keys a served model by its name and endpoint (a password in the URL masked);
``identity()`` adds what ``GET /models`` reports (id, root, owner) for the manifest's lineage.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from distillery.engine import SamplingSettings, error_result
from distillery.logs import run_logger
from distillery.uri_io import redact_uri
from schemas.recipe import ModelConfig

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 120.0


class MissingKey(ValueError):
    """``model.api_key_env`` names an environment variable that is not set."""


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def backoff(attempt: int) -> float:
    """The wait before retry ``attempt`` (1, 2, ...): 0.5 s doubling, at most 30 s, +-25% jitter."""
    return min(MAX_BACKOFF_S, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25)  # noqa: S311 (jitter, not crypto)


def api_key(cfg: ModelConfig) -> str | None:
    if not cfg.api_key_env:
        return None
    key = os.environ.get(cfg.api_key_env)
    if not key:
        msg = f"model.api_key_env: the environment variable {cfg.api_key_env} is not set (it should hold the endpoint's API key)"
        raise MissingKey(msg)
    return key


class ServedModel:
    def __init__(self, cfg: ModelConfig, seed: int = 0, *, sleep=time.sleep) -> None:
        import httpx

        self.cfg, self.seed, self._sleep = cfg, seed, sleep
        self.base_url = cfg.base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        key = api_key(cfg)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(timeout=cfg.timeout_s, headers=headers, limits=httpx.Limits(max_connections=cfg.max_concurrency))
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._lock = threading.Lock()
        self.counts = {"submitted": 0, "done": 0, "tokens": 0, "prompt_tokens": 0, "retries": 0, "errors": 0}
        self.started_in: float | None = None  # nothing to start: the interface of the engine pool
        self.actor_failures = 0

    # -- the engine pool's interface ------------------------------------------------------------
    def capacity(self) -> int:
        return self.cfg.max_concurrency

    def progress(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def shutdown(self) -> None:
        self._client.close()

    def generate(self, shard_index: int, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        if not requests:
            return []
        with self._lock:
            self.counts["submitted"] += len(requests)
        with ThreadPoolExecutor(min(len(requests), self.cfg.max_concurrency), thread_name_prefix=f"served-{shard_index}") as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    # -- one request ----------------------------------------------------------------------------
    def body(self, request: dict[str, Any], sampling: SamplingSettings) -> dict[str, Any]:
        messages = list(request["messages"])
        body: dict[str, Any] = {
            "model": self.cfg.name,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": int(request["sampling_seed"]),
            "n": 1,
        }
        if request.get("response_prefix"):
            body["messages"] = [*messages, {"role": "assistant", "content": request["response_prefix"]}]
            body["continue_final_message"] = True  # vLLM: go on from the prefix, in the assistant's turn
            body["add_generation_prompt"] = False
        if sampling.structured is not None:
            body.update(structured_body(sampling.structured))
        return body

    def _one(self, request: dict[str, Any], sampling: SamplingSettings) -> dict[str, Any]:
        import httpx

        body = self.body(request, sampling)
        prompt = render_request(request)
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                with self._lock:
                    self.counts["retries"] += 1
            wait = None
            with self._slots:
                try:
                    response = self._client.post(f"{self.base_url}/chat/completions", content=json.dumps(body))
                except (httpx.TimeoutException, httpx.TransportError) as err:  # refused, reset, timed out
                    last = f"{type(err).__name__}: {err or 'no answer'}"
                else:
                    if response.status_code == 200:
                        return self._result(response, prompt)
                    last = f"HTTP {response.status_code}: {response.text[:300]}"
                    if response.status_code not in RETRY_STATUS:
                        break  # a 4xx other than 429 will not get better
                    wait = retry_after(response.headers.get("Retry-After"))
            if attempt < self.cfg.max_retries:
                delay = wait if wait is not None else backoff(attempt + 1)
                run_logger(__name__).warning("served model %s: %s; retrying in %.1fs (%d of %d)", self.cfg.name, last, delay, attempt + 1, self.cfg.max_retries)
                self._sleep(delay)
        return self._failed(f"the served model failed after {attempt + 1} attempt(s): {last}", prompt)

    def _failed(self, message: str, prompt: str) -> dict[str, Any]:
        """An error result (a ``generation_error`` reject), counted as done and as an error."""
        with self._lock:
            self.counts["errors"] += 1
            self.counts["done"] += 1
        return {**error_result(message), "prompt": prompt}

    def _result(self, response, prompt: str) -> dict[str, Any]:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as err:
            return self._failed(f"the served model answered something that is not a chat completion ({type(err).__name__}: {err})", prompt)
        tokens, prompt_tokens = int(usage.get("completion_tokens") or 0), int(usage.get("prompt_tokens") or 0)
        with self._lock:
            self.counts["done"] += 1
            self.counts["tokens"] += tokens
            self.counts["prompt_tokens"] += prompt_tokens
        return {
            "completion": text or "",
            "finish_reason": choice.get("finish_reason") or "unknown",
            "num_tokens": tokens,
            "prompt_tokens": prompt_tokens,
            "error": None,
            "prompt": prompt,
        }

    def identity(self) -> dict[str, str]:
        """What the generation cache keys the served model by (and lineage records)."""
        described = {}
        try:
            response = self._client.get(f"{self.base_url}/models", timeout=10)
            for item in response.json().get("data", []):
                if item.get("id") == self.cfg.name:
                    described = {k: str(item[k]) for k in ("id", "root", "owned_by") if item.get(k)}
        except Exception:  # the identity is name and endpoint then; the first request will say what is wrong
            pass
        return {"name": self.cfg.name, "endpoint": redact_uri(self.base_url), **described}


def structured_body(spec: str) -> dict[str, Any]:
    """A constraint (``SamplingSettings.structured``) as request fields: a JSON schema as OpenAI's
    ``response_format`` (which vLLM, SGLang and hosted APIs read), a regex or a choice as vLLM's
    ``structured_outputs`` (no OpenAI field exists for them)."""
    constraint = json.loads(spec)
    if "json" in constraint:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": constraint["json"], "strict": True}}}
    return {"structured_outputs": constraint}


def render_request(request: dict[str, Any]) -> str:
    """The prompt as the cache keys it for a served model: the messages and response prefix as
    canonical JSON (the server applies its own chat template, which this side cannot see)."""
    return json.dumps({"messages": request["messages"], "response_prefix": request.get("response_prefix", "")}, sort_keys=True, ensure_ascii=False)


# -- a local vLLM server (the tests' and bench/served.py's endpoint) ------------------------------


def start_server(model_dir: Path, port: int, log: Path, timeout_s: float = 300, uniproc: bool = False) -> subprocess.Popen:
    """``vllm serve`` of a local model folder on 127.0.0.1:``port``, served as "embedded" (its
    module: the CPU wheel's ``vllm`` script looks for a package named vllm), with the CPU settings
    the run's own engines use, in a session of its own; returns once /health answers.

    ``uniproc``: the server's engine core runs the model itself (vLLM's uniprocess executor,
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the run's own CPU engines do: ``distillery/engine.py``)
    instead of in a worker process of its own: one process fewer to start (on 2 cores about 41
    CPU-seconds to be ready instead of 57) and no busy-polling engine core beside the model's
    threads (16 requests of 96 tokens: 68 output tok/s instead of 41). False: vLLM's default, what
    ``vllm serve`` does for a user and what ``make bench-served`` measured."""
    import httpx

    from distillery.hardware import cpu_engine_env

    env = {**os.environ, **cpu_engine_env(1), "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if uniproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--served-model-name", "embedded",
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--enforce-eager",
        # as the run's CPU engines: per-request seeds need whole prompts per step on vLLM 0.32's CPU build
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise AssertionError(f"vllm serve did not answer /health in {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL the server and its engine-core process (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)
