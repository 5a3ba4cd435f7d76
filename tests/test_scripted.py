"""The fast tier's scripted generator (tests/scripted.py): which answer wins, the result fields the
flow reads, and the counts a test asserts on."""

from distillery.engine import SamplingSettings
from tests.scripted import DEFAULT_ANSWER, ScriptedGenerator

A, B = SamplingSettings(0.7, 0.95, 64), SamplingSettings(0.2, 1.0, 64)


def _request(content: str, seed: int = 1, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "sampling_seed": seed, **extra}


def test_planted_then_content_then_rules_then_default():
    gen = ScriptedGenerator()
    gen.plant(_request("q"), "under A", A)
    gen.plant(_request("q"), "any sampling")
    gen.on_content("q", "by content")
    gen.rule(lambda r, s: "rule" if r.get("k") == 1 else None)
    got = gen.generate(3, [_request("q"), _request("q", seed=2), _request("other", k=1), _request("other")], A)
    assert [r["completion"] for r in got] == ["under A", "by content", "rule", DEFAULT_ANSWER]
    assert gen.generate(0, [_request("q")], B)[0]["completion"] == "any sampling"
    assert gen.sources == ["planted", "content", "rule", "default", "planted"]
    assert [(i, n) for i, n, _ in gen.calls] == [(3, 4), (0, 1)] and len(gen.requests) == 5
    assert gen.unused() == [] and gen.generate(0, [], A) == []


def test_result_fields_errors_and_unused():
    gen = ScriptedGenerator(default=lambda r, s: f"echo {r['messages'][0]['content']}")
    gen.plant(_request("bad"), {"error": "EngineDeadError: gone"})
    gen.plant(_request("cut"), {"completion": "a b c", "finish_reason": "length"})
    gen.plant(_request("never"), "x")
    bad, cut, echo = gen.generate(0, [_request("bad"), _request("cut"), _request("hi", response_prefix="Score:")], A)
    assert (bad["completion"], bad["finish_reason"], bad["error"], bad["num_tokens"]) == (None, "error", "EngineDeadError: gone", 0)
    assert (cut["finish_reason"], cut["num_tokens"], cut["error"]) == ("length", 3, None)
    assert echo["completion"] == "echo hi" and echo["prompt"] == "hiScore:" and echo["prompt_tokens"] == 1
    assert len(gen.unused()) == 1 and gen.started_in is None and gen.actor_failures == 0
