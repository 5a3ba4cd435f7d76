"""Select: choose among the N samples drawn for each problem.

Plain functions over polars DataFrames whose rows are samples (``sample_id``, ``seed_id``,
``sample_index``, ``question``, ``completion``, ``predicted_answer``, ``correct`` and optionally
``reward``):

* :func:`majority_vote`: self-consistency. The most common final answer of a problem (answers
  that are mathematically equal, ``0.5`` / ``1/2`` / ``\\frac{1}{2}``, count as one), how many
  samples agree with it, and ``pseudo_correct`` per sample: a label for problems without a
  reference answer. It never reads the reference.
* :func:`pass_rates`: per problem, the share of its samples whose label is true.
* :func:`select_samples` (stage ``"select"``): drop problems by difficulty (all solved, all
  failed, outside a pass-rate band), then keep samples by a policy (reward threshold, best of N,
  top k, all). Every dropped row is a reject with a reason and a detail.
* :func:`preference_pairs`: chosen/rejected pairs per problem for DPO-style training.

Order of preference, used by best-of-N, top-k and the chosen side of pairs (as in dedup's keep
policy): label true first, then higher ``reward`` (a null reward is the lowest), then the earliest
sample (``sample_index``, then input order). A null label counts as not true.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal, get_args

import polars as pl

from distillery.accounting import StageCount, StageResult, empty_rejects, rows_to_rejects
from distillery.stages.verify import answers_match
from schemas.recipe import PairsConfig, SelectConfig

STAGE = "select"

Policy = Literal["threshold", "best_of_n", "top_k", "all"]
Difficulty = Literal["any", "drop_all_solved", "drop_all_failed", "band"]

PAIR_SCHEMA = {
    "pair_id": pl.Utf8,
    "seed_id": pl.Utf8,
    "prompt": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_sample_id": pl.Utf8,
    "rejected_sample_id": pl.Utf8,
    "chosen_score": pl.Float64,
    "rejected_score": pl.Float64,
    "reason": pl.Utf8,
}

_GAP_TOLERANCE = 1e-9  # reward differences are floats: a gap equal to min_reward_gap counts


# --------------------------------------------------------------------------- helpers


def _require_columns(rows: pl.DataFrame, where: str, columns: dict[str, str]) -> None:
    """``columns`` maps a needed column to the option (or role) that needs it, for the message."""
    for column, option in columns.items():
        if column not in rows.columns:
            msg = f"{where}: {option} names column {column!r}, which the rows do not have (columns: {rows.columns})"
            raise ValueError(msg)


def _label_values(rows: pl.DataFrame, label: str, where: str) -> list[bool | None]:
    _require_columns(rows, where, {label: f"label={label!r}"})
    dtype = rows.schema[label]
    if dtype not in (pl.Boolean, pl.Null):
        msg = f"{where}: label={label!r} must name a boolean column, but it is {dtype}"
        raise ValueError(msg)
    return rows[label].cast(pl.Boolean).to_list()


def _reward_values(rows: pl.DataFrame) -> list[float | None]:
    """Rewards as floats, NaN as null (a NaN reward says nothing); all null without a column."""
    if "reward" not in rows.columns:
        return [None] * rows.height
    return [None if r is None or r != r else float(r) for r in rows["reward"].cast(pl.Float64).to_list()]


def _sample_indices(rows: pl.DataFrame) -> list[int]:
    if "sample_index" in rows.columns:
        return [-1 if v is None else int(v) for v in rows["sample_index"].to_list()]
    return [0] * rows.height


def _problems(rows: pl.DataFrame) -> dict[str, list[int]]:
    """Row positions per ``seed_id``, problems in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, seed in enumerate(rows["seed_id"].cast(pl.Utf8).to_list()):
        groups.setdefault(seed, []).append(i)
    return groups


def _best_first(positions: list[int], labels: list[bool | None], rewards: list[float | None], index: list[int]) -> list[int]:
    """Positions in order of preference: label true, higher reward, earliest sample, input order."""

    def key(i: int):
        reward = rewards[i]
        return (labels[i] is not True, float("inf") if reward is None else -reward, index[i], i)

    return sorted(positions, key=key)


