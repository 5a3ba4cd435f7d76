"""Difficulty-targeted generation's stage functions: pass rates from verified samples, harder
variants of always-solved problems and simpler ones of never-solved problems (planted failures
eliminated), the accounting, and the difficulty labels."""

import polars as pl

from distillery.prompts import load_template
from distillery.stages.difficulty import direction, label, probe, retarget, variant_requests
from schemas.recipe import DifficultyConfig

PROBLEMS = pl.DataFrame(
    {
        "seed_id": ["p0", "p1", "p2", "p3", "p4"],
        "question": [
            "What is 2 + 3?",
            "Ava has 40 marbles, loses 13 and finds 6. How many does she have?",
            "A box holds 12 eggs. How many eggs are in 7 boxes?",
            "What is 9 + 1?",
            "Ben has 7 cards and buys 5 more. How many cards does he have?",
        ],
        "reference_answer": ["5", "33", "84", "10", "12"],
        "source": ["t"] * 5,
    }
)
# p0 always solved, p1 never, p2 half, p3 always, p4 never (4 samples each)
VERIFIED = pl.DataFrame(
    {
        "seed_id": [s for s in PROBLEMS["seed_id"] for _ in range(4)],
        "correct": [True] * 4 + [False] * 4 + [True, False, True, False] + [True] * 4 + [False] * 4,
    }
)


def _r(text, error=None):
    return {"completion": text, "finish_reason": "stop", "num_tokens": 9, "error": error}


def test_probe_and_directions():
    probed = probe(PROBLEMS, VERIFIED)
    assert probed.count.as_dict() == {"stage": "probe", "rows_in": 5, "rows_out": 5, "fanout": 1, "dropped": {}}
    assert probed.kept["probe_pass_rate"].to_list() == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert [direction(r) for r in probed.kept["probe_pass_rate"]] == ["harder", "simpler", None, "harder", "simpler"]
    assert direction(None) is None


def test_retarget_keeps_originals_and_good_variants():
    probed = probe(PROBLEMS, VERIFIED).kept
    requests = variant_requests(probed, run_seed=0)
    assert [(r["seed_id"], r["direction"]) for r in requests] == [("p0", "harder"), ("p1", "simpler"), ("p3", "harder"), ("p4", "simpler")]
    assert requests[0]["template"] == load_template("difficulty", "harder").id and "What is 2 + 3?" in requests[0]["messages"][0]["content"]
    results = [
        _r("Harder problem: Mia has 2 apples, buys 3 more, then doubles them. How many apples does she have?"),
        _r("Ava has 10 marbles and finds 6. How many does she have?"),
        _r("What is 9 + 1?"),  # no change
        _r(None, error="EngineDeadError: x"),
    ]
    out = retarget(probed, requests, results, DifficultyConfig())
    assert out.count.as_dict() == {"stage": "retarget", "rows_in": 5, "rows_out": 7, "fanout": 2, "dropped": {"generation_error": 1, "no_change": 1, "not_targeted": 1}}
    variants = out.kept.filter(pl.col("variant_of").is_not_null())
    assert variants["seed_id"].to_list() == ["p0.harder", "p1.simpler"]
    assert variants["question"][0].startswith("Mia has 2 apples") and variants["reference_answer"].is_null().all()
    assert variants["variant_template"].to_list() == [load_template("difficulty", "harder").id, load_template("difficulty", "simpler").id]
    assert out.kept.filter(pl.col("variant_of").is_null())["seed_id"].to_list() == PROBLEMS["seed_id"].to_list()
    assert dict(zip(out.rejects["seed_id"], out.rejects["reason"], strict=True)) == {"p2.variant": "not_targeted", "p3.harder": "no_change", "p4.simpler": "generation_error"}


def test_labels():
    samples = pl.DataFrame({"seed_id": ["a", "a", "b", "b", "c", "c", "d"], "correct": [True, True, True, False, False, False, None]})
    out = label(samples, DifficultyConfig(easy_at=0.8, hard_at=0.2))
    assert out["difficulty"].to_list() == ["easy", "easy", "medium", "medium", "hard", "hard", None]
    assert out["pass_rate"].to_list()[:6] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
