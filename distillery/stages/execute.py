"""Execute: run the program in a program-of-thought completion and check its answer.

For each row, :func:`extract_program` takes the last fenced Python code block of the completion
(```` ```python ```` / ```` ```py ```` or a fence without a language; ```` ```output ```` and other
languages are not programs). The program runs in the sandbox (:func:`distillery.sandbox.run_python`:
a child process with memory, CPU and wall-clock limits, in a process-isolation layer where one can
be had: no network, no files outside its scratch directory; ``meta["sandbox"]`` says which layer).
The last non-empty line it prints is its answer.

Columns added: ``program_answer`` (the answer, normalized like verify's), ``program_correct``
(:func:`~distillery.stages.verify.answers_match` against ``reference_answer``; null when the row
has no reference) and ``execution_seconds`` (null when there was no program).

Drop reasons, the first that applies: ``no_program``, then the sandbox's reason: ``timeout``,
``memory_limit``, ``forbidden``, ``error``, ``no_output``; the reject ``detail`` is the
sandbox's (the refused event, the last line of the traceback, ...). A program that ran but
printed a wrong answer is kept with ``program_correct = False``: selection decides later.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import polars as pl

from distillery.accounting import StageCount, StageResult, rows_to_rejects
from distillery.sandbox import SandboxResult, isolation_info, run_python
from distillery.stages.verify import answers_match, extract_answer, normalize_answer

STAGE = "execute"
WORKERS = 2  # each row is a subprocess; more would only contend for the cores

# A fenced block: an opening fence at the start of a line with an optional language, the body,
# and a closing fence at the start of a line. An unclosed block (a truncated completion) is not a program.
_FENCE = re.compile(r"^[ \t]*```[ \t]*(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
_PYTHON_LANGS = {"", "python", "python3", "py", "py3"}


def extract_program(completion: str) -> str | None:
    """The last fenced Python (or unlabelled) code block of the completion; None if there is none."""
    if not completion or "```" not in completion:
        return None
    programs = [m.group("body") for m in _FENCE.finditer(completion) if m.group("lang").lower() in _PYTHON_LANGS]
    for body in reversed(programs):
        program = textwrap.dedent(body).strip("\n")
        if program.strip():
            return program + "\n"
    return None


def program_answer(stdout: str) -> str | None:
    """The answer a program printed: its last non-empty line, normalized.

    A line that states its answer (``The answer is 42``, ``#### 42``, ``\\boxed{42}``) gives the
    stated value; any other line is normalized as a whole (``$1,234.`` -> ``1234``).
    """
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    stated = extract_answer(lines[-1])
    answer = stated.text if stated.text else normalize_answer(lines[-1])
    return answer or None


def execute_programs(
    rows: pl.DataFrame,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    column: str = "completion",
    isolation: str | None = None,
) -> StageResult:
    """Run each row's program in the sandbox; keep the rows whose program printed an answer.

    ``isolation`` is the sandbox's setting (:func:`distillery.sandbox.isolation_layer`: ``auto``,
    ``required``, ``bwrap``, ``unshare`` or ``none``); the layer every program ran in is in
    ``meta["sandbox"]`` (``{"isolation": ..., "setting": ...}``, and a ``warning`` without one),
    for the manifest. ``required`` without a layer raises before any program runs.
    """
    if column not in rows.columns:
        msg = f"execute: the rows have no {column!r} column (columns: {rows.columns})"
        raise ValueError(msg)
    sandbox = isolation_info(isolation)
    completions = rows.get_column(column).cast(pl.Utf8).to_list()
    references = (
        rows.get_column("reference_answer").cast(pl.Utf8).to_list()
        if "reference_answer" in rows.columns
        else [None] * rows.height
    )
    programs = [extract_program(c or "") for c in completions]

    def run(program: str | None) -> SandboxResult | None:
        if program is None:
            return None
        return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, isolation=sandbox["isolation"])

    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="execute") as pool:
        results = list(pool.map(run, programs))

    answers: list[str | None] = []
    correct: list[bool | None] = []
    seconds: list[float | None] = []
    reasons: list[str | None] = []
    details: list[str | None] = []
    for result, reference in zip(results, references, strict=True):
        if result is None:
            answers.append(None)
            correct.append(None)
            seconds.append(None)
            reasons.append("no_program")
            details.append("no fenced Python code block in the completion")
            continue
        seconds.append(round(result.seconds, 4))
        answer = program_answer(result.stdout) if result.ok else None
        answers.append(answer)
        correct.append(answers_match(answer, reference) if answer is not None and reference is not None else None)
        # A program whose output is all blank lines printed no answer: the sandbox calls that no_output too.
        reason = result.reason or (None if answer is not None else "no_output")
        reasons.append(reason)
        details.append(result.detail if result.reason else (None if reason is None else "the program printed no answer"))

    executed = rows.with_columns(
        pl.Series("program_answer", answers, dtype=pl.Utf8),
        pl.Series("program_correct", correct, dtype=pl.Boolean),
        pl.Series("execution_seconds", seconds, dtype=pl.Float64),
    )
    keep = pl.Series([r is None for r in reasons], dtype=pl.Boolean)
    kept = executed.filter(keep)
    dropped_idx = [i for i, r in enumerate(reasons) if r is not None]
    rejects = rows_to_rejects(STAGE, executed.filter(~keep), [reasons[i] for i in dropped_idx], [details[i] for i in dropped_idx])
    dropped = dict(Counter(reasons[i] for i in dropped_idx))
    count = StageCount(STAGE, rows.height, kept.height, 1, dropped).check()
    return StageResult(STAGE, kept, rejects, count, meta={"sandbox": sandbox})