def _worst_first(positions: list[int], labels: list[bool | None], rewards: list[float | None], index: list[int]) -> list[int]:
    """Positions from the least preferred: label not true, lower reward (null lowest), earliest sample."""

    def key(i: int):
        reward = rewards[i]
        return (labels[i] is True, float("-inf") if reward is None else reward, index[i], i)

    return sorted(positions, key=key)


def _check_choice(value: str, allowed: tuple, option: str, where: str) -> None:
    if value not in allowed:
        msg = f"{where}: {option}={value!r} is not one of {list(allowed)}"
        raise ValueError(msg)


# --------------------------------------------------------------------------- majority vote


def majority_vote(rows: pl.DataFrame) -> pl.DataFrame:
    """Add ``majority_answer``, ``agreement``, ``voters`` and ``pseudo_correct`` (drops nothing).

    Per ``seed_id``, the answered samples (``predicted_answer`` not null) vote. Each answer joins
    the first group whose representative (the group's first answer) it matches by
    :func:`~distillery.stages.verify.answers_match`, or starts a new group. The largest group wins;
    on a tie, the group whose first answer has the lowest ``sample_index``. ``majority_answer`` is
    that group's first answer as written; ``agreement`` = group size / ``voters``;
    ``pseudo_correct`` says whether a row's answer is in the winning group (null for a row without
    an answer, and, like ``agreement`` and ``majority_answer``, for a problem without any).
    Reference answers are never read: this is the label for problems that have none.
    """
    _require_columns(rows, "majority_vote", {"seed_id": "the vote", "predicted_answer": "the vote"})
    answers: list[str | None] = rows["predicted_answer"].cast(pl.Utf8).to_list()
    index = _sample_indices(rows)
    n = rows.height
    majority: list[str | None] = [None] * n
    agreement: list[float | None] = [None] * n
    voters = [0] * n
    pseudo: list[bool | None] = [None] * n

    for positions in _problems(rows).values():
        answered = sorted((i for i in positions if answers[i] is not None), key=lambda i: (index[i], i))
        representatives: list[str] = []
        sizes: list[int] = []
        group_of: dict[int, int] = {}
        known: dict[str, int] = {}  # answer text -> group, so each distinct text is compared once
        for i in answered:
            text = answers[i]
            if text not in known:
                known[text] = next((g for g, rep in enumerate(representatives) if answers_match(text, rep)), len(representatives))
                if known[text] == len(representatives):
                    representatives.append(text)
                    sizes.append(0)
            group_of[i] = known[text]
            sizes[known[text]] += 1
        if not answered:
            continue
        # Groups were opened in sample order: on a tie in size, the lower group number is the earlier answer.
        winner = max(range(len(sizes)), key=lambda g: (sizes[g], -g))
        for i in positions:
            majority[i] = representatives[winner]
            agreement[i] = sizes[winner] / len(answered)
            voters[i] = len(answered)
            pseudo[i] = group_of[i] == winner if i in group_of else None

    return rows.with_columns(
        pl.Series("majority_answer", majority, dtype=pl.Utf8),
        pl.Series("agreement", agreement, dtype=pl.Float64),
        pl.Series("voters", voters, dtype=pl.Int64),
        pl.Series("pseudo_correct", pseudo, dtype=pl.Boolean),
    )


# --------------------------------------------------------------------------- pass rates


def pass_rates(rows: pl.DataFrame, *, label: str = "correct") -> pl.DataFrame:
    """Per ``seed_id`` (in order of first appearance): ``samples``, ``passed``, ``pass_rate``.

    ``passed`` counts samples whose ``label`` is true; a null label counts as not passed, so a
    problem without references scores 0.0 on ``correct`` (vote first and use ``pseudo_correct``).
    """
    _require_columns(rows, "pass_rates", {"seed_id": "the grouping"})
    _label_values(rows, label, "pass_rates")
    return (
        rows.group_by("seed_id", maintain_order=True)
        .agg(
            pl.len().cast(pl.Int64).alias("samples"),
            pl.col(label).cast(pl.Boolean).fill_null(False).sum().cast(pl.Int64).alias("passed"),
        )
        .with_columns((pl.col("passed") / pl.col("samples")).alias("pass_rate"))
    )


# --------------------------------------------------------------------------- select


