"""Taxonomy-driven generation (GLAN) through the real ``synthesize`` flow, in-process, with a
scripted generator in place of the vLLM engines (tests/scripted.py; fast tier: seconds, no
vLLM): ``recipes/glan.yaml``.

The script answers every request the flow makes, keyed by the requests the stage functions build
(``syllabus_requests``, ``question_requests``, ``build_requests``): a full syllabus for the first
subject (one session listed twice), a one-session syllabus for the second (one session short), an
engine error for the third, a bulleted syllabus after an introduction for the fourth; then a
problem for the first session and the same problem for the second (a duplicate), a problem for
the second subject, a too-short one and another problem for the fourth; then the samples. The run
must drop what it must with the reasons, sample the three problems, label them by majority vote,
and report coverage per taxonomy node (an uncovered subject too) in the manifest and the card.
"""

import polars as pl

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.glan import ingest_taxonomy, question_requests, syllabus, syllabus_requests
from distillery.stages.synthesize import build_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow

RECIPE = "recipes/glan.yaml"
SETS = [
    "glan.sessions=2",
    "glan.per_session=1",
    "glan.constrained=false",  # free-text syllabi: the parser of numbered and bulleted lists, and short ones
    "glan.syllabus_max_tokens=128",
    "glan.question_max_tokens=96",
    "generation.samples_per_problem=2",
    "generation.max_tokens=96",
    "quality.drop_truncated=false",
]
TEAMS = "A class of 28 students splits into teams of 4. How many teams are there?"
HALVES = "Mia cuts a pizza into 8 equal slices and eats half of them. How many slices does she eat?"
SPEED = "A cyclist rides at 15 kilometres per hour for 2 hours. How far does she ride?"
SYLLABI = [
    "1. Sharing equally: division\n2. sharing equally: division\n3. Mixed operations: order of operations",
    "1. Halves and quarters",
    {"error": "EngineDeadError: the engine core died"},
    "Here is a syllabus for the course.\n- Reading clocks\n- Speed and distance\n- Work rates",
]
SAMPLES = {
    TEAMS: ["28 students in teams of 4 make 28 / 4 = 7 teams. The answer is 7", "Count by fours up to twenty-eight: that is seven teams. The answer is 7"],
    HALVES: ["Half of the 8 slices is 8 / 2 = 4 slices. The answer is 4", "She eats one half, and one half of eight pieces is five. The answer is 5"],
    SPEED: ["Distance is speed times time: 15 x 2 = 30 km. The answer is 30", "Fifteen kilometres each hour over two hours gives thirty. The answer is 30"],
}


