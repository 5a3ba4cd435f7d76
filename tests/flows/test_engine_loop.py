"""The engine loop with the real CPU vLLM engine (slow): generate calls made at once share the
engine's batch, each call gets its own results in order, a request the engine refuses fails
alone, and progress is counted per finished request; with ``engine.continuous_batching: false``
the calls take turns; structured output (JSON schema, regex, choice) holds, and a constraint
that does not compile fails its requests with an error.
"""

import json
import re
import threading

import pytest

from distillery.engine import SamplingSettings, VLLMEngine
from schemas.recipe import EngineConfig, StructuredOutput

pytestmark = pytest.mark.slow
SAMPLING = SamplingSettings(temperature=0.8, top_p=0.95, max_tokens=16)
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"], "additionalProperties": False}


def _json_answer(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"answer"} and isinstance(value["answer"], int)


STRUCTURED = [
    ({"json_schema": SCHEMA}, _json_answer),
    ({"regex": r"The answer is [0-9]{1,3}\."}, lambda t: re.fullmatch(r"The answer is [0-9]{1,3}\.", t) is not None),
    ({"choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
]
CALLS, PER_CALL = 4, 6


def _requests(call: int, n: int = PER_CALL) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {call} + {i}?"}], "sampling_seed": 100 * call + i} for i in range(n)]


def _at_once(engine: VLLMEngine) -> dict[int, list[dict]]:
    results: dict[int, list[dict]] = {}
    start = threading.Barrier(CALLS)

    def call(k: int) -> None:
        start.wait()
        results[k] = engine.generate(_requests(k), SAMPLING)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(CALLS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_calls_at_once_share_the_batch(embedded_model):
    with VLLMEngine(str(embedded_model), EngineConfig(max_model_len=512, max_in_flight=64)) as engine:
        assert engine.capacity() == 64  # engine.max_in_flight is vLLM's max_num_seqs
        for continuous in (True, False):  # engine.continuous_batching, on the same engine
            engine.continuous_batching = continuous
            before = engine.progress()
            engine.loop.peak_in_flight = 0
            results = _at_once(engine)
            stats = engine.progress()

            assert sorted(results) == list(range(CALLS))
            for k, got in results.items():  # each call's results, in its requests' order
                assert len(got) == PER_CALL and all(r["error"] is None and r["completion"] for r in got)
                assert [f"What is {k} + {i}?" in r["prompt"] for i, r in enumerate(got)] == [True] * PER_CALL
            assert stats["submitted"] - before["submitted"] == stats["done"] - before["done"] == CALLS * PER_CALL
            assert stats["in_flight"] == 0
            assert stats["tokens"] - before["tokens"] == sum(r["num_tokens"] for got in results.values() for r in got)
            if continuous:  # the calls' requests were in the engine together
                assert stats["peak_in_flight"] > PER_CALL
            else:  # one call at a time
                assert stats["peak_in_flight"] == PER_CALL

        # a prompt longer than max_model_len is refused by vLLM: that request fails, its batch does not
        engine.continuous_batching = True
        long = _requests(9, 3)
        long[1] = {"messages": [{"role": "user", "content": "word " * 600}], "sampling_seed": 1}
        got = engine.generate(long, SAMPLING)
        assert [r["error"] is None for r in got] == [True, False, True]
        assert got[1]["completion"] is None and "max" in got[1]["error"].lower()
        assert engine.progress()["in_flight"] == 0

        # structured output (generation.structured_output): each kind of constraint holds
        for constraint, holds in STRUCTURED:
            spec = StructuredOutput(**constraint).spec()
            got = engine.generate(_requests(7, 3), SamplingSettings(0.8, 0.95, 48, spec))
            assert all(r["error"] is None and holds(r["completion"]) for r in got), (constraint, [r["completion"] for r in got])
        # a constraint the grammar compiler refuses is an error result that says why, never an empty completion
        # (a backreference: Python's re compiles it, so only the engine can refuse it; the recipe refuses it first)
        refused = json.dumps({"regex": r"(a)\1"})
        got = engine.generate(_requests(8, 2), SamplingSettings(0.8, 0.95, 16, refused))
        assert all(r["completion"] is None and "backreferences are not supported" in r["error"] for r in got), got
        assert engine.generate(_requests(8, 1), SAMPLING)[0]["error"] is None  # the engine goes on
