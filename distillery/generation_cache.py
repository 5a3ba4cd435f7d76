"""The generation request cache: a generation is never paid for twice.

Each request's result is kept in the store (so on S3 when the store is) under a key that is the
sha256 of what determines it: the model's weights (sha256) and dtype, the **rendered** prompt
(the chat template applied to the messages, so a changed template, system prompt or question is
a new key), the sampling settings (temperature, top_p, max_tokens) and the request's sampling
seed. Editing a later stage, a filter or the seed count reuses every earlier generation; a
changed prompt template or model regenerates everything. Results that are errors are not kept.

Layout: ``STORE/_cache/generation/<key[:2]>/<key>.json``, one small object per request, written
atomically (a run killed mid-shard keeps what it wrote). Nothing is thrown away on success.

vLLM's outputs depend on the batch a request ran in (seen here on the CPU build: the same
request and seed alone or beside others gives different text), so each entry also names its
batch (the hash of the batch's request keys, in order). A shard found partly cached *from its own
batch* is one whose writes a crash cut short: it is generated again whole, which gives exactly
what the uninterrupted run would have. A shard partly cached from other batches (seeds were added,
so shards regrouped) reuses what it finds and generates only the rest.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from distillery.engine import SamplingSettings
from distillery.store import Store
from distillery.uri_io import StorageError

PREFIX = "_cache/generation"
_KEPT = ("completion", "finish_reason", "num_tokens", "prompt_tokens")


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _token(value: Any) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=4)
def chat_template(model_dir: str) -> tuple[str, dict[str, str]] | None:
    """The model folder's chat template and the special tokens it is rendered with, read the way
    transformers' tokenizer reads them (``chat_template.jinja`` before the config's
    ``chat_template``; a legacy ``special_tokens_map.json`` only where the config has no
    ``added_tokens_decoder``, and then over the config's tokens). ``None``
    where the folder holds anything this reading does not cover (several named templates, a
    ``additional_chat_templates`` folder): then the tokenizer itself renders.

    Why not always the tokenizer: ``from transformers import AutoTokenizer`` imports torch, 7 s of
    the driver's start here (15 s on a busy machine) for a process that never runs the model."""
    folder = Path(model_dir)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        legacy = folder / "special_tokens_map.json"
        tokens = json.loads(legacy.read_text()) if legacy.is_file() and "added_tokens_decoder" not in config else {}
    except (OSError, ValueError):
        return None
    if (folder / "additional_chat_templates").exists():
        return None
    file = folder / "chat_template.jinja"
    template = file.read_text(encoding="utf-8") if file.is_file() else config.get("chat_template")
    if not isinstance(template, str):  # several named templates (a list or a dict), or none
        return None
    special = {}
    for name in SPECIAL_TOKENS:
        value = _token(tokens.get(name)) or _token(config.get(name))
        if value is not None:
            special[name] = value
    return template, special


