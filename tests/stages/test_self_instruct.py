"""Self-Instruct and Ensemble-Instruct stage functions: prompts from the pool, the parse, the
ROUGE-L filter against the pool and earlier new tasks (planted near-copies must go), the
agreement filter, and the row accounting."""

import json

import polars as pl

from distillery.prompts import load_template
from distillery.stages.self_instruct import agreement, consensus, new_tasks, parse_task, rouge_l, solve_requests, task_requests
from schemas.recipe import SamplingMember, SelfInstructConfig

POOL = pl.DataFrame(
    {
        "seed_id": ["p0", "p1", "p2", "p3"],
        "question": [
            "Ava has 12 apples. She buys 7 more and gives 5 to a friend. How many apples does she have now?",
            "A train travels 60 km each hour. How far does it travel in 4 hours?",
            "Ben reads 15 pages a day. How many pages does he read in 6 days?",
            "A box holds 8 pens. How many pens are in 9 boxes?",
        ],
        "reference_answer": ["14", "240", "90", "72"],
        "source": ["test"] * 4,
    }
)


def _r(text, error=None):
    return {"completion": text, "finish_reason": "stop", "num_tokens": 10, "error": error}


def test_requests_show_the_seed_first_and_are_seeded():
    cfg = SelfInstructConfig(per_seed=2, examples=3)
    requests = task_requests(POOL, cfg, run_seed=0)
    assert len(requests) == 8 and [r["seed_id"] for r in requests[:2]] == ["p0", "p0"]
    assert all(r["examples"][0] == r["seed_id"] and len(set(r["examples"])) == 3 for r in requests)
    assert requests == task_requests(POOL, cfg, run_seed=0)
    assert len({r["sampling_seed"] for r in requests}) == 8
    content = requests[0]["messages"][0]["content"]
    assert POOL["question"][0] in content and "Problem 4:" in content
    assert requests[0]["template"] == load_template("self_instruct", "new_task").id


def test_parse_and_rouge():
    assert parse_task("Problem 5: Mia has 3 cats.\n\nProblem 6: more") == "Mia has 3 cats."
    assert parse_task("  Kofi buys 4 pens.  ") == "Kofi buys 4 pens."
    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("a b c d", "w x y z") == 0.0


def test_new_tasks_drop_near_copies_of_the_pool_and_of_each_other():
    cfg = SelfInstructConfig(per_seed=2, examples=2, max_chars=500)
    requests = task_requests(POOL, cfg, run_seed=0)
    fresh = "A baker makes 24 muffins and sells them in bags of 3. How many bags does the baker fill?"
    results = [
        _r(f"Problem 3: {fresh}"),  # kept
        _r("Ava has 12 apples. She buys 8 more and gives 5 to a friend. How many apples does she have now?"),  # near-copy of p0
        _r("A baker makes 24 muffins and sells them in bags of 3. How many bags can the baker fill?"),  # near-copy of the first new one
        _r("Hi"),  # too short
        _r(""),  # empty
        _r(None, error="EngineDeadError: gone"),
        _r("Lena plants 5 rows of 7 tulips and 3 rows of 4 roses. How many flowers does she plant?"),  # kept
        _r("x" * 2000),  # too long
    ]
    out = new_tasks(POOL, requests, results, cfg)
    assert out.count.as_dict() == {
        "stage": "self-instruct", "rows_in": 4, "rows_out": 2, "fanout": 2,
        "dropped": {"empty": 1, "generation_error": 1, "too_long": 1, "too_short": 1, "too_similar": 2},
    }
    assert out.kept["seed_id"].to_list() == ["p0.si0", "p3.si0"] and out.kept["question"][0] == fresh
    assert out.kept["parent_id"].to_list() == ["p0", "p3"] and out.kept["reference_answer"].is_null().all()
    similar = out.rejects.filter(pl.col("reason") == "too_similar")
    nearest = [json.loads(r)["nearest_id"] for r in similar["record"]]
    assert nearest == ["p0", "p0.si0"]  # one copies the pool, the other a new task kept before it
    assert all(json.loads(r)["rouge_l"] >= 0.7 for r in similar["record"])


def test_agreement_keeps_tasks_the_members_agree_on_and_sets_their_answer():
    tasks = pl.DataFrame({"seed_id": ["t0", "t1", "t2"], "question": ["q0", "q1", "q2"], "reference_answer": [None, None, None]}, schema_overrides={"reference_answer": pl.Utf8})
    cfg = SelfInstructConfig(members=[SamplingMember(temperature=t) for t in (0.2, 0.8, 1.0)], min_agreement=2)
    assert len(solve_requests(tasks, cfg, run_seed=0)) == 3
    members = [
        [_r("so 8 bags. The answer is 8"), _r("The answer is 5"), _r("no idea")],
        [_r("The answer is 8.0"), _r("The answer is 6"), _r("hmm")],
        [_r("#### 7"), _r("The answer is 7"), _r("The answer is N")],  # "N": the template echoed, no answer
    ]
    out = agreement(tasks, members, cfg)
    assert out.count.dropped == {"no_agreement": 1, "no_answer": 1}
    assert out.kept["seed_id"].to_list() == ["t0"] and out.kept["reference_answer"].to_list() == ["8"]
    assert out.kept["member_agreement"].to_list() == [round(2 / 3, 4)]
    assert consensus(["1/2", "0.5", "3"]) == ("1/2", 2)
