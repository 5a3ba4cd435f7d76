"""`distillery curate` end to end (the session's Prefect server, no generation; inputs this small
need no Ray: their signatures fit in one task): quality filters,
benchmark decontamination, dedup, and a second run that dedups against the first version."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_prefect")]  # the runs report to one prefect server


def _clean_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        a, b = 3 * i + 7, 5 * i + 11
        text = (
            f"Worker {i} packs {a} boxes in the morning and {b} boxes in the afternoon of day {i}. "
            f"Adding the two shifts gives {a} + {b} = {a + b} boxes for item {i}. The answer is {a + b}."
        )
        rows.append({"id": f"clean-{i}", "completion": text})
    return rows


def _curate(input_path, store, tmp, *extra):
    cmd = [sys.executable, "-m", "distillery.cli", "curate", str(input_path), "--name", "demo", "--recipe", "recipes/curate-default.yaml", "--store", str(store), "--set", "id_column=id", *extra]
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    uri = Path(out.stdout.strip().splitlines()[-1])
    return uri, json.loads((uri / "manifest.json").read_text())


def test_curate_filters_decontaminates_dedups_and_respects_earlier_versions(tmp_path):
    gsm_test = [json.loads(line)["question"] for line in (DATA / "gsm8k/test.jsonl").read_text().splitlines()[:2]]
    aime = json.loads((DATA / "benchmarks/aime24/test.jsonl").read_text().splitlines()[0])["problem"]
    clean = _clean_rows(20)
    planted = [
        {"id": "leak-verbatim", "completion": gsm_test[0]},
        {"id": "leak-edited", "completion": "Please answer: " + gsm_test[1].upper().replace(",", "")},
        {"id": "leak-aime", "completion": "Here is a hard one. " + aime + " Let us think."},
    ]
    dupes = [{"id": "dup-exact", "completion": clean[0]["completion"].upper()}, {"id": "dup-near", "completion": clean[1]["completion"] + " Indeed"}]
    junk = [{"id": "too-short", "completion": "42"}, {"id": "loop", "completion": "Step 1: add 1 (sticks)\n" * 40}]
    lines = [json.dumps(r) for r in clean + planted + dupes + junk] + ["{broken json", json.dumps({"id": "no-text"})]
    first_input = tmp_path / "first.jsonl"
    first_input.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"

    uri, manifest = _curate(first_input, store, tmp_path)
    counts = manifest["counts"]
    assert counts["input"] == len(lines)
    stages = {s["stage"]: s for s in counts["stages"]}
    assert list(stages) == ["ingest", "quality", "decontaminate", "dedup"]
    for s in counts["stages"]:
        assert s["rows_out"] == s["rows_in"] * s["fanout"] - sum(s["dropped"].values())
    assert stages["ingest"]["dropped"] == {"invalid_json": 1, "missing_field": 1}
    assert stages["quality"]["dropped"] == {"too_short": 1, "repetitive": 1}
    assert stages["decontaminate"]["dropped"] == {"contaminated": 3}
    assert stages["dedup"]["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    hits = manifest["stats"]["contamination_hits"]
    assert hits["gsm8k-test"] == 2 and hits["aime24"] == 1 and hits["amc23"] == 0 and hits["svamp"] == 0
    published = pl.read_parquet(uri / "data")
    assert sorted(published["sample_id"]) == sorted(r["id"] for r in clean)
    rejects = pl.read_parquet(uri / "rejects")
    contaminated = rejects.filter(pl.col("reason") == "contaminated")
    assert sorted(contaminated["sample_id"]) == ["leak-aime", "leak-edited", "leak-verbatim"]
    assert all(json.loads(d)["benchmark"] in ("gsm8k-test", "aime24") for d in contaminated["detail"])
    assert manifest["signatures"]["num_perm"] == 128 and (uri / manifest["signatures"]["shards"][0]["path"]).is_file()
    assert "collapse" in manifest["stats"] and "n2" in manifest["stats"]["collapse"]["output"]

    # A second data set: everything already published, plus new rows. Against v1, only the new rows survive.
    new = _clean_rows(5, offset=1000)
    second_input = tmp_path / "second.jsonl"
    second_input.write_text("\n".join(json.dumps(r) for r in clean + new) + "\n")
    uri2, manifest2 = _curate(second_input, store, tmp_path, "--set", f"dedup.against=[{store}/demo]")
    assert uri2.name == "v0002"
    assert sorted(pl.read_parquet(uri2 / "data")["sample_id"]) == sorted(r["id"] for r in new)
    dropped = pl.read_parquet(uri2 / "rejects").filter(pl.col("reason") == "duplicate_of_earlier")
    assert sorted(dropped["sample_id"]) == sorted(r["id"] for r in clean)
    assert manifest2["stats"]["dedup_against"] == [f"{store}/demo/v0001"]
