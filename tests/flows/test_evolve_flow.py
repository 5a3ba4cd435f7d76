"""Evol-Instruct through the real ``synthesize`` flow, in-process, with a scripted generator in
place of the vLLM engines (tests/scripted.py; fast tier: seconds, no vLLM):
``recipes/evol-instruct.yaml`` for two rounds, then sampling, majority-vote labels and publish.

The script answers every request the flow makes, keyed by the request the stage functions build
(``evolution_requests``, ``build_requests``): the first round's rewrites are one good, one that
copies the template's words, one refusal, one that is the problem again and one too long; the
flow must eliminate the four with their reasons (stage ``evolve-1``), evolve the good one again
(``evolve-2``), and sample the twice-evolved problem, whose samples carry its two-step chain and
the majority vote's labels; counts per round in the manifest, the card and the lineage events.
"""

import json

import polars as pl

from distillery.engine import SamplingSettings
from distillery.stages.evolve import evolution_requests, load_template
from distillery.stages.ingest import ingest_seeds
from distillery.stages.synthesize import build_requests
from schemas.recipe import load_recipe
from tests.flows.strategy_helpers import ROOT, check_stages, run_flow

RECIPE = "recipes/evol-instruct.yaml"
SETS = ["seeds.builtin.count=5", "evolve.max_tokens=96", "generation.samples_per_problem=3", "generation.max_tokens=96", "quality.drop_truncated=false"]
GOOD = "A shop sells pencils in boxes of 12. Lena buys 7 boxes and gives away 19 pencils. How many pencils does she keep?"
HARDER = "A shop sells pencils in boxes of 12. Lena buys 7 boxes, gives away 19 pencils and then buys 5 more. How many pencils does she have?"
SOLUTIONS = [  # the twice-evolved problem's three samples: two agree on 70
    "Lena buys 7 x 12 = 84 pencils. She gives away 19, so 84 - 19 = 65 are left. Then she buys 5 more: 65 + 5 = 70. The answer is 70",
    "Seven boxes hold 84 pencils in all. Giving 19 away leaves 65, and five more pencils make 70 altogether. The answer is 70",
    "Each box has twelve pencils and there are seven boxes, which is 84. Taking away nineteen gives 65. The answer is 65",
]


