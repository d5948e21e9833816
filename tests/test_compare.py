"""`lorafam compare` on a tiny model: three variants, the files it writes, rows equal to each run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tinyrun import cli, make_model_folder, make_text_data, read_metrics, write_recipe

from lorafam.compare import FILES

VARIANTS = ("lora", "dora", "vera")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model, data = make_model_folder(root / "model"), make_text_data(root / "train.jsonl")
    recipe = write_recipe(
        root / "base.yaml", model, data, root / "unused",
        train={"max_steps": 6, "lr": 3e-2, "eval_every": 2, "save_every": 3, "mixed_precision": "no"},
    )
    # VeRA's own recipe next to the compared one: its tuned keys are taken, its target_modules not.
    # lr 3e-2 and VeRA's d_initial 0.5: in 6 steps on random words every variant's eval loss falls
    # (at lr 1e-2 DoRA's does not, and VeRA with d_initial 0.05 does not move at all).
    (root / "vera.yaml").write_text(yaml.safe_dump({"adapter": {"variant": "vera", "r": 16, "d_initial": 0.5, "target_modules": "all-linear"}}))
    result = cli("compare", recipe, "--variants", ",".join(VARIANTS), "--set", "adapter.rslora=true", "--output", root / "out")
    assert result.exit_code == 0, result.output + result.stderr
    return root, result


def test_every_file_is_written(compared):
    root, result = compared
    for name in FILES:
        assert (root / "out" / name).stat().st_size > 0, name
    for variant in VARIANTS:
        assert (root / "out" / variant / "adapter_model.safetensors").is_file()
    assert "[2/3] dora" in result.output


def test_each_row_matches_its_run_folder(compared):
    root, _ = compared
    rows = {r["variant"]: r for r in json.loads((root / "out" / "compare.json").read_text())["rows"]}
    assert set(rows) == set(VARIANTS)
    for variant, row in rows.items():
        run = root / "out" / variant
        info = json.loads((run / "run.json").read_text())
        assert row["trainable_params"] == info["trainable_params"]
        assert row["eval_loss_before"] == info["eval_before"]["loss"]
        assert row["eval_loss_after"] == info["eval_after"]["loss"]
        assert row["eval_loss_after"] < row["eval_loss_before"], (variant, row)  # each variant learned
        assert row["final_train_loss"] == info["final_train_loss"]
        evals = [r for r in read_metrics(run) if "eval_loss" in r]
        assert [(c["step"], c["loss"]) for c in row["eval_curve"]] == [(r["step"], r["eval_loss"]) for r in evals]
        assert [c["step"] for c in row["eval_curve"]] == [2, 4, 6]
        assert row["merged_eval_equal"] is True and row["merged_eval_difference"] < 1e-5
        assert row["peak_rss_bytes"] > 50 * 2**20 and row["median_step_seconds"] > 0
        assert f"| `{variant}` | {row['trainable_params']:,} |" in (root / "out" / "compare.md").read_text()


def test_recipes_share_the_compared_settings_and_take_the_variants_own_keys(compared):
    root, _ = compared
    recipes = {v: yaml.safe_load((root / "out" / v / "recipe.yaml").read_text()) for v in VARIANTS}
    for variant, recipe in recipes.items():
        assert recipe["train"]["max_steps"] == 6 and recipe["train"]["lr"] == 3e-2 and recipe["train"]["seed"] == 3
        assert recipe["adapter"]["target_modules"] == ["q_proj", "v_proj"]  # the compared recipe's, for all
    assert recipes["vera"]["adapter"]["r"] == 16 and recipes["vera"]["adapter"]["d_initial"] == 0.5
    assert recipes["lora"]["adapter"]["rslora"] is True and recipes["dora"]["adapter"]["rslora"] is True
    assert "rslora" not in recipes["vera"]["adapter"]  # vera has no such key: skipped, and said so
    notes = json.loads((root / "out" / "compare.json").read_text())["rows"]
    assert any("skipped: vera has no key rslora" in n for r in notes if r["variant"] == "vera" for n in r["notes"])


def test_a_rerun_skips_finished_variants(compared):
    root, _ = compared
    before = (root / "out" / "lora" / "adapter_model.safetensors").stat().st_mtime_ns
    again = cli("compare", root / "base.yaml", "--variants", "lora", "--set", "adapter.rslora=true", "--output", root / "out")
    assert again.exit_code == 0, again.output + again.stderr
    assert "[lora] " not in again.output  # no training process was started
    assert (root / "out" / "lora" / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_an_unknown_variant_is_one_line(tmp_path):
    result = cli("compare", tmp_path / "r.yaml", "--variants", "lora,lorax")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --variants: unknown variant 'lorax'; choose from " + ", ".join(
        __import__("lorafam.adapters", fromlist=["VARIANTS"]).VARIANTS
    ) + " or 'all'"
