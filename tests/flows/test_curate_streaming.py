"""The one curation path (``flows/curation.py``, here through ``flows.curate.curate_in_shards``)
with tiny shards, without Prefect or Ray: the duplicates it finds across shards, its row
accounting, and that the same input publishes the same version in one shard and in seven."""

import json

import numpy as np
import polars as pl
import pytest

from distillery import minhash
from distillery.stages import dedup
from distillery.stages.publish import read_shards
from distillery.store import Store
from flows.curate import curate_in_shards, plain
from schemas.recipe import CurateRecipe
from tests.conftest import DATA

SHARD = 50


def _text(i: int) -> str:
    a, b = 3 * i + 7, 5 * i + 11
    return (
        f"Worker {i} packs {a} boxes in the morning and {b} boxes in the afternoon of day {i}. "
        f"Adding the two shifts gives {a} + {b} = {a + b} boxes for item {i}. The answer is {a + b}."
    )


def _input(tmp_path):
    """~500 lines: clean rows, and duplicates planted across shards of 50 lines (line i is in shard i // 50)."""
    gsm_test = json.loads((DATA / "gsm8k/test.jsonl").read_text().splitlines()[0])["question"]
    rows = [{"id": f"clean-{i}", "completion": _text(i)} for i in range(480)]
    planted = {
        # line: row
        60: {"id": "exact-of-3", "completion": _text(3).upper()},  # shard 1, of shard 0
        70: {"id": "exact-of-3-again", "completion": "  " + _text(3).replace(".", " .")},  # shard 1, same text once normalized
        130: {"id": "near-of-1", "completion": _text(1) + " Indeed"},  # shard 2, of shard 0
        210: {"id": "near-of-near", "completion": _text(1) + " Indeed, it is so"},  # chains to near-of-1 (cluster of clean-1)
        250: {"id": "exact-of-250s-neighbour", "completion": _text(251)},  # same shard as its original, before it
        320: {"id": "leak", "completion": "Please answer: " + gsm_test},
        330: {"id": "too-short", "completion": "42"},
        340: {"id": "loop", "completion": "Step 1: add 1 (sticks)\n" * 40},
        490: {"id": "near-of-10-last-shard", "completion": "So, " + _text(10)},  # last shard, of shard 0
    }
    lines = [json.dumps(r) for r in rows]
    for line, row in sorted(planted.items()):
        lines.insert(line, json.dumps(row))
    lines.insert(400, "{broken json")
    lines.insert(410, json.dumps({"id": "no-text"}))
    lines.insert(420, json.dumps({"id": "clean-5", "completion": "a repeated id " + _text(999)}))
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def _recipe(**dedup):
    return CurateRecipe.model_validate(
        {
            "name": "demo",
            "id_column": "id",
            "quality": {"require_final_answer": False},
            "decontaminate": {"benchmarks": [{"name": "gsm8k-test", "path": str(DATA / "gsm8k/test.jsonl"), "fields": ["question"]}]},
            "dedup": {"threshold": 0.8, **dedup},
            "publish": {"shard_rows": 64},
        }
    )


def _streamed(recipe, path, store, shard_rows=SHARD):
    published, stages, _, _ = curate_in_shards(recipe, str(path), str(store), "test-run", shard_rows=shard_rows, task=plain)
    return published


