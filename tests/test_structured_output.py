"""Structured output's configuration and the constraints the stages use, without an engine (the
real engine's constrained decoding: tests/flows/test_engine_loop.py and tests/stages/test_score.py;
an endpoint's request fields: tests/test_served.py)."""

import json
import re

import pytest

from distillery.engine import SamplingSettings
from distillery.generation_cache import request_key
from distillery.stages.glan import parse_syllabus, syllabus_constraint
from distillery.stages.score import judge_constraint, parse_judge_score
from schemas.recipe import RecipeError, StructuredOutput, load_recipe

MODEL = {"sha256": "abc", "dtype": "float32"}


def test_exactly_one_constraint_and_each_is_checked():
    assert json.loads(StructuredOutput(regex="[0-9]+").spec()) == {"regex": "[0-9]+"}
    assert json.loads(StructuredOutput(choice=["a", "b"]).spec()) == {"choice": ["a", "b"]}
    assert StructuredOutput(json_schema={"type": "object", "b": 1, "a": 2}).spec() == StructuredOutput(json_schema={"a": 2, "type": "object", "b": 1}).spec()
    for bad, message in [
        ({}, "exactly one of json_schema, regex or choice \\(got none\\)"),
        ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
        ({"regex": "(unclosed"}, "does not compile"),
        ({"regex": r"(a)\1"}, "look-arounds and backreferences"),
        ({"regex": r"(?<!x)y"}, "look-arounds and backreferences"),
        ({"choice": []}, "at least 1"),
        ({"json_schema": {"type": 3}}, "JSON Schema type name"),
        ({"json_schema": {"enum": ["x" * 30_000]}}, "at most 20000"),
    ]:
        with pytest.raises(ValueError, match=message):
            StructuredOutput(**bad)


def test_a_bad_constraint_in_a_recipe_names_its_field(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nseeds: {builtin: {count: 2}}\n")
    ok = load_recipe(recipe, ["generation.structured_output.regex=The answer is [0-9]+"])
    assert json.loads(SamplingSettings.from_config(ok.generation).structured) == {"regex": "The answer is [0-9]+"}
    assert SamplingSettings.from_config(load_recipe(recipe).generation).structured is None
    with pytest.raises(RecipeError, match=r"generation\.structured_output.*does not compile"):
        load_recipe(recipe, ["generation.structured_output.regex=[0-9"])
    with pytest.raises(RecipeError, match=r"generation\.structured_output\.grammar"):
        load_recipe(recipe, ["generation.structured_output.grammar=root ::= x"])


def test_the_cache_keys_a_constraint_and_leaves_free_text_keys_as_they_were():
    free = SamplingSettings(0.8, 0.95, 64)
    regex = SamplingSettings(0.8, 0.95, 64, StructuredOutput(regex="[0-9]+").spec())
    choice = SamplingSettings(0.8, 0.95, 64, StructuredOutput(choice=["1", "2"]).spec())
    keys = {request_key(MODEL, "p", s, 1) for s in (free, regex, choice)}
    assert len(keys) == 3
    # a free-text request's key is the one it had before constraints existed (caches stay valid)
    import hashlib

    material = {"model_sha256": "abc", "dtype": "float32", "prompt": "p", "temperature": 0.8, "top_p": 0.95, "max_tokens": 64, "seed": 1}
    assert request_key(MODEL, "p", free, 1) == hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("prefix", ["Score:", "Score: ", "", "Verdict."])
def test_every_reply_the_judge_constraint_allows_parses(prefix):
    pattern = json.loads(judge_constraint(prefix))["regex"]
    allowed = [t for t in (f"{sep}{n}" for sep in ("", " ", "Score: ", "Score:") for n in range(0, 12)) if re.fullmatch(pattern, t)]
    assert allowed  # the constraint lets the judge answer
    assert {parse_judge_score(prefix + t) for t in allowed} == set(range(1, 11))  # and each answer is a score 1..10
    assert not re.fullmatch(pattern, " 0") and not re.fullmatch(pattern, "Score: 11")


def test_a_syllabus_the_constraint_allows_has_every_session():
    pattern = json.loads(syllabus_constraint(4))["regex"]
    text = "1. Place value\n2. Adding with carries\n3. Subtracting\n4. Word problems\n"
    assert re.fullmatch(pattern, text) and parse_syllabus(text, 4) == ["Place value", "Adding with carries", "Subtracting", "Word problems"]
    assert not re.fullmatch(pattern, "1. Place value\n2. Adding\n3. Subtracting\n")  # a session missing
    assert not re.fullmatch(pattern, "1. Place value\n\n2. Adding\n3. Subtracting\n4. Words\n")  # not one list
    assert re.fullmatch(json.loads(syllabus_constraint(1))["regex"], "1. Only one")
