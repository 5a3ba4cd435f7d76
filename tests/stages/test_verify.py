"""Answer extraction and equivalence on the formats real completions have."""

import threading
import time

import polars as pl
import pytest

from distillery.stages.verify import (
    answers_match,
    boxed_contents,
    extract_answer,
    is_correct,
    match_status,
    match_statuses,
    reference_answer,
    too_complex,
    verify_samples,
)
from schemas.recipe import VerifyConfig


@pytest.mark.parametrize(
    ("completion", "expected", "source"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72", "72", "hash"),
        ("so the total is $1,234.\n#### 1,234", "1234", "hash"),
        ("The answer is 18 dollars.", "18", "answer_is"),
        ("The answer is $18.00.", "18.00", "answer_is"),
        ("The final answer is: 3.5 hours", "3.5", "answer_is"),
        ("Thus x = \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}", "boxed"),
        ("First \\boxed{2}, corrected: \\boxed{5}", "5", "boxed"),
        ("We get \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("Answer: 1,000,000", "1000000", "answer_is"),
        ("The answer is 42.", "42", "answer_is"),
        ("The answer is 25%.", "25", "answer_is"),
        ("The answer is -7", "-7", "answer_is"),
        ("So, the final answer is 3, and it is not the result.", "3", "answer_is"),
        ("So, the answer is 10 * 100 = 1000 shells.", "1000", "answer_is"),
        ("This is the final answer, which is 32.", "32", "answer_is"),
        ("I have no idea.", None, None),
        ("", None, None),
    ],
)
def test_extract_answer(completion, expected, source):
    found = extract_answer(completion)
    assert found.text == expected
    assert found.source == source


def test_last_number_fallback_is_opt_in():
    text = "She has 3 + 4 = 7 apples"
    assert extract_answer(text).text is None
    assert extract_answer(text, fallback_last_number=True).text == "7"


@pytest.mark.parametrize(
    ("predicted", "reference"),
    [
        ("72", "72"),
        ("72.0", "72"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\frac{3}{4}", "0.75"),
        ("1234", "1234"),
        ("18.00", "18"),
    ],
)
def test_equivalent_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(("predicted", "reference"), [("71", "72"), ("0.5", "\\frac{1}{3}"), ("7", "-7"), ("1243", "1234")])
def test_different_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_reference_answer_formats():
    assert reference_answer("Step one.\n#### 1,200", answer_format="gsm8k") == "1200"
    assert reference_answer("no hashes here", answer_format="gsm8k") is None
    assert reference_answer("27.0", answer_format="plain") == "27.0"


def test_several_boxes_count_together_only_for_list_references():
    hedge = extract_answer("maybe \\boxed{3} or \\boxed{5}")
    assert is_correct(hedge, "3, 5") is True
    assert is_correct(hedge, "3") is False  # hedging does not earn credit for the first box


def test_verify_samples_accounts_for_every_row():
    samples = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d"],
            "seed_id": ["s1", "s1", "s2", "s3"],
            "completion": ["#### 72", "The answer is 70.", "no answer here", "The answer is 9"],
            "reference_answer": ["72", "72", "5", None],
        }
    )
    result = verify_samples(samples, VerifyConfig(keep="correct"))
    assert result.kept["sample_id"].to_list() == ["a", "d"]
    assert result.kept.filter(pl.col("sample_id") == "d")["correct"].to_list() == [None]
    assert result.count.dropped == {"incorrect": 1, "no_final_answer": 1}
    assert sorted(result.rejects["reason"].to_list()) == ["incorrect", "no_final_answer"]
    assert result.count.rows_in == 4 and result.count.rows_out == 2

    kept_all = verify_samples(samples, VerifyConfig(keep="all"))
    assert kept_all.kept.height == 4
    assert kept_all.kept["correct"].to_list() == [True, False, False, None]


