"""Verify: extract the final answer of a completion and compare it with the reference.

Extraction is where graders go wrong most often, so the order is explicit and every row
records which rule found its answer (``answer_source``):

1. ``#### 42``: the GSM8K convention (the last one wins);
2. ``\\boxed{...}``: the last boxed expression (balanced braces, so ``\\boxed{\\frac{1}{2}}``
   survives); several boxes only count together when the reference itself is a list;
3. ``The answer is ...`` / ``Final answer: ...`` (the last one wins);
4. optionally, the last number in the text (``fallback_last_number`` in the recipe).

The extracted text is normalized (thousands separators, currency, units, trailing
period, ``\\dfrac``) and compared with the reference by math-verify, which knows that
``0.5``, ``1/2`` and ``\\frac{1}{2}`` are the same number.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from distillery.accounting import StageResult
from distillery.stages.verify_worker import unbounded_match
from schemas.recipe import VerifyConfig

_HASH_ANSWER = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?\s*[:：]?|answer\s*[:：])\s*[:：]?\s*(.+)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?:/\d+)?")
_LEADING_NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_WRAPPERS = (r"\text{", r"\textbf{", r"\mathrm{", r"\mbox{")
MAX_BOXES = 64  # boxed answers kept per completion (the last ones)
_BRACES = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")


@dataclass(frozen=True)
class ExtractedAnswer:
    text: str | None
    source: str | None  # "hash" | "boxed" | "answer_is" | "last_number" | None
    all_boxed: tuple[str, ...] = ()


def boxed_contents(text: str) -> list[str]:
    r"""Every ``\boxed{...}`` (or ``\fbox{...}``) body in order, with nested braces kept.

    One pass with a stack of open braces (linear, however many boxes are nested); a box whose
    brace never closes is skipped; only the last :data:`MAX_BOXES` count (boxes nested thousands
    deep would otherwise make a body list quadratic in the text's length)."""
    found: list[tuple[int, int]] = []
    open_braces: list[int] = []  # content start of each open brace; negative: not a box
    for match in _BRACES.finditer(text):
        token = match.group(0)
        if token == "}":
            if open_braces:
                start = open_braces.pop()
                if start >= 0:
                    found.append((start, match.start()))
        else:
            open_braces.append(match.end() if token != "{" else -1)
    return [text[start:end].strip() for start, end in sorted(found)[-MAX_BOXES:]]


def normalize_answer(answer: str) -> str:
    """Strip what is not part of the value: ``$1,234.00.`` -> ``1234.00``; ``12 cm`` -> ``12``."""
    s = answer.strip()
    s = s.strip("$ ").replace("\\$", "").replace("\\%", "%").replace("\\!", "")
    for wrapper in _LATEX_WRAPPERS:
        s = s.replace(wrapper, "{")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.rstrip(" .。")
    s = _THOUSANDS.sub("", s)
    s = s.replace("$", "").strip()
    # A number followed by words is a number with a unit ("18 dollars", "5 cm", "3 hours.").
    leading = _LEADING_NUMBER.match(s)
    if leading and not re.search(r"[\\{}^=]", s[leading.end():]):
        s = leading.group(0).replace(" ", "")
    return s.rstrip("%").strip()


def extract_answer(text: str, *, fallback_last_number: bool = False) -> ExtractedAnswer:
    """Find the final answer of a completion (see the module docstring for the order)."""
    if not text:
        return ExtractedAnswer(None, None)
    hashes = _HASH_ANSWER.findall(text)
    if hashes:
        return ExtractedAnswer(normalize_answer(hashes[-1].splitlines()[0]), "hash")
    boxed = boxed_contents(text)
    if boxed:
        return ExtractedAnswer(normalize_answer(boxed[-1]), "boxed", tuple(normalize_answer(b) for b in boxed))
    stated = [m.group(1) for m in _ANSWER_IS.finditer(text)]
    for candidate in reversed(stated):
        line = candidate.splitlines()[0].strip()
        # "This is the final answer, which is 32." -> "32"
        line = re.sub(r"^[,;:\s]*(?:(?:which|that)\s+(?:is|gives)\b)?\s*", "", line, flags=re.IGNORECASE)
        if "=" in line and "\\" not in line:  # "the answer is 10 * 100 = 1000 shells": the value is last
            line = line.rsplit("=", 1)[1].strip()
        if not line:
            continue
        # "The answer is 42 apples because ..." -> keep the value, not the prose around it.
        number = _NUMBER.search(line)
        value = normalize_answer(line)
        if number and not re.search(r"\\frac|\\sqrt|\^", line) and number.start() <= 2:
            value = normalize_answer(number.group(0))
        if value:
            return ExtractedAnswer(value, "answer_is")
    if fallback_last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return ExtractedAnswer(normalize_answer(numbers[-1]), "last_number")
    return ExtractedAnswer(None, None)


def reference_answer(raw: str, *, answer_format: str) -> str | None:
    """The reference value of a seed's answer field: after ``####`` for GSM8K, else the field."""
    raw = raw.strip()
    if answer_format == "gsm8k":
        hashes = _HASH_ANSWER.findall(raw)
        if not hashes:
            return None
        return normalize_answer(hashes[-1])
    return normalize_answer(raw) or None


# --- bounded equivalence ----------------------------------------------------------------------
#
# math-verify can run for ever on a few short strings: a tower of powers (9^{9^{9^{9}}}: sympy
# computes the integer), a dozen nested braces (its LaTeX parser backtracks exponentially), a
# polynomial power ((x+1)^{1000}: expanded). Its own timeouts use signal.alarm, which works only
# in a process's main thread (verify runs in Ray tasks and threads) and cannot stop one long C
# call such as a big integer power. So every comparison is bounded twice:
#
# 1. a pre-check on both strings, deterministic and cheap, refuses the known classes outright
#    (:func:`too_complex`: reason ``answer_too_complex``);
# 2. the comparison itself runs in a worker process (:mod:`distillery.stages.verify_worker`)
#    that is killed and replaced when one check runs past ``timeout_s`` (reason
#    ``verify_timeout``). Plain numbers (``72``, ``-3.5``, ``7/2``, ``\frac{7}{2}``), the bulk of
#    math word-problem answers, cannot blow up and are compared in process: no round trip.
#
# A refused or timed-out answer is judged wrong (``correct`` False) and, with keep="correct",
# dropped under its own reason instead of "incorrect".

MATCH, NO_MATCH = "match", "no_match"
TOO_COMPLEX, TIMEOUT = "answer_too_complex", "verify_timeout"  # also the drop reasons
VERIFY_TIMEOUT_S = 1.0  # default bound of one comparison (VerifyConfig.timeout_s)
MAX_ANSWER_CHARS = 500  # the longest answer compared (contest answers are far shorter)
MAX_NESTING = 8  # braces/brackets/parentheses; math-verify's time doubles with each level past ~6
MAX_EXPONENT = 10**6  # the largest exponent a power may have
MAX_DIGITS = 10**6  # the most digits a number (a power, a factorial) may have
MAX_FACTORIAL = 10**4  # the largest n of n!
_WORKER_STARTUP_S = 120.0  # importing sympy on a loaded machine can take a while
_WINDOW, _WINDOW_BYTES = 64, 32_768  # requests in flight per worker (well under a pipe's 64 KiB)
_IDLE_WORKERS = 8

_PLAIN = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?(?:/\d{1,30})?|-?\\frac\{\d{1,30}\}\{\d{1,30}\}")
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\*\*|\\left\s*\\?[(\[{|.]|\\right\s*\\?[)\]}|.]|\\[A-Za-z]+|\\.|\s+|.", re.DOTALL)
_OPEN = {"{": "}", "(": ")", "[": "]", "\\{": "\\}"}
_CLOSE = frozenset(_OPEN.values())


class _TooComplex(Exception):
    pass


def _about(log10_value: float) -> str:
    return f"{10**log10_value:,.0f}" if log10_value < 12 else f"10^{log10_value:.3g}"


class _Magnitude:
    """An upper-ish estimate of log10 of the values an answer's parts can take: powers and
    factorials of numbers and groups, right-associative towers (``9^9^9``), ``**`` as ``^``.
    Sums and products are not multiplied out (the time bound covers what this misses)."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.at = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def sequence(self, close: str | None) -> float:
        largest = 0.0
        while (token := self.peek()) is not None and token != close:
            largest = max(largest, self.postfix(self.operand()))
        if token == close and close is not None:
            self.at += 1
        return largest

    def operand(self) -> float:
        token = self.tokens[self.at]
        self.at += 1
        if token in _OPEN:
            return self.sequence(_OPEN[token])
        if token[0].isdigit():
            whole = token.split(".")[0].lstrip("0")
            return math.log10(float(whole[:15])) + max(0, len(whole) - 15) if whole else 0.0
        return 0.0  # a letter, a command, an operator: no magnitude of its own

    def exponent(self) -> float:
        """What ``^`` raises to: one operand and the tower above it (``10^{3}!`` is ``(10^{3})!``)."""
        value = self.operand()
        if self.peek() in ("^", "**"):
            self.at += 1
            value = self.power(value, self.exponent())
        return value

    def postfix(self, value: float) -> float:
        while (token := self.peek()) in ("^", "**", "!", "_"):
            self.at += 1
            if token == "!":
                value = self.factorial(value)
            elif token == "_":
                self.operand()  # a subscript names, it does not grow
            else:
                value = self.power(value, self.exponent())
        return value

    @staticmethod
    def power(base: float, exponent: float) -> float:
        if exponent > math.log10(MAX_EXPONENT):
            msg = f"an exponent of about {_about(exponent)} (more than {MAX_EXPONENT:,})"
            raise _TooComplex(msg)
        digits = base * 10**exponent
        if digits > MAX_DIGITS:
            msg = f"a power of about {_about(math.log10(digits))} digits (more than {MAX_DIGITS:,})"
            raise _TooComplex(msg)
        return digits

    @staticmethod
    def factorial(value: float) -> float:
        if value > math.log10(MAX_FACTORIAL):
            msg = f"the factorial of about {_about(value)} (more than {MAX_FACTORIAL:,})"
            raise _TooComplex(msg)
        return math.lgamma(10**value + 1) / math.log(10)


def too_complex(answer: str) -> str | None:
    """Why an answer is refused before any comparison (None: it may be compared).

    Deterministic and linear in the answer's length: longer than :data:`MAX_ANSWER_CHARS`, nested
    deeper than :data:`MAX_NESTING`, or naming a number math-verify would try to compute and
    cannot (an exponent over :data:`MAX_EXPONENT`, over :data:`MAX_DIGITS` digits, the factorial
    of more than :data:`MAX_FACTORIAL`)."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"{len(answer):,} characters (more than {MAX_ANSWER_CHARS})"
    tokens = [t for t in _TOKEN.findall(answer) if not t.isspace()]
    depth = deepest = 0
    for token in tokens:
        if token in _OPEN or token.startswith("\\left"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in _CLOSE or token.startswith("\\right"):
            depth = max(0, depth - 1)
    if deepest > MAX_NESTING:
        return f"nested {deepest} deep (more than {MAX_NESTING})"
    tokens = [t for t in tokens if not t.startswith(("\\left", "\\right"))]
    try:
        _Magnitude(tokens).sequence(None)
    except _TooComplex as err:
        return str(err)
    return None


class _Worker:
    """One math-verify worker process; used by one caller at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from distillery.stages.verify_worker import main; main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self.pid = os.getpid()  # the process that owns it (a forked child must not use it)
        self.buffer = b""
        with _LOCK:
            _LIVE.add(self)
        line = self._readline(time.monotonic() + _WORKER_STARTUP_S)
        if not line or not line.startswith(b'["ready"'):
            self.kill()
            msg = f"verify: the math-verify worker did not start within {_WORKER_STARTUP_S:.0f} s ({sys.executable})"
            raise RuntimeError(msg)

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def kill(self) -> None:
        with _LOCK:
            _LIVE.discard(self)
        if self.pid != os.getpid():
            return
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()

    def _readline(self, deadline: float) -> bytes | None:
        """The next line; b"" when the worker died, None when the deadline passed first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def run(self, pairs: list[tuple[str, str]], head: int, out: list[str | None], timeout_s: float) -> int:
        """Check ``pairs[head:]`` in order into ``out``; at the first one that does not finish in
        ``timeout_s`` (or kills the worker), mark it TIMEOUT, kill the worker and return the next index."""
        sent, sizes, broken = head, deque(), False
        clock = time.monotonic()  # when the oldest check in flight started
        while head < len(pairs):
            while not broken and sent < len(pairs) and len(sizes) < _WINDOW:
                line = (json.dumps([sent, *pairs[sent]]) + "\n").encode()
                if sizes and sum(sizes) + len(line) > _WINDOW_BYTES:
                    break
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(self.proc.stdin.fileno(), view) :]
                except (BrokenPipeError, OSError):
                    broken = True  # it died: read what it answered, then EOF
                    break
                sizes.append(len(line))
                sent += 1
            answer = self._readline(clock + timeout_s)
            if not answer:
                self.kill()
                out[head] = TIMEOUT
                return head + 1
            number, code = json.loads(answer)
            if number != head:
                self.kill()
                msg = f"verify: the worker answered check {number}, expected {head}"
                raise RuntimeError(msg)
            out[head] = MATCH if code == 1 else NO_MATCH if code == 0 else TIMEOUT
            head += 1
            sizes.popleft()
            clock = time.monotonic()
        return head


_LOCK = threading.Lock()
_IDLE: list[_Worker] = []
_LIVE: set[_Worker] = set()


@atexit.register
def _stop_workers() -> None:
    with _LOCK:
        workers = list(_LIVE)
    for worker in workers:
        worker.kill()


def _take_worker() -> _Worker:
    while True:
        with _LOCK:
            worker = _IDLE.pop() if _IDLE else None
        if worker is None:
            return _Worker()
        if worker.alive():
            return worker
        worker.kill()  # died while idle, or inherited through a fork


def _give_worker(worker: _Worker) -> None:
    with _LOCK:
        if worker.alive() and len(_IDLE) < _IDLE_WORKERS:
            _IDLE.append(worker)
            return
    worker.kill()


def _bounded_checks(pairs: list[tuple[str, str]], timeout_s: float) -> list[str]:
    out: list[str | None] = [None] * len(pairs)
    head, worker = 0, None
    try:
        while head < len(pairs):
            if worker is None or not worker.alive():
                worker = _take_worker()
            head = worker.run(pairs, head, out, timeout_s)
    finally:
        if worker is not None:
            _give_worker(worker)
    return out  # type: ignore[return-value]


def match_statuses(
    pairs: list[tuple[str, str]], *, timeout_s: float = VERIFY_TIMEOUT_S, bounded: bool = True
) -> list[str]:
    """Compare many ``(predicted, reference)`` pairs: each ``"match"``, ``"no_match"``,
    ``"answer_too_complex"`` or ``"verify_timeout"`` (see the comment above :data:`MATCH`).

    ``bounded=False`` is the old path, kept for benchmarks: math-verify in process with no bound
    at all (a pathological answer hangs it); the result is then only match or no_match."""
    if not bounded:
        return [MATCH if unbounded_match(p, r) else NO_MATCH for p, r in pairs]
    out: list[str | None] = [None] * len(pairs)
    remote: list[int] = []
    for k, (predicted, reference) in enumerate(pairs):
        if predicted == reference:
            out[k] = MATCH
        elif too_complex(predicted) is not None or too_complex(reference) is not None:
            out[k] = TOO_COMPLEX
        elif _PLAIN.fullmatch(predicted) and _PLAIN.fullmatch(reference):
            out[k] = MATCH if unbounded_match(predicted, reference) else NO_MATCH
        else:
            remote.append(k)
    if remote:
        for k, status in zip(remote, _bounded_checks([pairs[k] for k in remote], timeout_s), strict=True):
            out[k] = status
    return out  # type: ignore[return-value]


def match_status(predicted: str, reference: str, *, timeout_s: float = VERIFY_TIMEOUT_S) -> str:
    """:func:`match_statuses` for one pair."""
    return match_statuses([(predicted, reference)], timeout_s=timeout_s)[0]


def answers_match(predicted: str, reference: str, *, timeout_s: float = VERIFY_TIMEOUT_S) -> bool:
    """Mathematical equivalence of two extracted answers (math-verify), with a string fallback.

    Bounded: an answer too complex to compare, or a comparison that runs past ``timeout_s``, is
    not a match (:func:`match_status` says which)."""
    return match_status(predicted, reference, timeout_s=timeout_s) == MATCH


def _joined_boxes(extracted: ExtractedAnswer, reference: str) -> str | None:
    # Several boxes count together only for a list-valued reference ("3, 5"): never as hedging.
    if len(extracted.all_boxed) > 1 and "," in reference:
        return ", ".join(dict.fromkeys(extracted.all_boxed))
    return None


def judge_many(
    items: list[tuple[ExtractedAnswer, str | None]], *, timeout_s: float = VERIFY_TIMEOUT_S, bounded: bool = True
) -> list[tuple[bool | None, str | None]]:
    """:func:`is_correct` for many answers at once, with why a wrong one was not compared:
    ``(correct, problem)``, problem ``"answer_too_complex"``, ``"verify_timeout"`` or None."""
    result: list[tuple[bool | None, str | None]] = [(None, None) if ref is None else (False, None) for _, ref in items]
    asked = [k for k, (ex, ref) in enumerate(items) if ref is not None and ex.text is not None]
    first = match_statuses([(items[k][0].text, items[k][1]) for k in asked], timeout_s=timeout_s, bounded=bounded)
    again: list[tuple[int, str]] = []
    for k, status in zip(asked, first, strict=True):
        if status == MATCH:
            result[k] = (True, None)
        elif status in (TOO_COMPLEX, TIMEOUT):
            result[k] = (False, status)
        elif (joined := _joined_boxes(items[k][0], items[k][1])) is not None:
            again.append((k, joined))
    second = match_statuses([(joined, items[k][1]) for k, joined in again], timeout_s=timeout_s, bounded=bounded)
    for (k, _), status in zip(again, second, strict=True):
        result[k] = (status == MATCH, status if status in (TOO_COMPLEX, TIMEOUT) else None)
    return result


def is_correct(extracted: ExtractedAnswer, reference: str | None, *, timeout_s: float = VERIFY_TIMEOUT_S) -> bool | None:
    """True/False against the reference; None when there is no reference to check against."""
    return judge_many([(extracted, reference)], timeout_s=timeout_s)[0][0]


def _clip(value: str | None, limit: int = 200) -> str:
    if value is None:
        return "none"
    return value if len(value) <= limit else value[:limit] + f"... ({len(value):,} characters)"


def verify_samples(samples: pl.DataFrame, cfg: VerifyConfig, *, bounded: bool = True) -> StageResult:
    """Add ``predicted_answer``, ``answer_source`` and ``correct``; drop per ``cfg.keep``.

    ``cfg.keep``: ``"correct"`` drops wrong and unanswered samples (rejection sampling),
    ``"answered"`` drops only samples with no final answer, ``"all"`` drops nothing.
    Samples without a reference are never dropped as incorrect: ``correct`` is null there.
    A wrong answer that could not be compared (too complex, or no result within ``cfg.timeout_s``)
    is dropped as ``answer_too_complex`` or ``verify_timeout`` rather than ``incorrect``.
    ``cfg.fallback_last_number``: the last number counts as the answer when no rule finds one.
    ``bounded=False``: the old, unbounded comparison (benchmarks only; see :func:`match_statuses`).
    """
    keep, fallback_last_number, timeout_s = cfg.keep, cfg.fallback_last_number, cfg.timeout_s
    extracted = [extract_answer(c or "", fallback_last_number=fallback_last_number) for c in samples["completion"]]
    references = samples["reference_answer"].to_list()
    judged = judge_many(list(zip(extracted, references, strict=True)), timeout_s=timeout_s, bounded=bounded)
    verified = samples.with_columns(
        pl.Series("predicted_answer", [e.text for e in extracted], dtype=pl.Utf8),
        pl.Series("answer_source", [e.source for e in extracted], dtype=pl.Utf8),
        pl.Series("correct", [c for c, _ in judged], dtype=pl.Boolean),
    )
    reasons: list[str | None] = []
    details: list[str | None] = []
    for ex, ref, (correct, problem) in zip(extracted, references, judged, strict=True):
        reason = None
        if ex.text is None and keep in ("correct", "answered"):
            reason = "no_final_answer"
        elif ex.text is not None and correct is False and keep == "correct":
            reason = problem or "incorrect"
        reasons.append(reason)
        detail = f"predicted {_clip(ex.text)}, reference {_clip(ref)}"
        if reason == TOO_COMPLEX:
            detail += f"; not compared: {too_complex(ex.text) or too_complex(ref or '') or 'too complex'}"
        elif reason == TIMEOUT:
            detail += f"; no result within {timeout_s:g} s"
        details.append(detail if reason else None)
    return StageResult.from_reasons("verify", verified, reasons, details, rows_in=samples.height)
