"""Quality: heuristic filters that drop completions no model should be trained on.

The checks run in a fixed order and the first one a row fails names its reason:

1. ``too_short``: fewer than ``min_chars`` characters (after stripping white space);
2. ``too_long``: more than ``max_chars`` characters (after stripping white space);
3. ``truncated``: ``finish_reason == "length"`` (the generation hit ``max_tokens``), when the
   rows have a ``finish_reason`` column and ``drop_truncated`` is set;
4. ``non_text``: the share of characters that are not text (see :func:`non_text_share`) is
   above ``max_non_text_share``: byte garbage, control characters, U+FFFD, runs of emoji;
5. ``repetitive``: the share of word n-grams that repeat an earlier n-gram of the same text
   (see :func:`repeated_ngram_share`) is above ``max_repeated_ngram_share``: degenerate loops;
6. ``missing_final_answer``: no final answer can be extracted (``extract_answer``), when
   ``require_final_answer`` is set; rows that already went through verify use their
   ``predicted_answer`` column instead of extracting again.

The first four checks are polars expressions over the whole frame; the last two run per row
in Python, and only on the rows that passed the checks before them.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

import polars as pl

from distillery.accounting import StageCount, StageResult, empty_rejects, rows_to_rejects
from distillery.stages.verify import extract_answer
from schemas.recipe import QualityConfig

STAGE = "quality"

# What counts as text: letters (with their combining marks), digits and other numbers, white
# space, ASCII punctuation (which covers + - * / = < > ^ _ \ | & # @ ~ ` % $), the Unicode math
# symbols (Sm: × ÷ ± ≤ ≥ ≠ √ ∑ → ...), currency signs, dashes, curly quotes and a few typographic signs.
# Everything else is not: control characters, U+FFFD, emoji and other symbols, private use.
_TEXT_CHARS = r"\p{L}\p{M}\p{N}\s\x21-\x2F\x3A-\x40\x5B-\x60\x7B-\x7E\p{Sm}\p{Pd}\p{Pi}\p{Pf}\p{Sc}°…·‰′″"
NON_TEXT_PATTERN = f"[^{_TEXT_CHARS}]"

MIN_NGRAMS_FOR_REPETITION = 10  # shorter texts are not judged repetitive

_PUNCT = re.compile(r"[^\w\s]")  # what dedup.normalize_text drops
# The same for ASCII text, as a translation table (several times faster than the regex): every
# character that is neither a word character nor white space becomes a space, and ``\r`` a line break.
_ASCII_PUNCT = {c: " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_" or chr(c).isspace())}
_ASCII_PUNCT[ord("\r")] = "\n"


def _non_text_share_expr(text: pl.Expr) -> pl.Expr:
    n_chars = text.str.len_chars()
    bad = text.str.count_matches(NON_TEXT_PATTERN)
    return pl.when(n_chars > 0).then(bad / n_chars).otherwise(0.0)


def non_text_share(text: str) -> float:
    """Share of the characters of ``text`` that are not letters, digits, white space or common
    punctuation and math symbols (0.0 for an empty text).

    Evaluated by the same polars expression as the filter, so the helper and the stage agree.
    """
    if not text:
        return 0.0
    return float(pl.select(_non_text_share_expr(pl.lit(text, dtype=pl.Utf8))).item())


def ngram_tokens(text: str) -> list[str]:
    r"""Words of the text as dedup normalizes them (NFKC, lower case, punctuation dropped), with
    one ``"\n"`` token between lines that have words (``\n`` and ``\r`` end a line).

    Line breaks are tokens because degenerate loops are line loops: in
    ``"Step 12: Calculate 1\nStep 13: Calculate 1\n..."`` the step number changes on every line,
    and without the line break only one 3-gram in four ("calculate 1 step") would repeat.
    """
    if text.isascii():
        text = text.lower().translate(_ASCII_PUNCT)
    else:
        text = _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).replace("\r", "\n")
    tokens: list[str] = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            tokens += words
            tokens.append("\n")
    if tokens:
        tokens.pop()
    return tokens


def _ngram_repeats(text: str, n: int) -> tuple[int, int]:
    """(n-grams that repeat an earlier n-gram of the text, all n-grams of the text)."""
    tokens = ngram_tokens(text)
    total = len(tokens) - n + 1
    if total <= 0:
        return 0, 0
    grams = zip(*(tokens[i:] for i in range(n)), strict=False) if n > 1 else tokens
    return total - len(set(grams)), total


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier n-gram of the same text.

    ``"a b c a b c"`` has the 3-grams abc, bca, cab, abc: one of four repeats, so 0.25.
    A text with no n-gram (fewer than ``n`` tokens) scores 0.0. Tokens: :func:`ngram_tokens`.
    """
    repeats, total = _ngram_repeats(text or "", n)
    return repeats / total if total else 0.0