def test_verify_samples_reads_fallback_last_number_from_the_config():
    samples = pl.DataFrame({"sample_id": ["a"], "seed_id": ["s"], "completion": ["4 + 1 makes 5"], "reference_answer": ["5"]})
    assert verify_samples(samples, VerifyConfig()).count.dropped == {"no_final_answer": 1}
    fallback = verify_samples(samples, VerifyConfig(fallback_last_number=True))
    assert fallback.kept["correct"].to_list() == [True] and fallback.kept["answer_source"].to_list() == ["last_number"]


# --- answers that would stall math-verify: judged wrong within a bound, with their own reason ---

_NESTED = "{" * 3000 + "1" + "}" * 3000
_PATHOLOGICAL = [
    # (final answer, the reason it is dropped under): the pre-check refuses the known classes
    ("9^{9^{9^{9}}}", "answer_too_complex"),  # a tower of powers: sympy computes the integer
    ("9^{9^{9}}", "answer_too_complex"),
    ("10^{10^{100}}", "answer_too_complex"),
    ("(99999)!", "answer_too_complex"),  # (normalization reads "99999!" as 99999 and a unit)
    ("(10^{100})!", "answer_too_complex"),
    (_NESTED, "answer_too_complex"),  # a few thousand nested braces
    ("{" * 14 + "1" + "}" * 14, "answer_too_complex"),  # short, but 14 deep: seconds in the parser
    ("\\frac{" * 20 + "1" + "}{2}" * 20, "answer_too_complex"),
    ("x+" * 20_000 + "1", "answer_too_complex"),  # very long
    # ...and the time bound stops what no pre-check knows: this polynomial is expanded for seconds
    ("(x+1)^{1000}", "verify_timeout"),
]


def _rows(answers: list[str], reference: str = "5") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": [f"p{i}" for i in range(len(answers))] + ["ok1", "ok2", "ok3"],
            "seed_id": ["s"] * (len(answers) + 3),
            "completion": [f"So the answer is \\boxed{{{a}}}." for a in answers]
            + ["#### 5", "\\boxed{\\frac{10}{2}}", "The answer is 6."],
            "reference_answer": [reference] * (len(answers) + 3),
        }
    )


@pytest.mark.parametrize(("answer", "reason"), _PATHOLOGICAL, ids=lambda v: v[:24] if isinstance(v, str) else None)
def test_a_pathological_answer_is_judged_wrong_quickly_with_its_reason(answer, reason):
    started = time.monotonic()
    result = verify_samples(_rows([answer]), VerifyConfig(keep="correct", timeout_s=1.0))
    assert time.monotonic() - started < 5
    assert result.count.as_dict() == {
        "stage": "verify",
        "rows_in": 4,
        "rows_out": 2,
        "fanout": 1,
        "dropped": {reason: 1, "incorrect": 1},
    }
    assert result.kept["sample_id"].to_list() == ["ok1", "ok2"]
    (detail,) = result.rejects.filter(pl.col("sample_id") == "p0")["detail"]
    assert result.rejects.filter(pl.col("sample_id") == "p0")["reason"].to_list() == [reason]
    assert len(detail) < 400 and ("not compared" in detail or "no result within 1 s" in detail)


def test_pathological_answers_together_from_a_thread_keep_every_row():
    """Every class in one shard, verified from a non-main thread (as in a Ray task or a thread
    pool): math-verify's own signal-based timeouts cannot work there; this bound does."""
    answers = [a for a, _ in _PATHOLOGICAL]
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("result", verify_samples(_rows(answers), VerifyConfig(timeout_s=1.0))))
    started = time.monotonic()
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "verify did not return"
    result = out["result"]
    assert time.monotonic() - started < 5 * 2  # two time-bound hits at most here
    # no row lost or doubled: each pathological answer is dropped once, under its own reason
    assert result.count.rows_in == len(answers) + 3 and result.count.rows_out == 2
    assert sorted(result.rejects["sample_id"].to_list()) == sorted([f"p{i}" for i in range(len(answers))] + ["ok3"])
    by_id = dict(zip(result.rejects["sample_id"], result.rejects["reason"], strict=True))
    assert [by_id[f"p{i}"] for i in range(len(answers))] == [r for _, r in _PATHOLOGICAL]
    assert by_id["ok3"] == "incorrect"


