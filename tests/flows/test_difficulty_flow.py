"""Difficulty-targeted generation through the real ``synthesize`` flow, in-process, with a
scripted generator in place of the vLLM engines (tests/scripted.py; fast tier: seconds, no
vLLM): ``recipes/difficulty.yaml``.

The script answers every request the flow makes, keyed by the requests the stage functions build
(``build_requests``, ``variant_requests``, ``solve_requests``). Probe samples: the first problem
always solved, the second never, the third half the time, the fourth always, the fifth never.
Rewrites: the first one's harder variant, the second one's "simpler" one that is the problem
again (``no_change``), a refusal for the fourth (``unanswerable``), a simpler variant of the fifth
on which the ensemble disagrees (``no_agreement``); the ensemble gives the harder variant its
answer (two of three agree). The run must sample originals and that variant, take the originals'
final samples from the generation cache (the probe drew them), and label the difficulties.
"""

import polars as pl

from distillery.engine import SamplingSettings
from distillery.prompts import load_template
from distillery.stages.difficulty import variant_requests
from distillery.stages.ingest import ingest_seeds
from distillery.stages.self_instruct import solve_requests
from distillery.stages.synthesize import build_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow
from tests.scripted import distinct_text

RECIPE = "recipes/difficulty.yaml"
SETS = ["seeds.builtin.count=5", "difficulty.solve_max_tokens=96", "generation.samples_per_problem=2", "generation.max_tokens=96", "quality.drop_truncated=false"]
RIGHT = {0: [True, True], 1: [False, False], 2: [True, False], 3: [True, True], 4: [False, False]}  # probe verdicts per problem


def test_difficulty_recipe_end_to_end(scripted, tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    cfg, gen, seed = recipe.difficulty, recipe.generation, recipe.generation.seed
    sampling = SamplingSettings.from_config(gen)

    seeds = ingest_seeds(recipe.seeds).kept
    ids = seeds["seed_id"].to_list()
    for request in build_requests(seeds, gen):  # the probe's samples, and so the final ones
        k = ids.index(request["seed_id"])
        ref = seeds["reference_answer"][k]
        answer = ref if RIGHT[k][request["sample_index"]] else str(int(ref) + 1)
        scripted.plant(request, distinct_text(f"{request['seed_id']}-{request['sample_index']}", answer), sampling)
    probed = seeds.with_columns(pl.Series("probe_pass_rate", [1.0, 0.0, 0.5, 1.0, 0.0]))
    rewrites = {r["seed_id"]: r for r in variant_requests(probed, run_seed=seed)}
    assert [(ids.index(s), r["direction"]) for s, r in rewrites.items()] == [(0, "harder"), (1, "simpler"), (3, "harder"), (4, "simpler")]
    harder_text = f"{seeds['question'][0][:-1]}, and then 3 more are added. What is the total?"
    simpler_text = "Tom has 3 apples and eats 2 of them. How many apples are left?"
    rewrite = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens)
    scripted.plant(rewrites[ids[0]], f"Harder problem: {harder_text}", rewrite)
    scripted.plant(rewrites[ids[1]], seeds["question"][1], rewrite)  # the "simpler" problem is the problem again
    scripted.plant(rewrites[ids[3]], "I'm sorry, I cannot make this harder.", rewrite)
    scripted.plant(rewrites[ids[4]], f"Simpler problem: {simpler_text}", rewrite)
    variants = pl.DataFrame({"seed_id": [f"{ids[0]}.harder", f"{ids[4]}.simpler"], "question": [harder_text, simpler_text]})
    member_answers = [["The answer is 99", "The answer is 1"], ["The answer is 99", "The answer is 2"], ["The answer is 7", "I do not know"]]
    for member, requests, texts in zip(cfg.members, solve_requests(variants, cfg, run_seed=seed), member_answers, strict=True):
        for request, text in zip(requests, texts, strict=True):
            scripted.plant(request, text, SamplingSettings(member.temperature, member.top_p, cfg.solve_max_tokens))
    harder = variants[:1]
    for request in build_requests(harder, gen):  # one right (99), one wrong: a medium variant
        scripted.plant(request, distinct_text(f"harder-{request['sample_index']}", ["99", "98"][request["sample_index"]]), sampling)

    uri, manifest = run_flow(RECIPE, store, SETS)

    # the engine saw the probe once: the final sampling of the originals came from the cache
    assert scripted.unused() == [] and set(scripted.sources) == {"planted"}
    assert len(scripted.requests) == 10 + 4 + 3 * 2 + 2
    assert manifest["stats"]["generation_cache"] == {"hits": 10, "misses": 22}

    stages = check_stages(manifest, ["ingest", "probe", "retarget", "agreement", "synthesize", "verify", "quality", "dedup"])
    probe, retargeted, agreed, synth = stages[1:5]
    assert (probe["rows_in"], probe["rows_out"]) == (5, 5)
    assert (retargeted["rows_in"], retargeted["fanout"], retargeted["rows_out"]) == (5, 2, 7)
    assert retargeted["dropped"] == {"not_targeted": 1, "no_change": 1, "unanswerable": 1}
    assert (agreed["rows_in"], agreed["rows_out"], agreed["dropped"]) == (7, 6, {"no_agreement": 1})
    assert (synth["rows_in"], synth["fanout"], synth["rows_out"]) == (6, 2, 12)
    assert manifest["counts"]["published"] == 12

    rejects = pl.read_parquet(uri / "rejects")
    by_id = {r["seed_id"]: r for r in rejects.filter(pl.col("stage").is_in(["retarget", "agreement"])).iter_rows(named=True)}
    assert {k: v["reason"] for k, v in by_id.items()} == {
        f"{ids[1]}.simpler": "no_change",
        f"{ids[2]}.variant": "not_targeted",
        f"{ids[3]}.harder": "unanswerable",
        f"{ids[4]}.simpler": "no_agreement",
    }
    assert by_id[f"{ids[2]}.variant"]["detail"] == "probe pass rate 0.5"

    rows = pl.read_parquet(uri / "data").to_dicts()
    variant = [r for r in rows if r["seed_id"] == f"{ids[0]}.harder"]
    assert len(variant) == 2
    for row in variant:
        assert row["question"] == harder_text and row["reference_answer"] == "99" and row["variant_of"] == ids[0]
        assert row["variant_direction"] == "harder" and row["variant_template"] == load_template("difficulty", "harder").id
        assert row["member_agreement"] == round(2 / 3, 4) and row["pass_rate"] == 0.5 and row["difficulty"] == "medium"
    assert sorted(r["correct"] for r in variant) == [False, True]
    labels = {ids[k]: ("easy" if all(v) else "hard" if not any(v) else "medium") for k, v in RIGHT.items()}
    for row in rows:
        if row["seed_id"] in labels:
            assert row["difficulty"] == labels[row["seed_id"]] and row["pass_rate"] == sum(RIGHT[ids.index(row["seed_id"])]) / 2
            assert row["probe_pass_rate"] == row["pass_rate"] and row["variant_of"] is None

    stats = manifest["stats"]["difficulty"]
    assert (stats["problems_probed"], stats["always_solved"], stats["never_solved"], stats["variants_kept"]) == (5, 2, 2, 1)
    assert stats["published_by_difficulty"] == {"easy": 4, "hard": 4, "medium": 4}
    assert stats["published_by_origin"] == {"harder": 2, "original": 10}
    assert manifest["generator"]["difficulty"]["prompt_templates"]["harder"] == load_template("difficulty", "harder").id
    card = (uri / "card.md").read_text()
    assert "| probe |" in card and "| retarget |" in card and "| agreement |" in card
