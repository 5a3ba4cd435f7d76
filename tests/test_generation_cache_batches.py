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
