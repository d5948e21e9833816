"""The `lorafam` command end to end on a tiny local model: train -> run folder -> merge -> eval, inspect.

The train run is a real subprocess (as a user runs it); the commands after it run in-process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tinyrun import cli, cli_env, cli_subprocess, make_model_folder, make_text_data, read_metrics, write_recipe
from transformers import AutoModelForCausalLM

from lorafam.merge import load_adapted
from lorafam.recipe import apply_override, load_recipe
from lorafam.run import open_run

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One `lorafam train` subprocess: 6 steps, a checkpoint every 2, all checkpoints kept."""
    root = tmp_path_factory.mktemp("e2e")
    model, data = make_model_folder(root / "model"), make_text_data(root / "train.jsonl")
    recipe = write_recipe(
        root / "tiny.yaml", model, data, root / "run", train={"max_steps": 6, "save_every": 2, "keep_last": None}
    )
    result = cli_subprocess("train", recipe)
    assert result.returncode == 0, result.stdout + result.stderr
    return root, recipe, result


def help_commands(text: str) -> list[str]:
    """The command names in the "Commands" panel of a --help screen, in order (rich's box: one row per
    command, its name in the first column; a wrapped description continues on rows with no name)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\s*╭─ Commands ─", line))
    names = []
    for line in lines[start + 1 :]:
        if line.lstrip().startswith("╰"):
            return names
        row = line.strip().removeprefix("│").removeprefix(" ")  # the box's edge and its one-space margin
        if row[:1].strip():
            names.append(row.split()[0])
    raise AssertionError("the Commands panel is not closed")


def readme_commands() -> dict[str, str]:
    """Each command line of the README's "Commands" block: name -> the rest of the line."""
    block = README_COMMANDS.search((ROOT / "README.md").read_text()).group(1)
    return {line.split()[1]: line for line in block.splitlines() if line.startswith("lorafam ")}


README_COMMANDS = re.compile(r"## Commands\n.*?```bash\n(.*?)```", re.S)


def test_help_lists_exactly_the_commands_the_readme_documents():
    result = cli("--help")
    assert result.exit_code == 0
    listed = help_commands(result.output)
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(readme_commands())
    analyze = help_commands(cli("analyze", "--help").output)
    assert "analyze " + "|".join(analyze) + " RUN_DIR" in readme_commands()["analyze"]
    for command in listed:  # each one answers its own --help, with its own usage line
        own = cli(command, "--help")
        assert own.exit_code == 0 and f" {command} [OPTIONS]" in own.output, command


def test_python_dash_m_lorafam_works():
    result = cli_subprocess("--help", env=cli_env() | {"COLUMNS": "120"})
    assert result.returncode == 0, result.stderr
    assert "Usage: python -m lorafam [OPTIONS] COMMAND" in result.stdout
    assert sorted(help_commands(result.stdout)) == sorted(readme_commands())


def test_train_writes_a_complete_run_folder(trained):
    root, recipe, result = trained
    run = root / "run"
    names = {p.name for p in run.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "run.json", "metrics.jsonl"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no temporary leftovers

    steps = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for row in steps:
        assert {"step", "loss", "lr", "tokens_per_s"} <= row.keys()
        assert row["loss"] > 0 and row["tokens_per_s"] > 0
    assert any("eval_loss" in r for r in read_metrics(run))

    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 6 and info["skipped_steps"] == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["output_dir"] == str(run)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert f"saved adapter to {run} (6 steps" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stderr


def test_merge_gives_a_plain_model_with_the_adapted_logits(trained):
    root, _, _ = trained
    merged = root / "merged"
    result = cli("merge", root / "run", "--output", merged)
    assert result.exit_code == 0, result.output + result.stderr
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(3, plain.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    adapted, variant = load_adapted(open_run(root / "run"))
    adapted.eval()
    assert any(t.abs().max() > 0 for k, t in variant.adapter_state_dict().items() if "lora_B" in k)  # trained
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max()
    assert diff < 1e-4
    assert not any(p.name.endswith(".safetensors") and "adapter" in p.name for p in merged.iterdir())


def test_eval_of_run_and_of_merged_model_agree(trained):
    root, recipe, _ = trained
    if not (root / "merged").exists():
        assert cli("merge", root / "run", "--output", root / "merged").exit_code == 0
    of_run = cli("eval", root / "run", "--json")
    assert of_run.exit_code == 0, of_run.output + of_run.stderr
    assert len(of_run.stdout.splitlines()) == 1
    run_metrics = json.loads(of_run.stdout)
    of_merged = cli("eval", recipe, "--set", f"model.name={root / 'merged'}", "--json")
    assert of_merged.exit_code == 0, of_merged.output + of_merged.stderr
    merged_metrics = json.loads(of_merged.stdout)
    assert run_metrics["tokens"] == merged_metrics["tokens"] > 0
    assert abs(run_metrics["loss"] - merged_metrics["loss"]) < 1e-5
    # and the base model, which the adapter changed
    of_base = json.loads(cli("eval", recipe, "--json").stdout)
    assert abs(of_base["loss"] - run_metrics["loss"]) > 1e-5


def test_inspect_prints_the_trainable_parameters(trained):
    root, recipe, _ = trained
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "model").parameters())
    # r=4 on q_proj (32 -> 32) and v_proj (32 -> 16: 2 kv heads of 8) in 2 layers.
    per_layer = {"q_proj": 4 * (32 + 32), "v_proj": 4 * (32 + 16)}
    for args, trainable in [
        ([recipe], 2 * sum(per_layer.values())),
        ([recipe, "--set", "adapter.target_modules=[q_proj]"], 2 * per_layer["q_proj"]),
        ([root / "run"], 2 * sum(per_layer.values())),
    ]:
        result = cli("inspect", *args)
        assert result.exit_code == 0, result.output + result.stderr
        total = base + trainable
        line = f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.4f}%)"
        assert line in result.output.splitlines()