def select_samples(rows: pl.DataFrame, cfg: SelectConfig, label: str | None = None) -> StageResult:
    """Drop problems by ``cfg.difficulty``, then keep samples by ``cfg.policy`` (stage ``"select"``).

    ``label`` is the boolean column that says a sample is right (the flow resolves ``cfg.label``
    against the score method, :meth:`SelectConfig.label_column`); None: ``cfg.label``, with
    ``"auto"`` meaning ``correct``. The options are checked here too, for configs built without
    validation (``SelectConfig.model_construct``).

    difficulty (on the pass rate of ``label`` over each problem's samples, whole problems):
    ``"drop_all_solved"`` drops problems at 1.0 (``too_easy``), ``"drop_all_failed"`` at 0.0
    (``too_hard``), ``"band"`` keeps ``band[0] <= pass_rate <= band[1]`` (above: ``too_easy``,
    below: ``too_hard``), ``"any"`` keeps all.

    policy, on what is left: ``"threshold"`` drops ``reward < min_reward`` (``below_threshold``)
    and null rewards (``no_reward``); ``"best_of_n"`` keeps the most preferred sample of each
    problem (``not_best``); ``"top_k"`` keeps the ``k`` most preferred (``not_top_k``); ``"all"``
    keeps every sample. Kept rows stay in input order.
    """
    where = "select_samples"
    policy, min_reward, k, difficulty, band = cfg.policy, cfg.min_reward, cfg.k, cfg.difficulty, cfg.band
    label = cfg.label_column("none") if label is None else label
    _check_choice(policy, get_args(Policy), "policy", where)
    _check_choice(difficulty, get_args(Difficulty), "difficulty", where)
    if policy == "threshold" and min_reward is None:
        msg = f"{where}: policy='threshold' needs min_reward (the lowest reward kept)"
        raise ValueError(msg)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        msg = f"{where}: k={k!r} must be a positive integer"
        raise ValueError(msg)
    if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
        msg = f"{where}: band={tuple(band)!r} must be (low, high) with 0 <= low <= high <= 1"
        raise ValueError(msg)
    if rows.height == 0:
        return StageResult(STAGE, rows, empty_rejects(), StageCount(STAGE, 0, 0))
    _require_columns(rows, where, {"seed_id": "the grouping", "sample_id": "the rejects"})
    if policy == "threshold":
        _require_columns(rows, where, {"reward": "policy='threshold'"})

    labels = _label_values(rows, label, where)
    rewards = _reward_values(rows)
    index = _sample_indices(rows)
    ids = rows["sample_id"].cast(pl.Utf8).to_list()
    reason: list[str | None] = [None] * rows.height
    detail: list[str | None] = [None] * rows.height

    for seed, positions in _problems(rows).items():
        # 1. difficulty, on all of the problem's samples
        if difficulty != "any":
            passed = sum(labels[i] is True for i in positions)
            rate = passed / len(positions)
            unlabeled = sum(labels[i] is None for i in positions)
            why = None
            if difficulty == "drop_all_solved" and rate == 1.0:
                why, note = "too_easy", ""
            elif difficulty == "drop_all_failed" and rate == 0.0:
                why, note = "too_hard", ""
            elif difficulty == "band" and rate > band[1]:
                why, note = "too_easy", f" above band [{band[0]:.2f}, {band[1]:.2f}]"
            elif difficulty == "band" and rate < band[0]:
                why, note = "too_hard", f" below band [{band[0]:.2f}, {band[1]:.2f}]"
            if why is not None:
                counted = f"{passed}/{len(positions)}" + (f", {unlabeled} unlabeled" if unlabeled else "")
                for i in positions:
                    reason[i], detail[i] = why, f"pass rate {rate:.2f} ({counted}){note}"
                continue

        # 2. the policy, on the problem's samples (difficulty drops whole problems)
        if policy == "threshold":
            for i in positions:
                if rewards[i] is None:
                    reason[i], detail[i] = "no_reward", f"reward is null (min_reward {min_reward:.2f})"
                elif rewards[i] < min_reward:
                    reason[i], detail[i] = "below_threshold", f"reward {rewards[i]:.2f} < {min_reward:.2f}"
        elif policy in ("best_of_n", "top_k"):
            keep = 1 if policy == "best_of_n" else k
            ranked = _best_first(positions, labels, rewards, index)
            for rank, i in enumerate(ranked[keep:], start=keep + 1):
                if policy == "best_of_n":
                    reason[i] = "not_best"
                    detail[i] = f"rank {rank} of {len(ranked)} for problem {seed} (kept {ids[ranked[0]]})"
                else:
                    reason[i] = "not_top_k"
                    detail[i] = f"rank {rank} of {len(ranked)} for problem {seed} (k={k})"

    keep_mask = pl.Series([r is None for r in reason], dtype=pl.Boolean)
    dropped = [i for i, r in enumerate(reason) if r is not None]
    kept = rows.filter(keep_mask)
    rejects = (
        rows_to_rejects(STAGE, rows[dropped], [reason[i] for i in dropped], [detail[i] for i in dropped])
        if dropped
        else empty_rejects()
    )
    counts = dict(Counter(reason[i] for i in dropped))
    return StageResult(STAGE, kept, rejects, StageCount(STAGE, rows.height, kept.height, 1, counts).check())


