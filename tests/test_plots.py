"""The data card's PNG plots: drawn where there are data, left out where not, written beside the
card with checksums in the manifest, byte-for-byte the same for the same inputs, and never the
reason a version is lost."""

import hashlib
import io
import json
import re

import matplotlib.image
import numpy as np
import polars as pl
import pytest

from distillery import plots
from distillery.accounting import StageCount, empty_rejects, rows_to_rejects
from distillery.stages.collapse import collapse_report
from distillery.stages.publish import publish_version, read_shards
from distillery.store import Store
from schemas.recipe import CollapseConfig
from tests.stages.test_reward_training import publish_fake_reward_model
from tests.test_store_publish import META, sample_rows

SAMPLE_PLOTS = {"funnel.png", "lengths.png", "rewards.png", "pass_rate.png", "samples_spent.png", "dedup_contamination.png", "ngrams.png"}
WORDS = "first add the two numbers then carry the one so the final answer is".split()


def _samples(problems: int = 6, per_problem: int = 8) -> pl.DataFrame:
    """Realistic generated samples: lengths, rewards and correctness vary by problem."""
    rng = np.random.default_rng(0)
    n = problems * per_problem
    base = sample_rows(n)
    seed_ids = [f"q{i // per_problem}" for i in range(n)]
    correct = [bool(rng.random() < (i // per_problem) / problems) for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 30)))) for _ in range(n)]
    return base.with_columns(
        pl.Series("seed_id", seed_ids),
        pl.Series("sample_index", [i % per_problem for i in range(n)]),
        pl.Series("completion", texts),
        pl.Series("correct", correct),
        pl.Series("num_tokens", rng.integers(20, 256, size=n).tolist()),
        pl.Series("reward", np.clip(rng.normal(0.5, 0.2, size=n) + 0.3 * np.array(correct), 0, 1).tolist()),
        pl.Series("reward_source", ["reward_model"] * n),
    )


def _version(tmp_path_or_store, *, with_stats: bool = True):
    """Publish a samples version the way the synthesize flow would: fan-out, drops at each stage,
    the rejects kept with their rows, and the flow's statistics."""
    store = tmp_path_or_store if isinstance(tmp_path_or_store, Store) else Store(str(tmp_path_or_store))
    samples = _samples()  # 6 problems x 8 samples
    truncated, near, contaminated, not_best, kept = samples[:10], samples[10:13], samples[13:15], samples[15:30], samples[30:]
    rejects = pl.concat(
        [
            rows_to_rejects("quality", truncated, "truncated"),
            rows_to_rejects("dedup", near, "near_duplicate"),
            rows_to_rejects("decontaminate", contaminated, "contaminated"),
            rows_to_rejects("select", not_best, "not_best"),
        ]
    )
    stages = [
        StageCount("ingest", 7, 6, 1, {"invalid_json": 1}),
        StageCount("synthesize", 6, 48, 8),
        StageCount("verify", 48, 48),
        StageCount("quality", 48, 38, 1, {"truncated": 10}),
        StageCount("decontaminate", 38, 36, 1, {"contaminated": 2}),
        StageCount("dedup", 36, 33, 1, {"near_duplicate": 3}),
        StageCount("select", 33, 18, 1, {"not_best": 15}),
    ]
    collapse_cfg = CollapseConfig(top_k=20, min_distinct_2=0.1, max_top_k_share=0.9)
    metadata = {
        **META,
        "recipe": {"name": "t", "collapse": collapse_cfg.model_dump()},
        "kind": "sft-chain-of-thought",
        "scorer": {"method": "reward_model", "reward_model": "rm/v0001"},
    }
    if with_stats:
        collapse = collapse_report(kept["completion"].to_list(), [f"what is {i} plus {i + 1}" for i in range(6)], collapse_cfg)
        metadata["stats"] = {
            "samples_generated": 48,
            "mean_completion_tokens": float(samples["num_tokens"].mean()),
            "sampling": {"rounds": 2, "budget_per_problem": 8, "samples_spent_total": 44, "samples_spent_histogram": {"4": 2, "8": 4}},
            "collapse": collapse,
            "contamination_hits": {"gsm8k": 2, "math500": 0},
            "pass_rate_histogram": {"0.00": 2, "0.50": 4},
        }
    published = publish_version(store, "demo", kept, rejects, input_rows=7, stages=stages, run_id="r", metadata=metadata, shard_rows=100)
    return store, published


def _check_png(data: bytes) -> np.ndarray:
    assert data.startswith(plots.PNG_MAGIC)
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    width, height = plots.SIZE_PX
    assert image.shape[:2] == (height, width)
    assert image.std() > 0  # something is drawn
    return image


def test_publish_writes_every_plot_with_checksums_and_card_links(tmp_path):
    _, published = _version(tmp_path)
    manifest = json.loads((tmp_path / "demo/v0001/manifest.json").read_text())
    assert manifest["plots"] == published.manifest["plots"]
    assert "plots_skipped" not in manifest
    assert {p["path"] for p in manifest["plots"]} == {f"plots/{name}" for name in SAMPLE_PLOTS}
    for entry in manifest["plots"]:
        data = (tmp_path / "demo/v0001" / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        _check_png(data)

    card = (tmp_path / "demo/v0001/card.md").read_text()
    assert "## Plots" in card and "![funnel](plots/funnel.png)" in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert sorted(links) == sorted(p["path"] for p in manifest["plots"])
    for link in links:  # relative to the card, as a Markdown viewer resolves them
        assert (tmp_path / "demo/v0001" / link).is_file()


def test_plots_are_deterministic(tmp_path):
    store, published = _version(tmp_path)
    rows, rejects = read_shards(store, published.manifest), read_shards(store, published.manifest, "reject_shards")
    first = plots.render_plots(published.manifest, rows, rejects)
    second = plots.render_plots(json.loads(json.dumps(published.manifest)), rows.clone(), rejects.clone())
    assert set(first) == SAMPLE_PLOTS
    assert first == second
    assert {f"plots/{k}": hashlib.sha256(v).hexdigest() for k, v in first.items()} == {p["path"]: p["sha256"] for p in published.manifest["plots"]}
    for data in first.values():
        assert b"Software" not in data and b"matplotlib" not in data.lower()  # no version or date embedded


def test_plots_without_data_are_left_out(tmp_path):
    # no stats: no adaptive sampling, n-grams or contamination; rows without rewards
    store = Store(str(tmp_path))
    rows = sample_rows(4)
    published = publish_version(store, "plain", rows, empty_rejects(), input_rows=4, stages=[StageCount("ingest", 4, 4)], run_id="r", metadata=META, shard_rows=10)
    names = {p["path"].removeprefix("plots/") for p in published.manifest["plots"]}
    assert names == {"funnel.png", "lengths.png", "pass_rate.png"}
    assert not (tmp_path / "plain/v0001/plots/rewards.png").exists()
    assert "rewards" not in (tmp_path / "plain/v0001/card.md").read_text()

    # one round of sampling is not adaptive: nothing to show
    manifest = {**published.manifest, "stats": {"sampling": {"rounds": 1, "samples_spent_histogram": {"8": 4}}}}
    assert "samples_spent.png" not in plots.render_plots(manifest, rows, empty_rejects())
    # an empty version: all counts zero, no rows: no plot at all, and no Plots section
    empty = {"dataset": "e", "version": "v0001", "counts": {"input": 0, "published": 0, "rejected": 0, "stages": [{"stage": "ingest", "rows_in": 0, "rows_out": 0, "fanout": 1, "dropped": {}}]}}
    assert plots.render_plots(empty) == {}


def test_reward_model_plots_scores_per_split_with_auc(tmp_path):
    published = publish_fake_reward_model(Store(str(tmp_path)))
    names = {p["path"] for p in published.manifest["plots"]}
    assert names == {"plots/funnel.png", "plots/rewards.png"}
    _check_png((tmp_path / "rm/v0001/plots/rewards.png").read_bytes())
    card = (tmp_path / "rm/v0001/card.md").read_text()
    assert "![rewards](plots/rewards.png)" in card and "## Evaluation" in card


def test_preference_pairs_plot_chosen_against_rejected_scores():
    rows = pl.DataFrame({"pair_id": ["a", "b", "c"], "seed_id": ["p", "q", "r"], "chosen_score": [1.0, 0.9, 0.7], "rejected_score": [0.0, 0.2, 0.5]})
    manifest = {"dataset": "pairs", "version": "v0001", "kind": "preference-pairs",
                "counts": {"input": 4, "published": 3, "rejected": 1, "stages": [{"stage": "pair", "rows_in": 4, "rows_out": 3, "fanout": 1, "dropped": {"one_label": 1}}]}}
    images = plots.render_plots(manifest, rows, empty_rejects())
    assert set(images) == {"funnel.png", "rewards.png"}
    _check_png(images["rewards.png"])


def test_pass_rate_falls_back_to_the_flows_histogram():
    manifest = {"dataset": "d", "version": "v0001", "stats": {"pass_rate_histogram": {"0.00": 3, "0.33": 1}}}
    assert set(plots.render_plots(manifest, pl.DataFrame({"seed_id": ["a"]}))) == {"pass_rate.png"}


def test_a_failing_plot_is_skipped_and_recorded_not_fatal(tmp_path, monkeypatch, caplog):
    def broken(manifest, rows, rejects):
        raise RuntimeError("no ink")

    monkeypatch.setitem(plots.PLOTS, "rewards.png", broken)
    with pytest.raises(RuntimeError, match="no ink"):
        plots.render_plots({"dataset": "d", "version": "v1"})
    _, published = _version(tmp_path)
    manifest = json.loads((tmp_path / "demo/v0001/manifest.json").read_text())
    assert manifest["plots_skipped"] == [{"plot": "rewards.png", "error": "RuntimeError: no ink"}]
    assert "plots/rewards.png" not in {p["path"] for p in manifest["plots"]} and len(manifest["plots"]) == len(SAMPLE_PLOTS) - 1
    assert "not drawn: `rewards.png` (RuntimeError: no ink)" in (tmp_path / "demo/v0001/card.md").read_text()
    assert "rewards.png" in caplog.text and "no ink" in caplog.text
    assert Store(str(tmp_path)).versions("demo") == ["v0001"]


def test_no_plotting_at_all_still_publishes(tmp_path, monkeypatch):
    import distillery.plots

    def gone(*args, **kwargs):
        raise ImportError("matplotlib is not installed")

    monkeypatch.setattr(distillery.plots, "render_plots_safely", gone)
    _, published = _version(tmp_path)
    assert published.manifest["plots"] == [] and published.manifest["plots_skipped"][0]["plot"] == "*"
    assert (tmp_path / "demo/v0001/manifest.json").exists()


def test_plots_on_an_s3_store(s3):
    s3.create_bucket(Bucket="cards")
    store, published = _version(Store("s3://cards/team"))
    entry = next(p for p in published.manifest["plots"] if p["path"] == "plots/funnel.png")
    data = s3.get_object(Bucket="cards", Key="team/demo/v0001/plots/funnel.png")["Body"].read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    _check_png(data)
    card = s3.get_object(Bucket="cards", Key="team/demo/v0001/card.md")["Body"].read().decode()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card):
        assert store.exists(f"demo/v0001/{link}")


def test_curated_text_lengths_are_in_characters():
    rows = pl.DataFrame({"id": ["a", "b", "c"], "text": ["short", "a longer text", "the longest text of the three"]})
    rejects = rows_to_rejects("dedup", pl.DataFrame({"id": ["d"], "text": ["short"]}), "exact_duplicate")
    manifest = {"dataset": "cur", "version": "v0001", "kind": "curated", "generator": {"model": None, "text_column": "text"},
                "counts": {"input": 4, "published": 3, "rejected": 1, "stages": [{"stage": "dedup", "rows_in": 4, "rows_out": 3, "fanout": 1, "dropped": {"exact_duplicate": 1}}]}}
    images = plots.render_plots(manifest, rows, rejects)
    assert set(images) == {"funnel.png", "lengths.png", "dedup_contamination.png"}
    for data in images.values():
        _check_png(data)
