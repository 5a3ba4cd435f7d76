"""Reward-model training stages: example selection, the problem split, AUC, the head fit, and
features that are exactly what the classifier's score head sees (transformers on CPU)."""

import json
import os
import shutil

import numpy as np
import polars as pl
import pytest

from distillery.accounting import StageCount, rows_to_rejects
from tests.test_store_publish import publish_demo, sample_rows

from distillery.stages.reward_training import (
    fit_head,
    head_bytes,
    head_from_bytes,
    last_token_features,
    roc_auc,
    split_by_problem,
    training_examples,
    write_reward_model,
)


def _samples(spec):
    """``spec``: seed_id -> list of correct labels (True/False/None), one sample each."""
    rows = [
        {"sample_id": f"{p}-{i}", "seed_id": p, "sample_index": i, "question": f"question {p}", "completion": f"answer {i}", "correct": label}
        for p, labels in spec.items()
        for i, label in enumerate(labels)
    ]
    return pl.DataFrame(rows, schema={"sample_id": pl.Utf8, "seed_id": pl.Utf8, "sample_index": pl.Int64, "question": pl.Utf8, "completion": pl.Utf8, "correct": pl.Boolean})


# -- examples ---------------------------------------------------------------------------------


def test_examples_keep_labeled_samples_of_problems_with_both_classes():
    rows = _samples(
        {
            "mixed": [True, False, None, False],
            "mixed2": [False, True],
            "all-right": [True, True, None],
            "all-wrong": [False],
            "no-labels": [None, None],
        }
    )
    result = training_examples(rows)
    assert sorted(result.kept["sample_id"]) == ["mixed-0", "mixed-1", "mixed-3", "mixed2-0", "mixed2-1"]
    assert result.kept.columns == rows.columns  # no helper columns leak out
    assert result.meta["problems"] == {"used": 2, "all_correct": 1, "all_incorrect": 1, "unlabeled": 1}
    count = result.count
    assert (count.stage, count.rows_in, count.rows_out) == ("select_examples", rows.height, 5)
    assert count.dropped == {"unlabeled": 4, "problem_all_correct": 2, "problem_all_incorrect": 1}
    assert sorted(zip(result.rejects["sample_id"], result.rejects["reason"], strict=True)) == [
        ("all-right-0", "problem_all_correct"),
        ("all-right-1", "problem_all_correct"),
        ("all-right-2", "unlabeled"),
        ("all-wrong-0", "problem_all_incorrect"),
        ("mixed-2", "unlabeled"),
        ("no-labels-0", "unlabeled"),
        ("no-labels-1", "unlabeled"),
    ]
    details = dict(zip(result.rejects["sample_id"], result.rejects["detail"], strict=True))
    assert details["all-right-0"] == "problem has 2 correct and 0 incorrect labeled samples"
    assert json.loads(result.rejects["record"][0]).keys() == set(rows.columns)  # the row as it came in


def test_examples_drop_labeled_rows_without_text_and_need_the_columns():
    rows = _samples({"p": [True, False, True]}).with_columns(
        pl.when(pl.col("sample_index") == 2).then(pl.lit("  ")).otherwise(pl.col("completion")).alias("completion")
    )
    result = training_examples(rows)
    assert result.count.dropped == {"missing_text": 1} and result.kept.height == 2
    with pytest.raises(ValueError, match=r"lack column\(s\) \['correct'\].*verified against reference answers"):
        training_examples(rows.drop("correct"))


def test_examples_with_an_all_null_correct_column():
    rows = _samples({"p": [None, None]}).with_columns(pl.lit(None).alias("correct"))
    result = training_examples(rows)
    assert result.kept.height == 0 and result.count.dropped == {"unlabeled": 2}
    assert result.meta["problems"] == {"used": 0, "all_correct": 0, "all_incorrect": 0, "unlabeled": 1}


# -- split ------------------------------------------------------------------------------------


