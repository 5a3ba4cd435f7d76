"""Recipes: every file in recipes/ validates; bad fields are named; overrides are typed."""

from pathlib import Path

import pytest

from schemas.recipe import CurateRecipe, RecipeError, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    if path.name.startswith("curate"):
        recipe = load_recipe(path, model=CurateRecipe)
    else:
        text = path.read_text()
        recipe = load_recipe(path, ["seeds.path=x.jsonl"] if "builtin" not in text and "taxonomy:" not in text else [])
    assert recipe.name and len(recipe.hash()) == 64


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_field_is_named(tmp_path):
    path = _write(tmp_path, "name: t\nseeds: {path: a.jsonl}\ngeneration: {temprature: 0.5}\n")
    with pytest.raises(RecipeError, match=r"field 'generation\.temprature': unknown field"):
        load_recipe(path)


def test_wrong_type_is_named_with_the_value(tmp_path):
    path = _write(tmp_path, "name: t\nseeds: {path: a.jsonl}\ngeneration: {samples_per_problem: many}\n")
    with pytest.raises(RecipeError, match=r"field 'generation\.samples_per_problem'.*'many'"):
        load_recipe(path)


def test_missing_seed_source_is_explained(tmp_path):
    path = _write(tmp_path, "name: t\nseeds: {format: jsonl}\n")
    with pytest.raises(RecipeError, match="exactly one of seeds.path"):
        load_recipe(path)


def test_bad_template_is_named(tmp_path):
    path = _write(tmp_path, "name: t\nseeds: {path: a.jsonl}\ngeneration: {prompt_template: '{{ question '}\n")
    with pytest.raises(RecipeError, match=r"field 'generation\.prompt_template': .*Jinja2"):
        load_recipe(path)


def test_overrides_are_parsed_and_change_the_hash(tmp_path):
    path = _write(tmp_path, "name: t\nseeds: {path: a.jsonl}\n")
    base = load_recipe(path)
    tuned = load_recipe(path, ["generation.temperature=0.2", "seeds.limit=5"])
    assert tuned.generation.temperature == 0.2 and tuned.seeds.limit == 5
    assert tuned.hash() != base.hash()
    assert load_recipe(path).hash() == base.hash()
    with pytest.raises(RecipeError, match="field 'engine.replicas'"):
        load_recipe(path, ["engine.replicas=0"])


def test_curate_recipe_from_defaults_and_overrides_only():
    recipe = load_recipe(None, ["name=demo", "dedup.threshold=0.7"], model=CurateRecipe)
    assert recipe.name == "demo" and recipe.dedup.threshold == 0.7
    with pytest.raises(RecipeError, match=r"recipe \(defaults\) is invalid:\n  field 'dedup.thresh'"):
        load_recipe(None, ["name=demo", "dedup.thresh=0.7"], model=CurateRecipe)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["score.method=reward_model"], "score.method 'reward_model' needs score.reward_model"),
        (["score.method=oracle"], "field 'score.method'"),
        (["select.policy=threshold"], "select.policy 'threshold' needs select.min_reward"),
        (["select.band=[0.8, 0.2]"], "select.band"),
        (["generation.adaptive.max_samples=2", "generation.samples_per_problem=4"], "below one round"),
        (["select.pairs.dataset=../escape"], "field 'select.pairs.dataset'"),
    ],
)
def test_scoring_and_selection_errors_name_the_field(overrides, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(Path("recipes/default.yaml"), overrides)


def test_selection_label_follows_the_scorer():
    recipe = load_recipe(Path("recipes/default.yaml"), ["select.pairs.enabled=true"])
    assert recipe.select.label_column("none") == "correct"
    assert recipe.select.label_column("majority_vote") == "pseudo_correct"
    assert recipe.select.label_column("program") == "program_correct"
    assert load_recipe(Path("recipes/default.yaml"), ["select.label=correct"]).select.label_column("majority_vote") == "correct"
    assert recipe.pairs_dataset == "arithmetic-cot-pairs"


def test_generation_cache_keys_change_with_what_determines_a_generation():
    from distillery.engine import SamplingSettings
    from distillery.generation_cache import request_key

    model = {"sha256": "abc", "dtype": "auto"}
    sampling = SamplingSettings(0.8, 0.95, 128)
    key = request_key(model, "<prompt>", sampling, 7)
    assert key == request_key(dict(model), "<prompt>", SamplingSettings(0.8, 0.95, 128), 7)  # stable
    changed = [
        request_key({**model, "sha256": "abd"}, "<prompt>", sampling, 7),  # another model or revision
        request_key({**model, "dtype": "float32"}, "<prompt>", sampling, 7),
        request_key(model, "<prompt> ", sampling, 7),  # another rendered prompt
        request_key(model, "<prompt>", SamplingSettings(0.7, 0.95, 128), 7),
        request_key(model, "<prompt>", SamplingSettings(0.8, 0.9, 128), 7),
        request_key(model, "<prompt>", SamplingSettings(0.8, 0.95, 64), 7),
        request_key(model, "<prompt>", sampling, 8),  # another sampling seed
    ]
    assert len({key, *changed}) == 8


def test_set_values_that_are_not_yaml_are_the_plain_strings_they_are(tmp_path):
    """An unquoted Jinja template (or any text YAML cannot parse) in ``--set`` is taken as the
    string, not a ``yaml.parser.ParserError``; YAML values (numbers, lists, quoted strings) still parse."""
    import subprocess
    import sys

    base = ["seeds.path=x.jsonl"]
    for raw in ["{{ question }} Answer briefly.", "Q: {{ question }}", "{% if question %}{{ question }}{% endif %}", "{{ question }}", "Solve: {{ question }} [show work]"]:
        recipe = load_recipe(RECIPES / "gsm8k-cot.yaml", [*base, f"generation.prompt_template={raw}"])
        assert recipe.generation.prompt_template == raw
    recipe = load_recipe(RECIPES / "gsm8k-cot.yaml", [*base, "generation.prompt_template='{{ question }}!'", "generation.temperature=0.25", "description=a: b: c"])
    assert recipe.generation.prompt_template == "{{ question }}!" and recipe.generation.temperature == 0.25 and recipe.description == "a: b: c"
    with pytest.raises(RecipeError, match=r"field 'generation\.temperature': Input should be a valid number.*'\[0\.7'"):
        load_recipe(RECIPES / "gsm8k-cot.yaml", [*base, "generation.temperature=[0.7"])

    # the CLI goes on to its next check (the model folder here), no traceback
    out = subprocess.run(
        [sys.executable, "-m", "distillery.cli", "run", "recipes/gsm8k-cot.yaml", "--set", "generation.prompt_template={{ question }} Answer briefly.",
         "--set", f"seeds.path={tmp_path / 'x.jsonl'}", "--set", f"model.path={tmp_path / 'no-model'}", "--store", str(tmp_path / "store")],
        capture_output=True, text=True, cwd=RECIPES.parent, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr and "ParserError" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().endswith(f"model.path: model folder {tmp_path / 'no-model'} not found or has no config.json")


def test_an_oversized_recipe_file_is_refused_unread(tmp_path):
    path = _write(tmp_path, "name: big\nseeds: {path: a.jsonl}\ndescription: " + "x" * (1 << 20) + "\n")
    with pytest.raises(RecipeError, match=r"is refused: 1,048,6\d\d bytes, more than 1,048,576 \(a recipe is a small YAML file"):
        load_recipe(path)
