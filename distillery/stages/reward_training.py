"""Reward-model training: a score head fitted on the pipeline's own verified samples.

The reward model is the embedded base model with a sequence-classification head
(``LlamaForSequenceClassification``: the final hidden state, after the final norm, at the last
token, times a ``score`` Linear without bias). The body stays frozen, so training is a logistic
regression on fixed features:

1. :func:`training_examples`: keep labeled samples (``correct`` not null) of the problems that
   have both correct and incorrect samples: the head learns to tell a right completion from a
   wrong one *of the same problem*, not which problems are easy. Every other row is dropped
   with a reason (stage ``select_examples``).
2. :func:`split_by_problem`: a deterministic split of *problems*, so no problem is on both sides.
3. :func:`last_token_features`: transformers on CPU (float32), the chat rendered exactly as
   :meth:`distillery.engine.PoolingRewardModel.render` renders it, the vector the head sees.
4. :func:`fit_head`: class-balanced, L2-regularized logistic regression without bias (LBFGS).
5. :func:`roc_auc` on both sides; :func:`distillery.model_setup.write_reward_model` builds the folder vLLM serves.

Everything here is a plain function; ``flows/train_reward_model.py`` composes them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from distillery.accounting import StageResult

# The head's file and the classifier folder built from it live with the other model folders
# (distillery/model_setup.py); importable from here too, where the trainer's callers look for them.
from distillery.model_setup import HEAD_TENSOR as HEAD_TENSOR
from distillery.model_setup import head_bytes as head_bytes
from distillery.model_setup import head_from_bytes as head_from_bytes
from distillery.model_setup import write_reward_model as write_reward_model

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

STAGE = "select_examples"
REQUIRED_COLUMNS = ("sample_id", "seed_id", "question", "completion", "correct")
DEFAULT_L2 = 1e-2  # held-out AUC was flat from 1e-4 to 1e-1 on GSM8K reference vs. corrupted answers

# Drop reasons of the select_examples stage (a row gets the first that applies).
UNLABELED = "unlabeled"  # correct is null: no reference answer to verify against
MISSING_TEXT = "missing_text"  # no question or completion to score
ALL_CORRECT = "problem_all_correct"  # its problem has no incorrect labeled sample
ALL_INCORRECT = "problem_all_incorrect"  # its problem has no correct labeled sample


def training_examples(rows: pl.DataFrame) -> StageResult:
    """Labeled samples of the problems that have at least one correct and one incorrect sample.

    Returns the ``select_examples`` stage: ``kept`` is the training frame, ``rejects`` the
    dropped rows with their reason, ``count`` the row accounting, and ``meta["problems"]`` the
    problem counts: ``used``, ``all_correct``, ``all_incorrect``, ``unlabeled`` (problems with no
    labeled sample at all). Every problem is counted exactly once.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        msg = (
            f"sample rows lack column(s) {missing}: train from a samples data set published by "
            "`distillery run` (one whose samples were verified against reference answers)"
        )
        raise ValueError(msg)
    rows = rows.with_columns(pl.col("correct").cast(pl.Boolean))
    text_missing = pl.col("question").is_null() | pl.col("completion").is_null() | (pl.col("completion").str.strip_chars() == "")
    usable = pl.col("correct").is_not_null() & ~text_missing
    per_problem = rows.group_by("seed_id").agg(
        (usable & pl.col("correct")).sum().alias("n_pos"),
        (usable & ~pl.col("correct")).sum().alias("n_neg"),
    )
    n_pos = dict(zip(per_problem["seed_id"].to_list(), per_problem["n_pos"].to_list(), strict=True))
    n_neg = dict(zip(per_problem["seed_id"].to_list(), per_problem["n_neg"].to_list(), strict=True))
    no_neg = [p for p, n in n_neg.items() if n == 0]
    no_pos = [p for p, n in n_pos.items() if n == 0]
    result = StageResult.split(
        STAGE,
        rows,
        [
            (UNLABELED, pl.col("correct").is_null()),
            (MISSING_TEXT, text_missing),
            (ALL_CORRECT, pl.col("seed_id").is_in(no_neg)),
            (ALL_INCORRECT, pl.col("seed_id").is_in(no_pos)),
        ],
        detail=pl.format(
            "problem has {} correct and {} incorrect labeled samples",
            pl.col("seed_id").replace_strict(n_pos, return_dtype=pl.Int64),
            pl.col("seed_id").replace_strict(n_neg, return_dtype=pl.Int64),
        ),
    )
    problems = Counter()
    for p in n_pos:
        if n_pos[p] and n_neg[p]:
            problems["used"] += 1
        elif n_pos[p]:
            problems["all_correct"] += 1
        elif n_neg[p]:
            problems["all_incorrect"] += 1
        else:
            problems["unlabeled"] += 1
    result.meta["problems"] = {k: problems.get(k, 0) for k in ("used", "all_correct", "all_incorrect", "unlabeled")}
    return result


