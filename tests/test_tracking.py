"""train.report_to: the rows of metrics.jsonl, the recipe and the variant's plots reach the trackers,
read back from TensorBoard's own event files."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tinyrun import adapter_section, cli, read_metrics, write_recipe


def events(run_dir):
    folders = [p.parent for p in (run_dir / "trackers").rglob("events.out.tfevents.*")]
    assert folders, "no TensorBoard event file was written"
    accumulators = [EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0}) for f in set(folders)]
    for acc in accumulators:
        acc.Reload()
    return accumulators


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for acc in events(run_dir):
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_gets_every_metrics_row_and_the_recipe(tmp_path, assets):
    model, data = assets
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run",
                          train={"max_steps": 6, "log_every": 2, "eval_every": 3, "report_to": ["tensorboard"], "mixed_precision": "no"})
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    logged = scalars(tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    for key in ("loss", "lr", "tokens_per_s"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged[key]] == [s for s, _ in expected] == [2, 4, 6]
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert [s for s, _ in logged["eval_loss"]] == [3, 6]
    hparams = next((tmp_path / "run" / "trackers").rglob("hparams.yml")).read_text()
    assert "train.lr: 0.01" in hparams and "adapter.variant: lora" in hparams


def test_a_variants_plot_is_logged_as_an_image(tmp_path, assets):
    model, data = assets
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run", adapter=adapter_section("adalora"),
                          train={"max_steps": 8, "report_to": ["tensorboard"], "save_every": None, "mixed_precision": "no"})
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    assert (tmp_path / "run" / "adalora_ranks.png").is_file()
    images = [(tag, acc.Images(tag)) for acc in events(tmp_path / "run") for tag in acc.Tags()["images"]]
    assert [tag for tag, _ in images] == ["adalora_ranks"]
    image = images[0][1][-1]
    assert image.step == 8 and image.width > 100 and image.height > 100
    assert "rank" in json.dumps(scalars(tmp_path / "run").keys().__repr__())  # the variant's own logged terms


def test_a_tracker_that_is_not_installed_is_one_line_and_nothing_is_written(tmp_path, assets):
    model, data = assets
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run", train={"report_to": ["aim"]})
    result = cli("train", recipe)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: train.report_to: aim is not installed; pip install aim, or remove it from train.report_to"
    assert not (tmp_path / "run").exists()