def test_split_is_by_problem_deterministic_and_order_free():
    rows = _samples({f"p{i}": [True, False, True] for i in range(20)})
    train, heldout = split_by_problem(rows, 0.25, seed=0)
    assert train.height + heldout.height == rows.height
    assert not set(train["seed_id"]) & set(heldout["seed_id"])
    assert heldout["seed_id"].n_unique() == 5
    again = split_by_problem(rows.reverse(), 0.25, seed=0)[1]
    assert sorted(again["sample_id"]) == sorted(heldout["sample_id"])
    other = {frozenset(split_by_problem(rows, 0.25, seed=s)[1]["seed_id"]) for s in range(1, 6)}
    assert len(other | {frozenset(heldout["seed_id"])}) > 1  # the seed changes the split


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.99])
def test_split_puts_a_problem_on_each_side(fraction):
    rows = _samples({"a": [True, False], "b": [False, True]})
    train, heldout = split_by_problem(rows, fraction, seed=3)
    assert train["seed_id"].n_unique() == 1 and heldout["seed_id"].n_unique() == 1


def test_split_rejects_a_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_by_problem(_samples({"a": [True]}), 1.0, seed=0)


# -- AUC --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 1.0),  # perfect
        ([0.9, 0.8, 0.2, 0.1], [False, False, True, True], 0.0),  # inverse
        ([0.5, 0.5, 0.5, 0.5], [True, False, True, False], 0.5),  # all tied: every pair counts half
        ([0.3, 0.5, 0.5, 0.9], [False, True, False, True], 0.875),  # pairs: (0.5>0.3) (0.5=0.5: half) (0.9>0.3) (0.9>0.5) -> 3.5/4
        ([0.2, 0.6, 0.4], [True, True, False], 0.5),  # (0.2<0.4) (0.6>0.4) -> 1/2
        ([1, 2, 3, 2], [False, True, True, False], 7 / 8),  # ints; the 2s tie across classes
    ],
)
def test_auc_hand_computed(scores, labels, expected):
    assert roc_auc(scores, labels) == pytest.approx(expected)


def test_auc_with_one_class_is_none():
    assert roc_auc([0.1, 0.2], [True, True]) is None
    assert roc_auc([0.1, 0.2], [False, False]) is None
    assert roc_auc([], []) is None


def test_auc_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(brute)


# -- head -------------------------------------------------------------------------------------


def test_fit_head_separates_a_linearly_separable_set_without_bias():
    rng = np.random.default_rng(1)
    direction = rng.normal(size=16)
    x = rng.normal(size=(80, 16))
    margin = x @ direction
    x, margin = x[np.abs(margin) > 0.5], margin[np.abs(margin) > 0.5]  # a gap between the classes
    labels = margin > 0
    w = fit_head(x, labels, l2=1e-4, seed=0)
    assert w.shape == (16,) and w.dtype == np.float32
    assert ((x @ w > 0) == labels).all()
    assert roc_auc(x @ w, labels) == 1.0
    assert np.array_equal(w, fit_head(x, labels, l2=1e-4, seed=0))  # deterministic
    cos = w @ direction / np.linalg.norm(w) / np.linalg.norm(direction)
    assert cos > 0.8


def test_fit_head_balances_classes():
    # 900 negatives around -1, 100 positives around +1 on one feature, plus a constant feature
    # (the bias the head lacks): balanced weighting puts the boundary near 0, not towards +1.
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(-1, 0.6, 900), rng.normal(1, 0.6, 100)])
    x = np.stack([v, np.ones_like(v)], axis=1)
    labels = np.arange(1000) >= 900
    w = fit_head(x, labels, l2=1e-6)
    assert abs(-w[1] / w[0]) < 0.2
    # Balanced: repeating every positive 9 times changes nothing.
    x9 = np.concatenate([x[:900], np.repeat(x[900:], 9, axis=0)])
    np.testing.assert_allclose(fit_head(x9, np.arange(1800) >= 900, l2=1e-6), w, rtol=1e-3, atol=1e-4)


def test_fit_head_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_head(np.ones((3, 2)), [True, True, True])


def test_head_bytes_round_trip():
    w = np.arange(6, dtype=np.float32)
    data = head_bytes(w)
    assert np.array_equal(head_from_bytes(data), w) and data == head_bytes(w.copy())  # same bytes each time


# -- the classifier sees the features ------------------------------------------------------------

CHATS = [
    ("What is 2 + 3?", "2 + 3 = 5. The answer is 5."),
    ("What is 2 + 3?", "2 + 3 = 6. The answer is 6."),
    ("Tom has 4 apples and eats one. How many are left?", "4 - 1 = 3. The answer is 3."),
    ("Tom has 4 apples and eats one. How many are left?", "He has 5 left."),
    ("A dozen eggs cost $3. How much do 3 dozen cost?", "3 x 3 = 9, so $9."),
]