def test_evol_instruct_recipe_end_to_end(scripted, tmp_path):
    store = tmp_path / "store"
    recipe = load_recipe(ROOT / RECIPE, overrides=SETS)
    seeds = ingest_seeds(recipe.seeds).kept
    a, b, c, d, e = seeds["seed_id"].to_list()
    rewrite = SamplingSettings(recipe.evolve.temperature, recipe.evolve.top_p, recipe.evolve.max_tokens)
    first = {r["seed_id"]: r for r in evolution_requests(seeds, recipe.evolve, round_no=1, run_seed=recipe.generation.seed)}
    scripted.plant(first[a], f"#Rewritten Prompt#: {GOOD}", rewrite)
    scripted.plant(first[b], "Here is the rewritten prompt: the given prompt with one more constraint.", rewrite)
    scripted.plant(first[c], "I'm sorry, but I cannot rewrite this problem.", rewrite)
    scripted.plant(first[d], seeds["question"][3], rewrite)
    scripted.plant(first[e], "How many apples? " * (recipe.evolve.max_chars // 10), rewrite)
    child = pl.DataFrame({"seed_id": [f"{a}.e1"], "question": [GOOD]})
    (second,) = evolution_requests(child, recipe.evolve, round_no=2, run_seed=recipe.generation.seed)
    scripted.plant(second, HARDER, rewrite)
    problem = pl.DataFrame({"seed_id": [f"{a}.e1.e2"], "question": [HARDER]})
    for request, text in zip(build_requests(problem, recipe.generation), SOLUTIONS, strict=True):
        scripted.plant(request, text, SamplingSettings.from_config(recipe.generation))

    uri, manifest = run_flow(RECIPE, store, SETS)

    # what reached the engine: every request scripted and asked for once, in the flow's order
    assert scripted.unused() == [] and set(scripted.sources) == {"planted"}
    assert [n for _, n, _ in scripted.calls] == [5, 1, 3]  # round 1, round 2, sampling (one shard each)
    assert manifest["stats"]["generation_cache"] == {"hits": 0, "misses": 9}

    # row accounting: ingest -> evolve-1 -> evolve-2 -> synthesize (fanout 3) -> ...
    stages = check_stages(manifest, ["ingest", "evolve-1", "evolve-2", "synthesize", "verify", "score", "quality", "dedup"])
    round1, round2 = stages[1], stages[2]
    assert (round1["rows_in"], round1["rows_out"]) == (5, 1)
    assert round1["dropped"] == {"copied_prompt": 1, "unanswerable": 1, "no_change": 1, "too_long": 1}
    assert (round2["rows_in"], round2["rows_out"], round2["dropped"]) == (1, 1, {})
    assert (stages[3]["rows_in"], stages[3]["fanout"], stages[3]["rows_out"]) == (1, 3, 3)
    assert manifest["counts"]["published"] == 3

    # the failures are rejects of evolve-1, each with its reason
    rejects = pl.read_parquet(uri / "rejects")
    reasons = dict(zip(*rejects.filter(pl.col("stage") == "evolve-1").select("seed_id", "reason"), strict=True))
    assert reasons == {f"{b}.e1": "copied_prompt", f"{c}.e1": "unanswerable", f"{d}.e1": "no_change", f"{e}.e1": "too_long"}
    assert rejects.filter(pl.col("stage") == "evolve-1", pl.col("reason") == "no_change")["detail"][0].startswith("similarity 1.00")

    # the samples of the twice-evolved problem carry its chain: the seed, both rewrites, their templates
    rows = pl.read_parquet(uri / "data").sort("sample_index")
    assert rows["seed_id"].to_list() == [f"{a}.e1.e2"] * 3 and rows["completion"].to_list() == SOLUTIONS
    for row in rows.to_dicts():
        assert row["question"] == HARDER and row["root_id"] == a and row["parent_id"] == f"{a}.e1" and row["evol_round"] == 2
        chain = row["evol_chain"]
        assert [step["round"] for step in chain] == [1, 2]
        assert chain[0]["from"] == seeds["question"][0] and chain[1]["from"] == GOOD
        assert chain[0]["operation"] == first[a]["operation"] and chain[1]["operation"] == second["operation"]
        assert chain[1]["template"] == load_template("evol_instruct", chain[1]["operation"]).id
        assert row["reference_answer"] is None and row["majority_answer"] == "70"  # no reference: the vote labels
    assert rows["pseudo_correct"].to_list() == [True, True, False]
    assert rows["agreement"].to_list() == [2 / 3] * 3

    # lineage: the templates by version; the data card's counts per round
    templates = manifest["generator"]["evolve"]["prompt_templates"]
    assert templates == {op: load_template("evol_instruct", op).id for op in recipe.evolve.operations}
    per_round = manifest["stats"]["evolve"]["rounds"]
    assert per_round["1"] == {"instructions": 5, "kept": 1, "eliminated": dict(sorted(round1["dropped"].items())), "kept_by_operation": {first[a]["operation"]: 1}}
    assert per_round["2"]["instructions"] == 1 and per_round["2"]["kept_by_operation"] == {second["operation"]: 1}
    card = (uri / "card.md").read_text()
    assert "evolve-1" in card and "evolve-2" in card
    # and in the OpenLineage events: the run facet names the templates, by version
    events = [json.loads(p.read_text()) for p in (store / "_lineage").rglob("*.json")]
    complete = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"] == "synthesize"]
    assert complete and complete[0]["run"]["facets"]["distillery_run"]["promptTemplates"] == sorted(templates.values())