def test_glan_recipe_end_to_end(scripted, tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    cfg, seed = recipe.glan, recipe.generation.seed

    subjects = ingest_taxonomy(str(ROOT / cfg.taxonomy)).kept
    first, second, third, fourth = subjects["seed_id"].to_list()
    syllabi = syllabus_requests(subjects, cfg, run_seed=seed)
    outline = SamplingSettings(cfg.temperature, cfg.top_p, cfg.syllabus_max_tokens)
    for request, answer in zip(syllabi, SYLLABI, strict=True):
        scripted.plant(request, answer, outline)
    planned = syllabus(subjects, syllabi, [a if isinstance(a, dict) else {"completion": a} for a in SYLLABI], cfg)
    ask = SamplingSettings(cfg.temperature, cfg.top_p, cfg.question_max_tokens)
    asked = {r["seed_id"]: r for r in question_requests(planned.kept, cfg, run_seed=seed)}
    assert list(asked) == [f"{first}/s0", f"{first}/s1", f"{second}/s0", f"{fourth}/s0", f"{fourth}/s1"]
    for session, answer in zip(asked, [f"Problem: {TEAMS}", TEAMS, HALVES, "Hi", SPEED], strict=True):
        scripted.plant(asked[session], answer, ask)
    problems = pl.DataFrame({"seed_id": [f"{first}/s0/q0", f"{second}/s0/q0", f"{fourth}/s1/q0"], "question": [TEAMS, HALVES, SPEED]})
    for request in build_requests(problems, recipe.generation):
        question = problems.filter(pl.col("seed_id") == request["seed_id"])["question"][0]
        scripted.plant(request, SAMPLES[question][request["sample_index"]], SamplingSettings.from_config(recipe.generation))

    uri, manifest = run_flow(RECIPE, store, SETS)

    assert scripted.unused() == [] and set(scripted.sources) == {"planted"}
    assert len(scripted.requests) == 4 + 5 + 6

    stages = check_stages(manifest, ["ingest", "syllabus", "questions", "synthesize", "verify", "score", "quality", "dedup"])
    assert (stages[1]["rows_in"], stages[1]["fanout"], stages[1]["rows_out"]) == (4, 2, 5)
    assert stages[1]["dropped"] == {"short_syllabus": 1, "generation_error": 2}
    assert (stages[2]["rows_in"], stages[2]["fanout"], stages[2]["rows_out"]) == (5, 1, 3)
    assert stages[2]["dropped"] == {"duplicate": 1, "too_short": 1}
    assert manifest["counts"]["published"] == 6

    rejects = pl.read_parquet(uri / "rejects")
    by_id = {r["seed_id"]: r for r in rejects.iter_rows(named=True)}
    assert by_id[f"{second}/s1"]["reason"] == "short_syllabus" and by_id[f"{second}/s1"]["stage"] == "syllabus"
    assert by_id[f"{second}/s1"]["detail"] == "the syllabus listed 1 of 2 sessions"
    assert by_id[f"{third}/s0"]["reason"] == by_id[f"{third}/s1"]["reason"] == "generation_error"
    assert by_id[f"{first}/s1/q0"]["reason"] == "duplicate" and by_id[f"{first}/s1/q0"]["detail"] == f"the same as {first}/s0/q0"
    assert by_id[f"{fourth}/s0/q0"]["reason"] == "too_short"

    data = pl.read_parquet(uri / "data").sort("seed_id", "sample_index")
    mine = data.filter(pl.col("seed_id") == f"{first}/s0/q0").to_dicts()
    assert [r["completion"] for r in mine] == SAMPLES[TEAMS]
    for row in mine:
        assert row["question"] == TEAMS and row["subject_id"] == first and row["discipline"] == "Arithmetic"
        assert row["session"] == "Sharing equally: division" and row["parent_id"] == f"{first}/s0"
        assert row["question_template"] == load_template("glan", "question").id
        assert row["syllabus_template"] == load_template("glan", "syllabus").id
    sessions = dict(zip(data["seed_id"], data["session"]))
    assert sessions[f"{fourth}/s1/q0"] == "Speed and distance"  # the bulleted list, after its introduction
    # no reference answers: the majority vote labels them (a tie goes to the first sample's answer)
    votes = {sid: g.sort("sample_index")["pseudo_correct"].to_list() for (sid,), g in data.group_by("seed_id")}
    assert votes == {f"{first}/s0/q0": [True, True], f"{second}/s0/q0": [True, False], f"{fourth}/s1/q0": [True, True]}

    nodes = manifest["stats"]["taxonomy_coverage"]
    assert {k: (v["sessions"], v["problems"], v["published_samples"], v["covered"]) for k, v in nodes.items()} == {
        "Arithmetic": (3, 2, 4, True),
        "Arithmetic/Whole-number operations": (2, 1, 2, True),
        "Arithmetic/Fractions and decimals": (1, 1, 2, True),
        "Applied arithmetic": (2, 1, 2, True),
        "Applied arithmetic/Money and shopping": (0, 0, 0, False),
        "Applied arithmetic/Time and rates": (2, 1, 2, True),
    }
    assert nodes["Arithmetic"]["subjects"] == 2 and nodes["Applied arithmetic"]["subjects"] == 2
    assert manifest["generator"]["glan"]["prompt_templates"] == {n: load_template("glan", n).id for n in ("syllabus", "question")}
    card = (uri / "card.md").read_text()
    assert "## Coverage per taxonomy node" in card and "| Arithmetic/Whole-number operations | subject | 2 | 1 |" in card
    assert "| Applied arithmetic/Money and shopping | subject | 0 | 0 |" in card