@pytest.mark.parametrize(
    "item, key, expected",
    [
        ("adapter.target_modules=[q_proj,v_proj]", "adapter.target_modules", ["q_proj", "v_proj"]),
        ("adapter.target_modules=[q_proj, v_proj]", "adapter.target_modules", ["q_proj", "v_proj"]),
        ("adapter.target_modules=all-linear", "adapter.target_modules", "all-linear"),
        ("train.lr=1e-4", "train.lr", 1e-4),  # YAML 1.1 reads 1e-4 as a string; the recipe's type makes it a float
        ("train.max_steps=10", "train.max_steps", 10),
        ("train.save_every=null", "train.save_every", None),
        ("model.name=some/hub-id", "model.name", "some/hub-id"),
    ],
)
def test_set_values_are_parsed_as_yaml_then_typed_by_the_recipe(item, key, expected, tmp_path):
    raw = {"adapter": {"target_modules": ["x"]}, "train": {"save_every": 3}, "model": {"name": "m"}}
    apply_override(raw, item)
    section, name = key.split(".")
    if isinstance(expected, list):
        assert raw[section][name] == expected  # a YAML list, not the string "[q_proj,v_proj]"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "m"}, "adapter": {"variant": "lora"}, "data": {"train": "d.jsonl"}}))
    spec = load_recipe(recipe, [item])
    value = getattr(getattr(spec, section), name)
    assert value == expected and type(value) is type(expected)


def test_bad_rows_are_counted_in_the_summary_and_run_json(tmp_path, trained):
    root, _, _ = trained
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}] * 12
    rows += [{"text": ""}, {"text": 5}, {"text": " ".join(["sun"] * 80)}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(
        tmp_path / "r.yaml", root / "model", data, tmp_path / "run",
        train={"max_steps": 2, "save_every": None}, data_keys={"too_long": "drop", "eval": str(data)},
    )
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    out = " ".join(result.output.split())
    # train and eval read the same file here: every bad row is counted twice
    assert "data: text, 12 train / 12 eval examples (dropped too long 2, dropped empty 2, dropped malformed 2)" in out
    assert "data rows left out or cut: dropped too long 2, dropped empty 2, dropped malformed 2" in out
    report = json.loads((tmp_path / "run" / "run.json").read_text())["data_report"]
    assert report == {
        "read": 30, "kept": 24, "truncated": 0, "dropped_too_long": 2, "dropped_empty": 2, "dropped_malformed": 2
    }


def test_final_adapter_equals_the_last_trained_weights(trained, tmp_path, monkeypatch):
    """The final file is the live adapter right after the last optimizer step (not a stale checkpoint
    copy, nor touched by the eval and sample after it): bitwise, against the in-process state."""
    import lorafam.trainer as trainer
    from lorafam import api

    root, _, _ = trained
    recipe = write_recipe(tmp_path / "r.yaml", root / "model", root / "train.jsonl", tmp_path / "run",
                          train={"max_steps": 6, "save_every": 2, "keep_last": None})
    after_step: dict[int, dict[str, torch.Tensor]] = {}
    original = trainer.optimizer_step

    def recording(session, step, skip_nonfinite):
        outcome = original(session, step, skip_nonfinite)
        after_step[step] = {k: v.clone() for k, v in session.variant.adapter_state_dict().items()}
        return outcome

    monkeypatch.setattr(trainer, "optimizer_step", recording)
    result = api.train(recipe)
    assert sorted(after_step) == [1, 2, 3, 4, 5, 6]
    final = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert final.keys() == after_step[6].keys()
    for key in final:
        assert torch.equal(final[key], after_step[6][key]), key
        assert torch.equal(result.variant.adapter_state_dict()[key], final[key]), key
    assert any(not torch.equal(final[k], after_step[5][k]) for k in final)  # step 6 did change it
    last_checkpoint = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "adapter_model.safetensors")
    assert all(torch.equal(last_checkpoint[k], after_step[4][k]) for k in final)
    # and the subprocess run of the same recipe wrote the same adapter
    from_subprocess = load_file(root / "run" / "adapter_model.safetensors")
    assert all(torch.equal(from_subprocess[k], final[k]) for k in final)


def test_two_runs_in_one_process_may_use_different_precisions(trained, tmp_path):
    """The Python API (a notebook) trains twice: Accelerate's per-process state must not pin the
    first run's precision (it refuses a second Accelerator with another one)."""
    from lorafam import api

    root, _, _ = trained
    precisions = []
    for name, precision in (("fp32", "no"), ("bf16", "bf16"), ("again", "no")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", root / "model", root / "train.jsonl", tmp_path / name,
                              train={"max_steps": 2, "save_every": None, "mixed_precision": precision})
        precisions.append(api.train(recipe).info.precision["mixed_precision"])
    assert precisions == ["no", "bf16", "no"]
