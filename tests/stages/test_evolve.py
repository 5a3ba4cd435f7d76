"""Evol-Instruct's stage functions: versioned templates, seeded operations, the elimination of
failed evolutions (planted cases, each with its reason) and the evolution chain over rounds."""

import json

import polars as pl
import pytest

from distillery.stages.evolve import (
    OPERATIONS,
    clean_evolved,
    elimination_reason,
    evolution_requests,
    evolve_round,
    load_template,
    pick_operation,
)
from schemas.recipe import EvolveConfig

SEEDS = pl.DataFrame(
    {
        "seed_id": [f"q{i}" for i in range(7)],
        "question": [
            "Tom has 3 apples and buys 4 more. How many apples does he have?",
            "A train travels 60 km in 1 hour. How far does it travel in 3 hours?",
            "Sara reads 12 pages a day. How many pages does she read in a week?",
            "A box holds 8 pens. How many pens are in 5 boxes?",
            "Mia has 20 dollars and spends 7. How much is left?",
            "There are 9 birds on a tree and 4 fly away. How many are left?",
            "A farmer has 15 cows and sells 6. How many cows remain?",
        ],
        "reference_answer": ["7", "180", "84", "40", "13", "5", "9"],
        "source": ["test"] * 7,
    }
)


def _result(text, error=None):
    return {"completion": text, "finish_reason": "stop" if error is None else "error", "num_tokens": 10, "error": error}


def test_templates_are_versioned_and_render_the_instruction():
    for op in OPERATIONS:
        template = load_template("evol_instruct", op)
        assert template.id.startswith(f"evol_instruct/{op}@") and len(template.version) == 12
        assert "How far does it travel" in template.render(question=SEEDS["question"][1])
    depth = {load_template("evol_instruct", op).version for op in OPERATIONS}
    assert len(depth) == len(OPERATIONS)  # each operation's full text differs, so does its version
    with pytest.raises(ValueError, match="no prompt template evol_instruct/widen.j2"):
        load_template("evol_instruct", "widen")


def test_operations_are_seeded_and_all_used():
    picks = [pick_operation(0, f"q{i}", 1) for i in range(200)]
    assert set(picks) == set(OPERATIONS)
    assert picks == [pick_operation(0, f"q{i}", 1) for i in range(200)]  # a rerun picks the same
    assert picks != [pick_operation(0, f"q{i}", 2) for i in range(200)]  # the next round picks anew
    requests = evolution_requests(SEEDS, EvolveConfig(), round_no=1, run_seed=0)
    assert [r["seed_id"] for r in requests] == SEEDS["seed_id"].to_list()
    assert all(r["template"] == load_template("evol_instruct", r["operation"]).id for r in requests)
    assert len({r["sampling_seed"] for r in requests}) == len(requests)
    assert [r["operation"] for r in requests] == [pick_operation(0, f"q{i}", 1) for i in range(7)]  # the default: all operations
    only = evolution_requests(SEEDS, EvolveConfig(operations=["deepen", "breadth"]), round_no=1, run_seed=0)
    assert [r["operation"] for r in only] == [pick_operation(0, f"q{i}", 1, ("deepen", "breadth")) for i in range(7)]


def test_clean_and_eliminate():
    assert clean_evolved('#Rewritten Prompt#: "Tom has 3 apples."') == "Tom has 3 apples."
    assert clean_evolved("Rewritten prompt:\nWhat is 2 + 2?") == "What is 2 + 2?"
    parent = SEEDS["question"][0]
    harder = "Tom has 3 apples, buys 4 more and gives half of them to Ann. How many apples does he keep?"
    assert elimination_reason(parent, harder, max_chars=500, max_similarity=0.9) is None
    assert elimination_reason(parent, parent.upper(), max_chars=500, max_similarity=0.9) == "no_change"
    assert elimination_reason(parent, "The given prompt asks about apples.", max_chars=500, max_similarity=0.9) == "copied_prompt"
    assert elimination_reason(parent, "I'm sorry, but I cannot rewrite that.", max_chars=500, max_similarity=0.9) == "unanswerable"
    assert elimination_reason(parent, harder, max_chars=40, max_similarity=0.9) == "too_long"
    assert elimination_reason(parent, "", max_chars=500, max_similarity=0.9) == "empty"


def test_a_round_keeps_good_evolutions_with_their_chain_and_rejects_the_planted_failures():
    requests = evolution_requests(SEEDS, EvolveConfig(), round_no=1, run_seed=0)
    results = [
        _result("#Rewritten Prompt#: Tom has 3 apples and buys 4 more bags of 6 apples each. How many apples does he have?"),
        _result("A train travels 60 km in 1 hour. How far does it travel in 3 hours?"),  # no change
        _result("Sara reads 12 pages a day. Rewrite the given prompt to ask about a week."),  # copied
        _result("Sorry, I cannot help with that request."),  # unanswerable
        _result("A box holds 8 pens. " + "It is a very nice box. " * 80),  # too long
        _result(None, error="EngineDeadError: engine core died"),
        _result("A pond has 9 ducks; 4 leave and twice as many arrive. How many ducks are there now?"),
    ]
    out = evolve_round(SEEDS, requests, results, EvolveConfig(max_chars=400), round_no=1)
    assert out.count.as_dict() == {
        "stage": "evolve-1",
        "rows_in": 7,
        "rows_out": 2,
        "fanout": 1,
        "dropped": {"copied_prompt": 1, "generation_error": 1, "no_change": 1, "too_long": 1, "unanswerable": 1},
    }
    assert out.kept["seed_id"].to_list() == ["q0.e1", "q6.e1"]
    assert out.kept["question"][0].startswith("Tom has 3 apples and buys 4 more bags")  # label stripped
    assert out.kept["reference_answer"].is_null().all()  # a new problem has a new answer
    chain = out.kept["evol_chain"][0].to_list()
    assert chain == [{"round": 1, "operation": requests[0]["operation"], "template": requests[0]["template"], "from": SEEDS["question"][0]}]
    by_reason = dict(zip(out.rejects["reason"], out.rejects["seed_id"], strict=True))
    assert by_reason == {"no_change": "q1.e1", "copied_prompt": "q2.e1", "unanswerable": "q3.e1", "too_long": "q4.e1", "generation_error": "q5.e1"}
    error = out.rejects.filter(pl.col("reason") == "generation_error")
    assert "EngineDeadError" in error["detail"][0] and json.loads(error["record"][0])["parent_id"] == "q5"

    # round 2 evolves the survivors: the chain grows, the root stays
    requests2 = evolution_requests(out.kept, EvolveConfig(), round_no=2, run_seed=0)
    second = evolve_round(out.kept, requests2, [_result("Tom has 3 apples and buys 4 more bags of 6 apples each, then eats 5. How many apples are left?"), _result("")], EvolveConfig(), round_no=2)
    assert second.kept["seed_id"].to_list() == ["q0.e1.e2"] and second.count.dropped == {"empty": 1}
    assert second.kept["root_id"].to_list() == ["q0"] and second.kept["parent_id"].to_list() == ["q0.e1"]
    assert [step["round"] for step in second.kept["evol_chain"][0].to_list()] == [1, 2]
