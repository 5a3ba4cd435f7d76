"""The generation cache resumes at batch granularity: vLLM's output depends on the batch a request
ran in, so a batch whose cache writes a crash cut short is generated again whole (and comes out as
the uninterrupted run's), while requests cached from *other* batches are reused as they are.

The engine here is a stand-in whose output, like vLLM's, depends on the whole batch; the cache,
the store and the tokenizer's chat template are the real ones."""

import hashlib
from pathlib import Path

import pytest

from distillery.engine import SamplingSettings
from distillery.generation_cache import PREFIX, CachedGenerator
from distillery.model_setup import resolve_model_path
from distillery.store import Store

SAMPLING = SamplingSettings(temperature=0.8, top_p=0.95, max_tokens=32)
MODEL = {"sha256": "0" * 64, "dtype": "auto"}


class BatchDependentEngine:
    """Answers each request with a text that depends on its question, its seed and its batch."""

    def __init__(self) -> None:
        self.asked: list[list[int]] = []

    def generate(self, shard_index, requests, sampling):
        self.asked.append([r["sampling_seed"] for r in requests])
        batch = hashlib.sha256(repr([r["sampling_seed"] for r in requests]).encode()).hexdigest()[:8]
        return [
            {"completion": f"{r['messages'][0]['content']}|{r['sampling_seed']}|{batch}", "finish_reason": "stop", "num_tokens": 3, "prompt_tokens": 9, "error": None}
            for r in requests
        ]


def _requests(*seeds: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {s} + 1?"}], "sampling_seed": s} for s in seeds]


@pytest.fixture
def model_dir() -> str:
    try:
        return str(resolve_model_path("embedded"))
    except Exception as err:  # the tokenizer's chat template is part of the key
        pytest.skip(f"embedded model not materialized: {err}")


def _entries(store_dir: Path) -> list[Path]:
    return sorted((store_dir / PREFIX).rglob("*.json"))


def test_a_batch_cut_short_by_a_crash_is_generated_again_whole(tmp_path, model_dir):
    engine = BatchDependentEngine()
    cache = CachedGenerator(engine, Store(str(tmp_path)), model_dir, MODEL)
    first = [r["completion"] for r in cache.generate(0, _requests(1, 2, 3), SAMPLING)]
    assert engine.asked == [[1, 2, 3]] and len(_entries(tmp_path)) == 3

    _entries(tmp_path)[0].unlink()  # the crash: one of the batch's three writes never happened
    again = [r["completion"] for r in cache.generate(0, _requests(1, 2, 3), SAMPLING)]
    assert engine.asked[-1] == [1, 2, 3]  # the whole batch, not just the lost request
    assert again == first  # so every sample is what the uninterrupted run had
    assert (cache.hits, cache.misses) == (0, 6)

    assert [r["completion"] for r in cache.generate(0, _requests(1, 2, 3), SAMPLING)] == first
    assert len(engine.asked) == 2 and (cache.hits, cache.misses) == (3, 6)


def test_requests_cached_from_other_batches_are_reused(tmp_path, model_dir):
    engine = BatchDependentEngine()
    cache = CachedGenerator(engine, Store(str(tmp_path)), model_dir, MODEL)
    first = [r["completion"] for r in cache.generate(0, _requests(1, 2), SAMPLING)]
    # seeds were added, so the shards regrouped: 1 and 2 now share a batch with 3
    mixed = [r["completion"] for r in cache.generate(0, _requests(1, 2, 3), SAMPLING)]
    assert engine.asked == [[1, 2], [3]]  # only the new request reaches the engine
    assert mixed[:2] == first
    assert (cache.hits, cache.misses) == (2, 3)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime.\nJust one."}],
    [
        {"role": "user", "content": "What is 7 * 6?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "Check it: {{ not a template }} <|im_end|>"},
    ],
]


def _folder_variants(tmp_path: Path) -> list[Path]:
    """The embedded model's tokenizer folder as shipped, and the same tokenizer written the older
    way: the template inside ``tokenizer_config.json`` and the special tokens as AddedToken dicts;
    one whose template uses transformers' own extensions and the special tokens; and that one
    with a legacy ``special_tokens_map.json`` naming another ``bos_token``."""
    import json
    import shutil

    model = resolve_model_path("embedded")
    older = tmp_path / "older"
    older.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, older / name)
    config = json.loads((older / "tokenizer_config.json").read_text())
    config["chat_template"] = (model / "chat_template.jinja").read_text()
    config["bos_token"] = {"__type": "AddedToken", "content": config["bos_token"], "special": True}
    (older / "tokenizer_config.json").write_text(json.dumps(config))
    tagged = tmp_path / "tagged"  # transformers' {% generation %} tag and tojson, the special tokens
    shutil.copytree(older, tagged)
    tokens = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|"
    config["chat_template"] = tokens + "{{ 'sys' | tojson }}{% generation %}" + config["chat_template"] + "{% endgeneration %}"
    (tagged / "tokenizer_config.json").write_text(json.dumps(config))
    legacy = tmp_path / "legacy"  # a special_tokens_map.json, which a config without added_tokens_decoder yields to
    shutil.copytree(tagged, legacy)
    (legacy / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    return [model, older, tagged, legacy]


def test_the_cache_key_prompt_is_the_tokenizers_rendering(tmp_path):
    """The cache renders prompts with transformers' Jinja renderer from the folder's files (no
    tokenizer, no torch import in the driver): what it renders must be what the tokenizer's
    ``apply_chat_template`` (the engine's rendering) gives, or keys would name other prompts."""
    from transformers import AutoTokenizer

    from distillery.generation_cache import chat_template, render

    for folder in _folder_variants(tmp_path):
        assert chat_template(str(folder)) is not None  # the light path is the one under test
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for messages in CONVERSATIONS:
            assert render(str(folder), messages) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_folder_with_several_templates_is_rendered_by_the_tokenizer(tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer

    from distillery.generation_cache import chat_template, render

    model = resolve_model_path("embedded")
    named = tmp_path / "named"
    named.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, named / name)
    template = (model / "chat_template.jinja").read_text()
    config = json.loads((named / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "LEGACY " + template}, {"name": "tool_use", "template": template}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template(str(named)) is None
    messages = CONVERSATIONS[0]
    rendered = render(str(named), messages)
    assert rendered.startswith("LEGACY ")
    assert rendered == AutoTokenizer.from_pretrained(named).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