# --------------------------------------------------------------------------- preference pairs


def _pair_positions(chosen: list[int], rejected: list[int], valid) -> list[tuple[int, int]]:
    """All valid (chosen, rejected) pairs in the order they are handed out.

    First pairs that use each sample at most once (the best chosen with the worst rejected, the
    next with the next), then the remaining valid pairs, best chosen and worst rejected first.
    """
    used: set[int] = set()
    first: list[tuple[int, int]] = []
    for c in chosen:
        if c in used:
            continue
        partner = next((r for r in rejected if r not in used and r != c and valid(c, r)), None)
        if partner is not None:
            first.append((c, partner))
            used.update((c, partner))
    taken = set(first)
    rest = [(c, r) for c in chosen for r in rejected if c != r and (c, r) not in taken and valid(c, r)]
    return first + rest


def preference_pairs(
    rows: pl.DataFrame,
    *,
    label: str = "correct",
    max_pairs_per_problem: int = 1,
    min_reward_gap: float = 0.0,
) -> pl.DataFrame:
    """Chosen/rejected pairs per problem (columns: :data:`PAIR_SCHEMA`).

    Where a problem's labels differ (some true, some false; null labels take no part), chosen is
    a sample with ``label`` true and rejected one with ``label`` false (``reason="label"``).
    Otherwise rewards decide: chosen has a reward higher than rejected's by at least
    ``min_reward_gap`` and strictly higher (``reason="reward"``); samples without a reward take
    no part. The best chosen comes first (best-of-N order) and the worst rejected first; the first
    pairs of a problem use each sample at most once, later ones reuse samples, up to
    ``max_pairs_per_problem``. Scores are the reward, or 1.0/0.0 from the label where a sample has
    no reward. A problem without a valid pair gives none.
    """
    where = "preference_pairs"
    if isinstance(max_pairs_per_problem, bool) or not isinstance(max_pairs_per_problem, int) or max_pairs_per_problem < 1:
        msg = f"{where}: max_pairs_per_problem={max_pairs_per_problem!r} must be a positive integer"
        raise ValueError(msg)
    if not min_reward_gap >= 0.0:  # also catches NaN
        msg = f"{where}: min_reward_gap={min_reward_gap!r} must be >= 0"
        raise ValueError(msg)
    if rows.height == 0:
        return pl.DataFrame(schema=PAIR_SCHEMA)
    _require_columns(
        rows, where, {"seed_id": "the grouping", "sample_id": "the pairs", "question": "prompt", "completion": "the pairs"}
    )

    labels = _label_values(rows, label, where)
    rewards = _reward_values(rows)
    index = _sample_indices(rows)
    ids = rows["sample_id"].cast(pl.Utf8).to_list()
    questions = rows["question"].cast(pl.Utf8).to_list()
    completions = rows["completion"].cast(pl.Utf8).to_list()

    def score(i: int) -> float:
        return rewards[i] if rewards[i] is not None else (1.0 if labels[i] is True else 0.0)

    out: dict[str, list] = {name: [] for name in PAIR_SCHEMA}
    for seed, positions in _problems(rows).items():
        good = [i for i in positions if labels[i] is True]
        bad = [i for i in positions if labels[i] is False]
        if good and bad:
            why = "label"
            chosen = _best_first(good, labels, rewards, index)
            rejected = _worst_first(bad, labels, rewards, index)
            pairs = _pair_positions(chosen, rejected, lambda c, r: True)
        else:
            why = "reward"
            scored = [i for i in positions if rewards[i] is not None]
            no_label = [None] * rows.height  # labels agree here: order by reward alone
            chosen = _best_first(scored, no_label, rewards, index)
            rejected = _worst_first(scored, no_label, rewards, index)

            def valid(c: int, r: int) -> bool:
                gap = rewards[c] - rewards[r]
                return gap > 0.0 and gap >= min_reward_gap - _GAP_TOLERANCE  # 0.7 - 0.4 is 0.2999...

            pairs = _pair_positions(chosen, rejected, valid)
        for n, (c, r) in enumerate(pairs[:max_pairs_per_problem]):
            out["pair_id"].append(f"{seed}-p{n}")
            out["seed_id"].append(seed)
            out["prompt"].append(questions[c])
            out["chosen"].append(completions[c])
            out["rejected"].append(completions[r])
            out["chosen_sample_id"].append(ids[c])
            out["rejected_sample_id"].append(ids[r])
            out["chosen_score"].append(score(c))
            out["rejected_score"].append(score(r))
            out["reason"].append(why)
    return pl.DataFrame(out, schema=PAIR_SCHEMA)