def test_keep_all_keeps_pathological_answers_as_wrong():
    result = verify_samples(_rows(["9^{9^{9^{9}}}", _NESTED]), VerifyConfig(keep="all", timeout_s=1.0))
    assert result.count.dropped == {} and result.kept.height == 5
    assert result.kept["correct"].to_list() == [False, False, True, True, False]


def test_threads_verify_at_the_same_time():
    # Each thread holds its own worker (no lock around the checks): all three are up at once.
    # Counted, not timed: a wall-clock bound here measured the machine's load (three sympy imports).
    from distillery.stages import verify as verify_module

    results: list = [None] * 3
    peak, done = [0], threading.Event()

    def run(k):
        results[k] = verify_samples(_rows(["(x+1)^{1000}", "\\frac{1}{2}"], reference="0.5"), VerifyConfig(timeout_s=1.0))

    def watch():
        while not done.is_set():
            with verify_module._LOCK:
                busy = len(verify_module._LIVE) - len(verify_module._IDLE)
            peak[0] = max(peak[0], busy)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    done.set()
    watcher.join()
    assert not any(t.is_alive() for t in threads)
    assert peak[0] == 3
    for result in results:
        assert result.count.dropped == {"verify_timeout": 1, "incorrect": 3}
        assert result.kept["sample_id"].to_list() == ["p1"]


def test_the_time_bound_is_per_comparison_and_the_worker_comes_back():
    # answers_match is bounded too (select's majority vote and execute use it)
    for check in (match_status, answers_match):
        assert answers_match("x+1", "1+x")  # a worker up (starting one is not part of the bound)
        started = time.monotonic()
        assert check("(x+1)^{1000}", "5", timeout_s=0.5) in ("verify_timeout", False)
        assert time.monotonic() - started < 5
    assert answers_match("\\sqrt{18}", "3\\sqrt{2}") and not answers_match("\\sqrt{18}", "2\\sqrt{3}")
    assert match_status("9^{9^{9^{9}}}", "9^{9^{9^{9}}}") == "match"  # the same string needs no math
    assert match_status("9**9**9**9", "5") == "answer_too_complex"  # plain-expression towers too
    assert match_status("99999!", "5") == "answer_too_complex"


_ORDINARY = [
    "72", "-3.5", "\\frac{3}{4}", "2^{10}", "3^{2023}", "2^{2^{10}}", "10^{100}", "1000!", "e^{x^2}",
    "\\sqrt{\\frac{\\sqrt{2}}{\\sqrt{3}}}", "\\left(\\frac{1}{2}, \\sqrt{3}\\right)", "\\binom{10}{5}", "x^{2}+2x+1",
    "[0, 1)", "\\{1, 2, 3\\}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "12 \\pi", "\\frac{\\pi}{2}", "5!", "(5!)!",
]  # fmt: skip


@pytest.mark.parametrize("answer", _ORDINARY)
def test_ordinary_answers_are_not_refused(answer):
    assert too_complex(answer) is None


def test_bounded_and_unbounded_paths_agree_on_ordinary_answers():
    pairs = [("72", "72"), ("72.0", "72"), ("0.5", "\\frac{1}{2}"), ("1/2", "0.5"), ("\\frac{3}{4}", "0.75"), ("71", "72"),
             ("7", "-7"), ("\\sqrt{18}", "3\\sqrt{2}"), ("x+1", "1+x"), ("3, 5", "5, 3"), ("\\pi", "3.14")]  # fmt: skip
    assert match_statuses(pairs) == match_statuses(pairs, bounded=False)


def test_boxed_contents_is_linear_in_nested_boxes():
    text = "\\boxed{" * 20_000 + "7" + "}" * 20_000
    started = time.monotonic()
    boxes = boxed_contents(text)
    assert time.monotonic() - started < 2
    assert len(boxes) == 64 and boxes[-1] == "7"  # the last (innermost) ones: memory stays linear
    assert extract_answer(text).text == "7"
    assert boxed_contents("a \\boxed{x \\boxed{y}} b \\fbox{ {z} } \\boxed{open") == ["x \\boxed{y}", "y", "{z}"]