def _shards_of(n_lines: int, shards: int) -> int:
    return -(-n_lines // shards)  # rows per shard for exactly ``shards`` shards


def _assert_same_version(streamed, reference):
    """Two versions of the same input: same counts, parts (byte for byte), signatures, stats, rows, rejects."""
    a, b = streamed.manifest, reference.manifest
    assert a["counts"] == b["counts"]
    assert a["shards"] == b["shards"]  # same parts, byte for byte (sha256)
    assert a["signatures"] == b["signatures"]
    assert a["stats"]["collapse"] == b["stats"]["collapse"]
    assert a["stats"]["contamination_hits"] == b["stats"]["contamination_hits"]
    assert a["stats"]["dedup_against"] == b["stats"]["dedup_against"]
    store_a, store_b = Store(streamed.uri.rsplit("/", 2)[0]), Store(reference.uri.rsplit("/", 2)[0])
    assert read_shards(store_a, a).equals(read_shards(store_b, b))
    assert read_shards(store_a, a, "reject_shards").equals(read_shards(store_b, b, "reject_shards"))


def test_curation_finds_duplicates_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(dedup, "DEFAULT_BUCKET_BYTES", 4096)  # forces the split of over-budget buckets
    path, n_lines = _input(tmp_path)
    published = _streamed(_recipe(), path, tmp_path / "store")
    manifest = published.manifest
    stages = {s["stage"]: s for s in manifest["counts"]["stages"]}
    assert list(stages) == ["ingest", "quality", "decontaminate", "dedup"]
    assert manifest["counts"]["input"] == n_lines
    for s in stages.values():
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    assert stages["ingest"]["dropped"] == {"invalid_json": 1, "missing_field": 1, "duplicate_id": 1}
    assert stages["quality"]["dropped"] == {"too_short": 1, "repetitive": 1}
    assert stages["decontaminate"]["dropped"] == {"contaminated": 1}
    assert stages["dedup"]["dropped"] == {"exact_duplicate": 3, "near_duplicate": 3}
    assert manifest["counts"]["published"] == 480  # clean-251 left, its copy on the line before it stayed
    store = Store(str(tmp_path / "store"))
    rejects = read_shards(store, manifest, "reject_shards").filter(pl.col("stage") == "dedup")
    got = dict(zip(rejects["sample_id"], zip(rejects["reason"], rejects["detail"], strict=True), strict=True))
    assert got["exact-of-3"] == ("exact_duplicate", "duplicates sample clean-3")
    assert got["exact-of-3-again"] == ("exact_duplicate", "duplicates sample clean-3")
    assert got["clean-251"] == ("exact_duplicate", "duplicates sample exact-of-250s-neighbour")
    assert got["near-of-1"][0] == "near_duplicate" and got["near-of-1"][1].startswith("duplicates sample clean-1 (J~")
    assert got["near-of-near"][0] == "near_duplicate" and got["near-of-near"][1].startswith("duplicates sample clean-1 (J~")
    assert got["near-of-10-last-shard"][0] == "near_duplicate" and "clean-10" in got["near-of-10-last-shard"][1]
    data = read_shards(store, manifest)
    assert data.height == 480 and data["sample_id"].n_unique() == 480
    assert "clean-251" not in set(data["sample_id"]) and "exact-of-250s-neighbour" in set(data["sample_id"])
    assert [s["rows"] for s in manifest["shards"]] == [64] * 7 + [480 - 7 * 64]
    sigs = read_shards(store, manifest, "signatures")
    assert sigs["sample_id"].to_list() == data["sample_id"].to_list()
    assert len(list((tmp_path / "store" / "demo").iterdir())) == 1  # one version, and no spill left in the store


@pytest.mark.parametrize("verify", ["exact", "signature"])
def test_the_same_input_in_one_shard_and_in_seven_publishes_the_same_version(tmp_path, verify):
    path, n_lines = _input(tmp_path)
    recipe = _recipe(verify_candidates=verify)
    one = _streamed(recipe, path, tmp_path / "a", shard_rows=n_lines)
    seven = _streamed(recipe, path, tmp_path / "b", shard_rows=_shards_of(n_lines, 7))
    assert [s["rows_in"] for s in one.manifest["counts"]["stages"]][:1] == [n_lines]
    assert one.manifest["counts"]["stages"][-1]["dropped"] == {"exact_duplicate": 3, "near_duplicate": 3}  # real duplicates, across shards of seven
    _assert_same_version(seven, one)

    # Against the first version: only new rows survive, the others are duplicate_of_earlier.
    second = tmp_path / "second.jsonl"
    rows = [{"id": f"again-{i}", "completion": _text(i) + (" Indeed" if i % 2 else "")} for i in range(0, 200, 7)]
    rows += [{"id": f"new-{i}", "completion": _text(i)} for i in range(5000, 5010)]
    second.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    again_one = _streamed(_recipe(verify_candidates=verify, against=[str(tmp_path / "a" / "demo")]), second, tmp_path / "a", shard_rows=len(rows))
    again_seven = _streamed(_recipe(verify_candidates=verify, against=[str(tmp_path / "b" / "demo")]), second, tmp_path / "b", shard_rows=_shards_of(len(rows), 7))
    assert again_one.manifest["counts"]["stages"][-1]["dropped"] == {"duplicate_of_earlier": len(rows) - 10}
    a, b = again_seven.manifest, again_one.manifest
    assert a["counts"] == b["counts"] and a["shards"] == b["shards"]
    rejects_a = read_shards(Store(str(tmp_path / "b")), a, "reject_shards")
    rejects_b = read_shards(Store(str(tmp_path / "a")), b, "reject_shards")
    assert rejects_a.drop("detail").equals(rejects_b.drop("detail"))
    # details name the version they duplicate: the same but for the store's path
    assert rejects_a["detail"].str.replace(str(tmp_path / "b"), "S", literal=True).equals(rejects_b["detail"].str.replace(str(tmp_path / "a"), "S", literal=True))


def _random_near_duplicates(priority: bool) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    vocab = [f"w{k}" for k in range(3000)]
    base = [" ".join(rng.choice(vocab, size=30)) for _ in range(300)]
    texts = []
    for i in range(900):
        words = base[rng.integers(0, 300)].split() if i % 3 else base[i // 3].split()
        for _ in range(rng.integers(0, 3)):  # 0-2 substitutions: J from 1.0 down to ~0.6
            words[rng.integers(0, 30)] = str(rng.choice(vocab))
        texts.append(" ".join(words))
    rows = pl.DataFrame({"sample_id": [f"s{i}" for i in range(900)], "completion": texts})
    if priority:
        rows = rows.with_columns(correct=pl.Series(rng.random(900) < 0.5), reward=pl.Series(np.round(rng.random(900), 1)))
    return rows


def _sharded_dedup(rows: pl.DataFrame, cfg, folder, shard: int):
    spilled = dedup.ShardedDedup(cfg, "completion", folder, bucket_bytes=2048)
    for start in range(0, rows.height, shard):
        part = rows.slice(start, shard)
        spilled.add_shard(part, minhash.signatures(part["completion"]))
    count = spilled.resolve()
    splits = [spilled.split(k) for k in range(len(spilled.shards))]
    spilled.close()
    assert not folder.exists()
    return count, pl.concat([k for k, _, _ in splits]), pl.concat([r for _, r, _ in splits]), pl.concat([t for _, _, t in splits])


@pytest.mark.parametrize("priority", [False, True])
def test_dedup_of_random_near_duplicates_is_the_same_in_one_shard_and_in_seven(tmp_path, priority):
    """Many clusters (chains included), tiny buckets: the same drops, details and kept rows (in
    input order) whatever the shards; with ``correct``/``reward`` columns, the keep policy decides."""
    rows = _random_near_duplicates(priority)
    cfg = _recipe().dedup
    count, kept, rejects, table = _sharded_dedup(rows, cfg, tmp_path / "one", rows.height)
    count7, kept7, rejects7, table7 = _sharded_dedup(rows, cfg, tmp_path / "seven", _shards_of(rows.height, 7))
    assert count == count7 and count.dropped["near_duplicate"] > 20 and count.dropped["exact_duplicate"] > 50
    assert kept.equals(kept7) and table.equals(table7)
    assert rejects.sort("sample_id").equals(rejects7.sort("sample_id"))
    assert kept["sample_id"].to_list() == [s for s in rows["sample_id"] if s in set(kept["sample_id"])]  # input order
    frame = dedup.dedup_samples(rows, cfg)  # a frame in memory: one shard of the same code
    assert frame.kept.equals(kept) and frame.count == count
    if priority:  # the policy mattered: without it, other rows would have been kept
        assert set(rejects["sample_id"]) != set(dedup.dedup_samples(rows.drop("correct", "reward"), cfg).rejects["sample_id"])
        exact = rejects.filter(pl.col("reason") == "exact_duplicate")
        for reject in exact.iter_rows(named=True):  # the copy it duplicates ranks first by the policy
            record = json.loads(reject["record"])
            winner = rows.filter(pl.col("sample_id") == reject["detail"].removeprefix("duplicates sample ")).row(0, named=True)
            assert (winner["correct"], winner["reward"]) >= (record["correct"], record["reward"])


def test_field_types_that_change_in_later_shards_publish_the_same_version_as_one_shard(tmp_path):
    """Shard 0 makes `m` a list of integers, `o` an object with field `x`, `n` integers; later shards
    bring floats (the columns widen), other object fields, `{}` and misfits (`type_mismatch`): the
    version is the one-shard version, byte for byte, and its counts add up."""
    rows = [{"id": f"r{i}", "completion": _text(i), "m": [i], "o": {"x": i}, "n": i} for i in range(120)]
    rows[70] = {**rows[70], "m": [0.5], "o": {"y": "z"}, "e": {}}  # shard 1: fits, widens
    rows[80] = {**rows[80], "m": {"x": 1}}  # shard 1: a misfit
    rows[110] = {**rows[110], "n": "ten", "late": [1, "x"]}  # shard 2: two misfits in one row (the first is named)
    rows[115] = {**rows[115], "late": {"k": [1]}, "n": 2.5}
    path = tmp_path / "typed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe()
    streamed = _streamed(recipe, path, tmp_path / "a")
    reference = _streamed(recipe, path, tmp_path / "b", shard_rows=len(rows))
    _assert_same_version(streamed, reference)
    counts = streamed.manifest["counts"]
    assert counts["stages"][0]["dropped"] == {"type_mismatch": 2}
    rejects = read_shards(Store(str(tmp_path / "a")), streamed.manifest, "reject_shards")
    assert counts["published"] + rejects.height == counts["input"] == 120
    assert rejects.filter(pl.col("reason") == "type_mismatch")["detail"].to_list() == [
        "line 81: field 'm' is an object, but the column is a list of floats (from line 1)",
        "line 111: field 'n' is a string, but the column is an integer (from line 1)",
    ]
    data = read_shards(Store(str(tmp_path / "a")), streamed.manifest)
    assert data.schema["m"] == pl.List(pl.Float64) and data.schema["n"] == pl.Float64 and data.schema["late"] == pl.Struct({"k": pl.List(pl.Int64)})