def quality_filter(rows: pl.DataFrame, cfg: QualityConfig) -> StageResult:
    """Drop the rows that fail a quality heuristic; the first failing check names the reason."""
    n_rows = rows.height
    if not cfg.enabled or n_rows == 0:
        return StageResult(STAGE, rows, empty_rejects(), StageCount(STAGE, n_rows, n_rows).check())
    if cfg.column not in rows.columns:
        msg = f"quality: the rows have no {cfg.column!r} column (columns: {rows.columns})"
        raise ValueError(msg)

    text = pl.col(cfg.column).cast(pl.Utf8).fill_null("")
    truncated = pl.lit(False)
    if cfg.drop_truncated and "finish_reason" in rows.columns:
        truncated = pl.col("finish_reason").cast(pl.Utf8).eq("length").fill_null(False)
    measured = rows.select(
        text.str.strip_chars().str.len_chars().alias("chars"),
        truncated.alias("truncated"),
        _non_text_share_expr(text).alias("non_text"),
        text.str.count_matches(NON_TEXT_PATTERN).alias("non_text_chars"),
        text.str.len_chars().alias("all_chars"),
    )
    chars = pl.col("chars")
    non_text = pl.col("non_text")
    cheap_rules = [
        ("too_short", chars < cfg.min_chars),
        ("too_long", chars > cfg.max_chars),
        ("truncated", pl.col("truncated")),
        ("non_text", non_text > cfg.max_non_text_share),
    ]
    reason_expr = pl.lit(None, dtype=pl.Utf8)
    for name, rule in reversed(cheap_rules):
        reason_expr = pl.when(rule).then(pl.lit(name)).otherwise(reason_expr)
    measured = measured.with_columns(reason_expr.alias("reason"))

    reasons: list[str | None] = measured["reason"].to_list()
    details: list[str | None] = [None] * n_rows
    char_counts = measured["chars"].to_list()
    for i, reason in enumerate(reasons):
        if reason == "too_short":
            details[i] = f"{char_counts[i]} chars < min_chars {cfg.min_chars}"
        elif reason == "too_long":
            details[i] = f"{char_counts[i]} chars > max_chars {cfg.max_chars}"
        elif reason == "truncated":
            details[i] = 'finish_reason "length": the generation hit max_tokens'
    non_text_rows = [i for i, r in enumerate(reasons) if r == "non_text"]
    if non_text_rows:
        found = measured.select("non_text", "non_text_chars", "all_chars")[non_text_rows].iter_rows()
        for i, (share, bad, all_chars) in zip(non_text_rows, found, strict=True):
            details[i] = f"non-text character share {share:.2f} > {cfg.max_non_text_share:.2f} ({bad} of {all_chars})"

    # Per-row checks in Python, each only on the rows every earlier check let through.
    texts = rows.get_column(cfg.column).cast(pl.Utf8).fill_null("")
    n = cfg.repeated_ngram
    pending = [i for i, r in enumerate(reasons) if r is None]
    still_pending = []
    for i, value in zip(pending, texts.gather(pending).to_list(), strict=True):
        repeats, total = _ngram_repeats(value, n)
        share = repeats / total if total else 0.0
        if total >= MIN_NGRAMS_FOR_REPETITION and share > cfg.max_repeated_ngram_share:
            reasons[i] = "repetitive"
            details[i] = f"repeated {n}-gram share {share:.2f} > {cfg.max_repeated_ngram_share:.2f} ({repeats} of {total})"
        else:
            still_pending.append(i)

    if cfg.require_final_answer and still_pending:
        if "predicted_answer" in rows.columns:
            missing = rows.get_column("predicted_answer").gather(still_pending).is_null().to_list()
            detail = "no final answer (predicted_answer is null)"
        else:
            values = texts.gather(still_pending).to_list()
            missing = [extract_answer(value).text is None for value in values]
            detail = "no final answer found (no ####, \\boxed{} or 'the answer is')"
        for i, is_missing in zip(still_pending, missing, strict=True):
            if is_missing:
                reasons[i] = "missing_final_answer"
                details[i] = detail

    keep = pl.Series([r is None for r in reasons], dtype=pl.Boolean)
    kept = rows.filter(keep)
    dropped_idx = [i for i, r in enumerate(reasons) if r is not None]
    rejects = rows_to_rejects(STAGE, rows.filter(~keep), [reasons[i] for i in dropped_idx], [details[i] for i in dropped_idx])
    dropped = dict(Counter(reasons[i] for i in dropped_idx))
    return StageResult(STAGE, kept, rejects, StageCount(STAGE, n_rows, kept.height, 1, dropped).check())