def resolve_input(input_uri: str) -> tuple[str, dict]:
    """The concrete version URI (``STORE/NAME`` means the latest) and its manifest."""
    from distillery.store import open_version

    store, manifest = open_version(input_uri, what="input")
    uri = store.uri(f"{manifest['dataset']}/{manifest['version']}")
    if manifest.get("kind") == "reward-model":
        msg = f"input {uri} is a reward model; train from a samples data set"
        raise ValueError(msg)
    return uri, manifest


def _problem_rank(seed: int, seed_id: str) -> str:
    return hashlib.sha256(f"{seed}:{seed_id}".encode()).hexdigest()


def split_by_problem(rows: pl.DataFrame, heldout_fraction: float, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(train, heldout)``: every problem (``seed_id``) on exactly one side.

    Problems are ordered by ``sha256(f"{seed}:{seed_id}")`` and the first
    ``round(heldout_fraction * problems)`` are held out, at least one and at most all but one
    when there are two or more problems. The same rows and seed always give the same split,
    whatever the row order.
    """
    if not 0 < heldout_fraction < 1:
        msg = f"heldout_fraction must be between 0 and 1 (exclusive), got {heldout_fraction}"
        raise ValueError(msg)
    problems = sorted(set(rows["seed_id"].to_list()), key=lambda p: (_problem_rank(seed, p), p))
    n_heldout = round(heldout_fraction * len(problems))
    if len(problems) >= 2:
        n_heldout = min(max(n_heldout, 1), len(problems) - 1)
    heldout = set(problems[:n_heldout])
    on_heldout = pl.col("seed_id").is_in(list(heldout))
    return rows.filter(~on_heldout), rows.filter(on_heldout)


def render_texts(tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
    """The chats as :meth:`distillery.engine.PoolingRewardModel.render` renders them."""
    texts = []
    for prompt, completion in zip(prompts, completions, strict=True):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def last_token_features(
    model_dir: Path | str,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    dtype: str = "float32",
) -> np.ndarray:
    """``[n, hidden]`` float32: the final hidden state (after the final norm) at each chat's last
    token, what a ``LlamaForSequenceClassification`` score head sees. ``model_dir`` is the base
    model or a classifier built on it (only the transformer body is used). ``progress(done, total)``
    is called after each batch. ``dtype``: the body's dtype on the CPU (``auto``: bfloat16 where
    the CPU has it natively, else float32; :func:`distillery.hardware.resolve_dtype`)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from distillery.hardware import resolve_dtype

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, resolve_dtype(dtype, gpu=False)[0])).eval()
    texts = render_texts(tokenizer, prompts, completions)
    features = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # similar lengths together: less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True)
            hidden = model(**encoded, use_cache=False).last_hidden_state  # after the final norm
            last = encoded["attention_mask"].sum(dim=1) - 1  # right padding: the last real token
            features[batch] = hidden[torch.arange(len(batch)), last].float().numpy()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return features


def fit_head(features: np.ndarray, labels: Sequence[bool] | np.ndarray, l2: float = DEFAULT_L2, seed: int = 0, max_iter: int = 500) -> np.ndarray:
    """Logistic regression without bias (the score Linear has none), class-balanced, L2-penalized.

    Minimizes ``mean_i(w_i * BCE(x_i . w, y_i)) + l2/2 * |w|^2`` with ``w_i = n / (2 * n_class(y_i))``
    in float64 with LBFGS (strong Wolfe line search), from a small ``seed``-ed start. The loss is
    convex, so the result depends on the data and ``l2`` only (up to the tolerance). Returns the
    weight vector, float32, shape ``[hidden]``.
    """
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels, dtype=bool), dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        msg = f"features {tuple(x.shape)} and labels {tuple(y.shape)} do not match"
        raise ValueError(msg)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if not n_pos or not n_neg:
        msg = f"fit_head needs both classes, got {n_pos} positive and {n_neg} negative examples"
        raise ValueError(msg)
    sample_weight = torch.where(y > 0, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], generator=generator, dtype=torch.float64) * 1e-4).requires_grad_()
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (sample_weight * torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y, reduction="none")).mean()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().to(torch.float32).numpy()


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """Mann-Whitney AUC: P(score of a random positive > score of a random negative), ties
    counting half. None when there are no positives or no negatives."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        msg = f"{s.shape[0]} scores but {y.shape[0]} labels"
        raise ValueError(msg)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s, method="average")  # ties share their average rank: half a win each way
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