@lru_cache(maxsize=4)
def _compiled(template: str):
    """The template compiled as transformers compiles chat templates (``chat_template_utils``:
    a sandbox, ``trim_blocks``/``lstrip_blocks``, loop controls, its ``tojson``,
    ``raise_exception`` and ``strftime_now``, the ``{% generation %}`` tag), with jinja2 alone:
    importing transformers' module costs the driver 2 to 8 s."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-token masks): the body as it is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(model_dir: str, messages: list[dict[str, str]]) -> str:
    """The prompt as the engine renders it (``VLLMEngine.render``: the tokenizer's chat template,
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``), without
    loading the tokenizer where the folder allows (tests/test_generation_cache_batches.py
    compares the two)."""
    found = chat_template(model_dir)
    if found is None:
        return _tokenizer(model_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template, special = found
    return _compiled(template).render(messages=messages, tools=None, documents=None, add_generation_prompt=True, **special)


def request_key(model: dict[str, str], prompt: str, sampling: SamplingSettings, seed: int) -> str:
    """``model``: {"sha256", "dtype"}; ``prompt``: the rendered prompt (with any response prefix)."""
    material = {
        "model_sha256": model["sha256"],
        "dtype": model["dtype"],
        "prompt": prompt,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "seed": seed,
    }
    if sampling.structured is not None:  # only then: keys of free-text requests stay what they were
        material["structured"] = sampling.structured
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class CachedGenerator:
    """Wraps an engine pool (anything with ``generate(shard_index, requests, sampling)``): hits
    come from the store, only misses reach the engines, and their results are stored."""

    def __init__(self, pool, store: Store, model_dir: str | None, model: dict[str, str], threads: int = 16, *, render_request=None) -> None:
        """``render_request(request)``: the prompt string a request is keyed by; by default the
        model folder's chat template applied to its messages, plus its response prefix (a served
        model, whose template this side cannot see, passes ``distillery.served.render_request``)."""
        self.pool, self.store, self.model, self.threads = pool, store, model, threads
        self.model_dir = str(Path(model_dir)) if model_dir else None
        self._render_request = render_request or (lambda r: render(self.model_dir, r["messages"]) + r.get("response_prefix", ""))
        if self.model_dir:
            # Render once now, in one thread: shards run in threads, and transformers' lazy imports
            # raced there ("cannot import name 'AutoTokenizer'", seen here on a busy machine).
            render(self.model_dir, [{"role": "user", "content": "warm-up"}])
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # shards run in threads

    def capacity(self) -> int | None:
        """What fills the engines behind the cache (``EnginePool.capacity``)."""
        capacity = getattr(self.pool, "capacity", None)
        return capacity() if capacity is not None else None

    def progress(self) -> dict[str, int]:
        """The engines' counts, with the cache's hits counted as requests done."""
        progress = getattr(self.pool, "progress", None)
        counts = dict(progress()) if progress is not None else {}
        with self._lock:
            counts["done"] = counts.get("done", 0) + self.hits
        return counts

    def _path(self, key: str) -> str:
        return f"{PREFIX}/{key[:2]}/{key}.json"

    def _get(self, key: str) -> dict[str, Any] | None:
        try:
            if not self.store.exists(self._path(key)):
                return None
            return json.loads(self.store.get(self._path(key)))
        except (StorageError, ValueError):
            return None  # an unreadable entry is a miss, never a failed run

    def generate(self, shard_index: int, requests: list[dict[str, Any]], sampling: SamplingSettings) -> list[dict[str, Any]]:
        prompts = [self._render_request(r) for r in requests]
        keys = [request_key(self.model, p, sampling, r["sampling_seed"]) for p, r in zip(prompts, requests, strict=True)]
        batch = hashlib.sha256("".join(keys).encode()).hexdigest()
        with ThreadPoolExecutor(self.threads) as pool:
            cached = list(pool.map(self._get, keys))
        missing = [i for i, hit in enumerate(cached) if hit is None]
        if missing and any(hit is not None and hit.get("batch") == batch for hit in cached):
            cached, missing = [None] * len(keys), list(range(len(keys)))  # a crash cut this batch's writes short
        fresh = self.pool.generate(shard_index, [requests[i] for i in missing], sampling) if missing else []
        results: list[dict[str, Any] | None] = [
            None if hit is None else {**{k: hit.get(k) for k in _KEPT}, "error": None, "prompt": prompts[i]} for i, hit in enumerate(cached)
        ]
        to_store = []
        for i, result in zip(missing, fresh, strict=True):
            results[i] = result
            if result.get("error") is None and result.get("completion") is not None:
                to_store.append((keys[i], {**{k: result.get(k) for k in _KEPT}, "batch": batch}))
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda kv: self.store.put(self._path(kv[0]), json.dumps(kv[1]).encode()), to_store))
        with self._lock:  # a regenerated batch counts as misses: it went to the engines
            self.hits += len(requests) - len(missing)
            self.misses += len(missing)
        return results
