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

import re
from dataclasses import dataclass

import polars as pl
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from distillery.accounting import StageResult

_HASH_ANSWER = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?\s*[:：]?|answer\s*[:：])\s*[:：]?\s*(.+)",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?:/\d+)?")
_LEADING_NUMBER = re.compile(r"^-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_WRAPPERS = (r"\text{", r"\textbf{", r"\mathrm{", r"\mbox{")


@dataclass(frozen=True)
class ExtractedAnswer:
    text: str | None
    source: str | None  # "hash" | "boxed" | "answer_is" | "last_number" | None
    all_boxed: tuple[str, ...] = ()


def boxed_contents(text: str) -> list[str]:
    r"""Every ``\boxed{...}`` (or ``\fbox{...}``) body in order, with nested braces kept."""
    found: list[str] = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i].strip())
                    break
    return found


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


def _parsed(value: str):
    # math-verify reads LaTeX inside delimiters and plain expressions; give it both chances.
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = parse(f"${value}$", extraction_config=config, parsing_timeout=None)
    return parsed or parse(value, extraction_config=config, parsing_timeout=None)


def answers_match(predicted: str, reference: str) -> bool:
    """Mathematical equivalence of two extracted answers (math-verify), with a string fallback."""
    if predicted == reference:
        return True
    gold, pred = _parsed(reference), _parsed(predicted)
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # math-verify raises on exotic sympy objects; treat as not equal
        return False


def is_correct(extracted: ExtractedAnswer, reference: str | None) -> bool | None:
    """True/False against the reference; None when there is no reference to check against."""
    if reference is None:
        return None
    if extracted.text is None:
        return False
    if answers_match(extracted.text, reference):
        return True
    # Several boxes count together only for a list-valued reference ("3, 5"): never as hedging.
    if len(extracted.all_boxed) > 1 and "," in reference:
        joined = ", ".join(dict.fromkeys(extracted.all_boxed))
        return answers_match(joined, reference)
    return False


def verify_samples(
    samples: pl.DataFrame, *, keep: str = "correct", fallback_last_number: bool = False
) -> StageResult:
    """Add ``predicted_answer``, ``answer_source`` and ``correct``; drop per the keep policy.

    keep: ``"correct"`` drops wrong and unanswered samples (rejection sampling),
    ``"answered"`` drops only samples with no final answer, ``"all"`` drops nothing.
    Samples without a reference are never dropped as incorrect: ``correct`` is null there.
    """
    predicted, sources, correct = [], [], []
    for completion, ref in zip(samples["completion"], samples["reference_answer"], strict=True):
        extracted = extract_answer(completion or "", fallback_last_number=fallback_last_number)
        predicted.append(extracted.text)
        sources.append(extracted.source)
        correct.append(is_correct(extracted, ref))
    verified = samples.with_columns(
        pl.Series("predicted_answer", predicted, dtype=pl.Utf8),
        pl.Series("answer_source", sources, dtype=pl.Utf8),
        pl.Series("correct", correct, dtype=pl.Boolean),
    )
    no_answer = pl.col("predicted_answer").is_null()
    wrong = pl.col("correct").eq(False) & pl.col("predicted_answer").is_not_null()
    drops: list[tuple[str, pl.Expr]] = []
    if keep in ("correct", "answered"):
        drops.append(("no_final_answer", no_answer))
    if keep == "correct":
        drops.append(("incorrect", wrong))
    detail = pl.format("predicted {}, reference {}", pl.col("predicted_answer").fill_null("none"), pl.col("reference_answer").fill_null("none"))
    return StageResult.split("verify", verified, drops, detail=detail)
