"""Execute: programs in completions run in the sandbox; failures are dropped with the sandbox's reason."""

import json

import polars as pl
import pytest

from distillery.sandbox import isolation_layer
from distillery.stages.execute import execute_programs, extract_program, program_answer


def _completion(code: str, lang: str = "python") -> str:
    return f"Let me compute it.\n```{lang}\n{code}\n```\nThe program prints the answer."


ROWS = [
    ("correct", _completion("eggs = 16 - 3 - 4\nprint(eggs * 2)"), "18"),
    ("wrong", _completion("print(16 - 3 - 4)"), "18"),
    ("fraction", _completion("from fractions import Fraction\nprint(Fraction(1, 2))", lang=""), "0.5"),
    ("no_reference", _completion("print(7)"), None),
    ("no_program", "Janet has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18 dollars.\n#### 18", "18"),
    ("reads_outside", _completion("print(open('/etc/passwd').read())"), "18"),
    ("socket", _completion("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))\nprint(18)"), "18"),
    ("loop", _completion("while True:\n    pass"), "18"),
]


@pytest.fixture(scope="module")
def executed():
    rows = pl.DataFrame(
        {
            "sample_id": [r[0] for r in ROWS],
            "seed_id": ["p"] * len(ROWS),
            "completion": [r[1] for r in ROWS],
            "reference_answer": [r[2] for r in ROWS],
        }
    )
    return execute_programs(rows, timeout_s=1.0)


def test_kept_and_dropped_with_their_reasons(executed):
    kept = executed.kept
    assert kept["sample_id"].to_list() == ["correct", "wrong", "fraction", "no_reference"]
    reasons = dict(zip(executed.rejects["sample_id"], executed.rejects["reason"], strict=True))
    assert reasons == {"no_program": "no_program", "reads_outside": "forbidden", "socket": "forbidden", "loop": "timeout"}
    assert executed.count.dropped == {"no_program": 1, "forbidden": 2, "timeout": 1}


def test_counts_add_up(executed):
    count = executed.count
    assert count.stage == "execute"
    assert count.rows_in == len(ROWS)
    assert count.rows_out + sum(count.dropped.values()) == count.rows_in
    assert executed.kept.height == count.rows_out
    assert executed.rejects.height == sum(count.dropped.values())


def test_answers_and_correctness(executed):
    by_id = {row["sample_id"]: row for row in executed.kept.iter_rows(named=True)}
    assert by_id["correct"]["program_answer"] == "18"
    assert by_id["correct"]["program_correct"] is True
    assert by_id["wrong"]["program_answer"] == "9"
    assert by_id["wrong"]["program_correct"] is False  # kept: selection decides later
    assert by_id["fraction"]["program_answer"] == "1/2"
    assert by_id["fraction"]["program_correct"] is True  # 1/2 == 0.5 by math-verify
    assert by_id["no_reference"]["program_correct"] is None
    assert all(row["execution_seconds"] > 0 for row in by_id.values())


def test_reject_details_come_from_the_sandbox(executed):
    rejects = {row["sample_id"]: row for row in executed.rejects.iter_rows(named=True)}
    assert "/etc/passwd" in rejects["reads_outside"]["detail"]
    assert rejects["socket"]["detail"].startswith("socket.")
    assert "1 s" in rejects["loop"]["detail"]
    assert rejects["no_program"]["detail"]
    record = json.loads(rejects["reads_outside"]["record"])
    assert record["completion"].startswith("Let me compute it.")
    assert record["program_answer"] is None


@pytest.mark.parametrize(
    ("completion", "program"),
    [
        ("```python\nprint(1)\n```", "print(1)\n"),
        ("First:\n```python\nprint(1)\n```\nthen\n```\nprint(2)\n```\ndone", "print(2)\n"),
        ("```py\nx = 3\nprint(x)\n```\n```output\n3\n```", "x = 3\nprint(x)\n"),  # an output block is not a program
        ("  ```python\n  print(4)\n  ```", "print(4)\n"),
        ("No code here, the answer is 4.", None),
        ("```python\nprint(1)", None),  # unclosed: the completion was cut off
        ("```python\n\n```", None),
        ('```json\n{"a": 1}\n```', None),
    ],
)
def test_extract_program(completion, program):
    assert extract_program(completion) == program


@pytest.mark.parametrize(
    ("stdout", "answer"),
    [("3\n18\n", "18"), ("18\n\n  \n", "18"), ("The answer is 42\n", "42"), ("$1,234.\n", "1234"), ("", None), ("\n\n", None)],
)
def test_program_answer(stdout, answer):
    assert program_answer(stdout) == answer


def test_a_program_without_reference_column_and_an_error():
    rows = pl.DataFrame({"completion": [_completion("print(1/0)"), _completion("x = 1")]})
    result = execute_programs(rows)
    assert result.kept.height == 0
    assert result.rejects["reason"].to_list() == ["error", "no_output"]
    assert "ZeroDivisionError" in result.rejects["detail"][0]
    assert result.count.dropped == {"error": 1, "no_output": 1}


def test_missing_column_is_an_error():
    with pytest.raises(ValueError, match="no 'text' column"):
        execute_programs(pl.DataFrame({"completion": ["x"]}), column="text")


def test_the_sandbox_layer_is_in_the_meta_for_the_manifest(executed):
    assert executed.meta["sandbox"]["isolation"] == isolation_layer()
    plain = execute_programs(pl.DataFrame({"completion": [_completion("print(3)")]}), isolation="none")
    assert plain.meta["sandbox"] == {"isolation": "none", "setting": "none"}
    assert plain.kept["program_answer"].to_list() == ["3"]