@pytest.fixture(scope="module")
def base():
    from distillery.model_setup import ModelNotFound, resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return resolve_model_path("embedded")
    except ModelNotFound as err:
        pytest.skip(str(err))


def test_features_are_what_the_score_head_sees(base, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distillery.stages.reward_training import render_texts

    prompts, completions = [p for p, _ in CHATS], [c for _, c in CHATS]
    features = last_token_features(base, prompts, completions, batch_size=2)  # batches with padding
    assert features.shape == (len(CHATS), 576) and features.dtype == np.float32
    single = last_token_features(base, prompts[:2], completions[:2], batch_size=1)  # no padding
    np.testing.assert_allclose(single, features[:2], atol=2e-4, rtol=1e-4)

    labels = np.array([True, False, True, False, True])
    weight = fit_head(features, labels, l2=1e-2)
    folder = write_reward_model(base, weight, tmp_path / "rm", info={"name": "test"})
    assert json.loads((folder / "distillery_model.json").read_text())["name"] == "test"
    assert not list(tmp_path.glob(".rm.partial*"))
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    np.testing.assert_array_equal(model.score.weight.detach().numpy()[0], weight)
    with torch.inference_mode():
        texts = render_texts(tokenizer, prompts, completions)
        logits = np.array([model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in texts])
        through_score = model.score(torch.from_numpy(features)).numpy()[:, 0]
    np.testing.assert_allclose(through_score, logits, atol=2e-3)
    np.testing.assert_allclose(features @ weight, logits, atol=2e-3)
    shutil.rmtree(folder)  # 540 MB


def test_materialize_refuses_a_head_trained_on_other_base_weights(base, tmp_path, monkeypatch):
    from distillery.model_setup import ModelMismatch, materialize_reward_model, model_identity
    from distillery.store import Store

    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))  # nothing may be built in the real cache
    store = Store(str(tmp_path / "store"))
    identity = model_identity(base)
    published = publish_fake_reward_model(store, base_sha256="0" * 64)
    assert (tmp_path / "store/rm/v0001/model/score_head.safetensors").stat().st_size < 10_000
    with pytest.raises(ModelMismatch) as err:
        materialize_reward_model(published.uri, base_model=str(base))
    assert "0" * 64 in str(err.value) and identity["sha256"] in str(err.value)
    assert not (tmp_path / "cache").exists()
    samples = publish_demo(store, sample_rows(2))
    with pytest.raises(ValueError, match="is a samples data set, not a reward model"):
        materialize_reward_model(samples.uri)
    assert materialize_reward_model(str(base)) == base  # a plain model folder is returned as it is


def publish_fake_reward_model(store, *, base_sha256="0" * 64, name="rm"):
    """A reward-model version with a zero head and made-up metrics (no model is loaded)."""
    from distillery.stages.publish import publish_reward_model

    table = pl.DataFrame(
        {"sample_id": ["a", "b", "c"], "seed_id": ["p", "p", "q"], "split": ["train", "train", "heldout"], "correct": [True, False, True], "logit": [1.0, -1.0, 0.5], "reward": [0.73, 0.27, 0.62]}
    )
    rejects = rows_to_rejects("select_examples", _samples({"z": [None]}), "unlabeled")
    metadata = {
        "description": "a test reward model",
        "base_model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "sha256": base_sha256, "source": "elsewhere", "path": "embedded"},
        "training_data": {"uri": "store/x/v0001", "dataset": "x", "version": "v0001"},
        "split": {"problems": {"train": 1, "heldout": 1}, "examples": {"train": {"pos": 1, "neg": 1}, "heldout": {"pos": 1, "neg": 0}}},
        "metrics": {"auc_train": 1.0, "auc_heldout": None, "n": 3},
        "hyperparameters": {"l2": 0.01, "seed": 0},
        "recipe": {"name": "train-reward-model"},
        "recipe_hash": "h" * 64,
        "generator": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "engine": "transformers"},
        "parents": [{"uri": "store/x/v0001", "rows": 4, "sha256": "s"}],
        "code_version": "c",
        "flow_run_id": "r",
        "stats": {"auc_train": 1.0, "auc_heldout": None},
    }
    stages = [StageCount("ingest", 4, 4), StageCount("select_examples", 4, 3, dropped={"unlabeled": 1})]
    return publish_reward_model(store, name, np.zeros(576, dtype=np.float32), table, rejects, input_rows=4, stages=stages, run_id="r", metadata=metadata)
