"""The CLI's failure modes: a bad recipe names the field (exit 2); a missing model is clear (exit 1)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_bad_recipe_field_exits_2_and_names_it(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nseeds: {path: x.jsonl}\ngeneration: {temperature: hot}\n")
    out = _cli("run", str(recipe), "--store", str(tmp_path / "store"))
    assert out.returncode == 2
    assert "field 'generation.temperature'" in out.stderr and "'hot'" in out.stderr
    assert not (tmp_path / "store").exists()


def test_bad_override_exits_2(tmp_path):
    out = _cli("run", "recipes/default.yaml", "--set", "generation.samples_per_problme=3")
    assert out.returncode == 2 and "generation.samples_per_problme" in out.stderr


def test_missing_model_folder_is_a_clear_error(tmp_path):
    out = _cli("run", "recipes/default.yaml", "--set", f"model.path={tmp_path / 'no-model'}", "--store", str(tmp_path / "s"))
    assert out.returncode == 1
    assert "model.path" in out.stderr and "no-model" in out.stderr and "Traceback" not in out.stderr


def test_datasets_list_and_show_on_a_store(tmp_path):
    from tests.test_store_publish import publish_demo, sample_rows

    from distillery.store import Store

    publish_demo(Store(str(tmp_path)), sample_rows(3))
    publish_demo(Store(str(tmp_path)), sample_rows(4))
    listing = _cli("datasets", "--store", str(tmp_path), "list")
    assert listing.returncode == 0 and "v0001" in listing.stdout and "v0002" in listing.stdout
    shown = _cli("datasets", "--store", str(tmp_path), "show", "demo", "--json")
    assert json.loads(shown.stdout)["version"] == "v0002"
    diff = _cli("datasets", "--store", str(tmp_path), "diff", "demo", "v0001", "v0002")
    assert diff.returncode == 0 and "rows: 3 -> 4 (+1 added, -0 removed, 3 in both)" in diff.stdout
    missing = _cli("datasets", "--store", str(tmp_path), "show", "demo", "v0009")
    assert missing.returncode == 1 and "no such version" in missing.stderr


def test_datasets_list_show_diff_on_a_reward_model(tmp_path):
    from tests.stages.test_reward_training import publish_fake_reward_model

    from distillery.store import Store

    publish_fake_reward_model(Store(str(tmp_path)))
    publish_fake_reward_model(Store(str(tmp_path)))
    listing = _cli("datasets", "--store", str(tmp_path), "list")
    assert listing.returncode == 0 and "rm " in listing.stdout and "v0002" in listing.stdout, listing.stderr
    shown = _cli("datasets", "--store", str(tmp_path), "show", "rm")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# rm v0002 (reward model)") and "| held-out | 1 | 1 | 0 | n/a |" in shown.stdout
    assert "| select_examples | 4 | 1 | unlabeled: 1 | 3 |" in shown.stdout
    diff = _cli("datasets", "--store", str(tmp_path), "diff", "rm", "v0001", "v0002")
    assert diff.returncode == 0 and "rows: 3 -> 3" in diff.stdout, diff.stderr


def test_train_reward_model_usage_errors_are_quick_and_clear(tmp_path):
    bad_fraction = _cli("train-reward-model", "x/y/v0001", "--name", "rm", "--heldout-fraction", "1.5")
    assert bad_fraction.returncode == 2 and "--heldout-fraction" in bad_fraction.stderr
    bad_name = _cli("train-reward-model", "x/y/v0001", "--name", "Bad Name")
    assert bad_name.returncode == 2 and "--name" in bad_name.stderr
    missing = _cli("train-reward-model", f"{tmp_path}/samples/v0003", "--name", "rm", "--store", str(tmp_path))
    assert missing.returncode == 1 and "no such version" in missing.stderr and "Traceback" not in missing.stderr