PAIR_STAGE = "pair"


def pair_stage(rows: pl.DataFrame, cfg: PairsConfig, label: str = "correct") -> StageResult:
    """:func:`preference_pairs` as a stage (``"pair"``) whose rows are problems, with
    ``cfg.max_pairs_per_problem`` and ``cfg.min_reward_gap``; ``label`` is the boolean column
    that says a sample is right (the flow passes the one select resolved).

    Each problem (``seed_id``) has ``max_pairs_per_problem`` slots (the stage's fanout). A problem
    without any valid pair is a reject, one row per problem: ``one_label`` (its labels agree and
    no sample has a reward to rank by) or ``no_reward_gap`` (rewards, but no two that differ by
    ``min_reward_gap``); the detail counts its samples. Slots a problem could not fill beyond its
    first pair count as ``fewer_pairs`` (no reject row: no row was dropped, a pair was not made).
    """
    max_pairs_per_problem, min_reward_gap = cfg.max_pairs_per_problem, cfg.min_reward_gap
    pairs = preference_pairs(rows, label=label, max_pairs_per_problem=max_pairs_per_problem, min_reward_gap=min_reward_gap)
    if rows.height == 0:
        return StageResult(PAIR_STAGE, pairs, empty_rejects(), StageCount(PAIR_STAGE, 0, 0, max_pairs_per_problem))
    labels = _label_values(rows, label, "pair_stage")
    rewards = _reward_values(rows)
    made = Counter(pairs["seed_id"].to_list())
    problems = _problems(rows)
    dropped: Counter[str] = Counter()
    missing, reasons, details = [], [], []
    for seed, positions in problems.items():
        if made[seed]:
            dropped["fewer_pairs"] += max_pairs_per_problem - made[seed]
            continue
        n_true = sum(labels[i] is True for i in positions)
        n_false = sum(labels[i] is False for i in positions)
        n_scored = sum(rewards[i] is not None for i in positions)
        why = "no_reward_gap" if n_scored >= 2 else "one_label"
        dropped[why] += 1
        dropped["fewer_pairs"] += max_pairs_per_problem - 1
        missing.append(seed)
        reasons.append(why)
        details.append(
            f"{len(positions)} samples: {n_true} {label}, {n_false} not, {len(positions) - n_true - n_false} unlabeled; "
            f"{n_scored} with a reward (min gap {min_reward_gap})"
        )
    if not dropped["fewer_pairs"]:
        del dropped["fewer_pairs"]
    summary = (
        rows.group_by("seed_id", maintain_order=True)
        .agg(pl.col("question").first(), pl.col("sample_id").alias("sample_ids"))
        .filter(pl.col("seed_id").is_in(missing))
    )
    order = {seed: n for n, seed in enumerate(missing)}
    summary = summary.sort(pl.col("seed_id").replace_strict(order, return_dtype=pl.Int64))
    rejects = rows_to_rejects(PAIR_STAGE, summary, reasons, details) if missing else empty_rejects()
    count = StageCount(PAIR_STAGE, len(problems), pairs.height, max_pairs_per_problem, dict(dropped)).check()
    return StageResult(PAIR_STAGE, pairs, rejects, count)
