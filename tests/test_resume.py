"""Training that survives: kill/resume, SIGINT/SIGTERM, damaged checkpoints, NaN losses, safe loading.

The claim under test: on CPU with a fixed seed, a run stopped at any step and resumed ends with the
*bitwise* same adapter (and the same logged losses) as the run that was never stopped; dropout is
on wherever the variant allows it, so the RNG state must come back exactly.

Runs go through the real CLI on the tiny model of tests/tinyrun.py: in-process (CliRunner) where a
signal can be raised from inside, as a subprocess where it must come from outside (SIGKILL).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tinyrun import (
    adapter_section,
    cli,
    cli_env,
    read_metrics,
    write_recipe,
)

import lorafam.run as run_folder
from lorafam.adapters import VARIANTS
from lorafam.checkpoint import MANIFEST, OPTIMIZER_STATE, find_latest_checkpoint, verify_checkpoint
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.recipe import TrainConfig
from lorafam.run import ADAPTER_WEIGHTS

STEPS = 12  # tinyrun's recipe: 12 steps, a checkpoint every 2, keep_last 3 (the default)


def recipe_for(tmp_path: Path, assets, variant: str = "lora", name: str = "run", **train) -> Path:
    model, data = assets
    return write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter_section(variant), train=train)


_references: dict[tuple, tuple[dict[str, torch.Tensor], list[dict]]] = {}


def reference(variant: str, tmp_path_factory, assets, **train) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The uninterrupted run of ``variant`` (with ``train`` overrides): final adapter tensors and
    metrics rows (computed once per setting)."""
    key = (variant, tuple(sorted(train.items())))
    if key not in _references:
        folder = tmp_path_factory.mktemp(f"reference-{variant}")
        result = cli("train", recipe_for(folder, assets, variant, **train))
        assert result.exit_code == 0, result.output + result.stderr
        run_dir = folder / "run"
        if not train:  # keep_last: 3 of the 5 checkpoints (steps 2..10) remain; the final step writes none.
            assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006", "step-000008", "step-000010"]
        _references[key] = (load_file(run_dir / ADAPTER_WEIGHTS), comparable(read_metrics(run_dir)))
    return _references[key]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_seconds")} for row in rows]


def assert_same_adapter(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(run_dir / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    for key in expected:  # bitwise: resuming must not change a single float
        assert torch.equal(got[key], expected[key]), f"{key}: max diff {(got[key] - expected[key]).abs().max()}"


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process while the loop logs ``step`` (mid-step, before its checkpoint)."""
    original = run_folder.write_metrics

    def write_metrics(handle, row):
        original(handle, row)
        if row.get("step") == step and "loss" in row and "phase" not in row:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(run_folder, "write_metrics", write_metrics)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    assert "Traceback" not in text
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Stop and resume: every registered variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(variant, tmp_path, tmp_path_factory, assets, monkeypatch):
    expected_adapter, expected_rows = reference(variant, tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets, variant)
    run_dir = tmp_path / "run"

    signal_at(monkeypatch, 7, signal.SIGTERM)
    stopped = cli("train", recipe)
    monkeypatch.undo()
    assert stopped.exit_code == 143
    assert one_line(stopped.stderr) == (
        f"error: interrupted by SIGTERM after step 7; checkpoint saved to {run_dir}/checkpoints/step-000007; "
        f"resume with: lorafam train {recipe} --resume"
    )
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000007")["step"] == 7
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    assert not (run_dir / ADAPTER_WEIGHTS).exists()
    refused = cli("eval", run_dir)  # an unfinished run is not an adapter to use
    assert refused.exit_code == 2 and "did not finish; resume it with" in one_line(refused.stderr)

    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-000007 (step 7/{STEPS})" in resumed.output
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows  # continued, no step twice
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete" and info["resumed_from"] == [7]


def test_sigint_exits_130_with_the_resume_command_including_overrides(tmp_path, assets, monkeypatch):
    recipe = recipe_for(tmp_path, assets)
    signal_at(monkeypatch, 3, signal.SIGINT)
    stopped = cli("train", recipe, "--set", "adapter.target_modules=[q_proj, v_proj]")
    assert stopped.exit_code == 130
    assert one_line(stopped.stderr).endswith(
        f"resume with: lorafam train {recipe} '--set=adapter.target_modules=[q_proj, v_proj]' --resume"
    )
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()


ACCUM = {"grad_accum": 2}  # global batch 8: 56 training rows make 7 steps per epoch, so 12 steps cross one


def test_the_accumulated_runs_cross_an_epoch_boundary(tmp_path, assets):
    from lorafam.data import prepare_data
    from lorafam.recipe import load_recipe
    from lorafam.trainer import BatchLayout

    spec = load_recipe(recipe_for(tmp_path, assets, **ACCUM))
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets[0])
    n_train = len(prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed).train)
    assert BatchLayout(spec.train.batch_size, spec.train.grad_accum).steps_per_epoch(n_train) == 7 < 9 < STEPS < 14


@pytest.mark.parametrize(
    "variant, stop_at",
    # after the epoch boundary (the data position must come back in epoch 2) for the variants whose
    # state depends on the step (AdaLoRA's budget, Delta-LoRA's start, LoRA-drop's probe phase), and
    # before it for LoRA (the resumed run then crosses it)
    [("lora", 9), ("adalora", 9), ("delta_lora", 9), ("lora_drop", 9), ("lora", 5)],
)
def test_resume_with_grad_accum_across_an_epoch_boundary_matches_uninterrupted_run(
    variant, stop_at, tmp_path, tmp_path_factory, assets, monkeypatch
):
    expected_adapter, expected_rows = reference(variant, tmp_path_factory, assets, **ACCUM)
    recipe = recipe_for(tmp_path, assets, variant, **ACCUM)
    run_dir = tmp_path / "run"
    signal_at(monkeypatch, stop_at, signal.SIGTERM)
    assert cli("train", recipe).exit_code == 143
    monkeypatch.undo()
    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-{stop_at:06d} (step {stop_at}/{STEPS})" in resumed.output
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == [stop_at]
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows


# --------------------------------------------------------------------------------------------------
# Killed from outside


# The CLI as a user runs it, held right after it logs training step LORAFAM_TEST_HOLD_STEP until the
# test creates HOLD_DIR/release, so the test signals or kills it at a known point of the run however
# slow the machine is (it waits for HOLD_DIR/held, not for a time). While held it also says, with
# HOLD_DIR/signalled, that its SIGINT/SIGTERM handler has taken a first signal. Nothing else is changed.
HELD_CLI = """
import os, signal, sys, time
from pathlib import Path
import lorafam.run as run_folder

write, hold, folder = run_folder.write_metrics, int(os.environ["LORAFAM_TEST_HOLD_STEP"]), Path(os.environ["HOLD_DIR"])

def write_then_hold(handle, row):
    write(handle, row)
    if row.get("step") != hold or "loss" not in row or "phase" in row:
        return
    (folder / "held").touch()
    while not (folder / "release").exists():
        handler = signal.getsignal(signal.SIGTERM)
        if getattr(getattr(handler, "__self__", None), "signum", None) is not None:
            (folder / "signalled").touch()
        time.sleep(0.02)

run_folder.write_metrics = write_then_hold
from lorafam.cli import main
sys.argv[0] = "lorafam"
main()
"""
#: Generous: a held run does not move on by itself, so waiting longer only matters on a very slow machine.
WAIT_S = 1200
#: A process that stops at once only has to exit (no step, no checkpoint): minutes are plenty.
SECOND_SIGNAL_EXIT_S = 180


@pytest.fixture
def start_held_train():
    """Starts held runs; any still running when the test ends (it failed) is killed."""
    started: list[subprocess.Popen] = []

    def start(recipe: Path, hold_step: int, folder: Path) -> subprocess.Popen:
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", HELD_CLI, "train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=cli_env() | {"LORAFAM_TEST_HOLD_STEP": str(hold_step), "HOLD_DIR": str(folder)},
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def stopped_stderr(process: subprocess.Popen, within: float) -> str:
    """The stderr of a run that must exit within ``within`` seconds."""
    try:
        return process.communicate(timeout=within)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"train did not exit within {within} s")


def wait_for(process: subprocess.Popen, marker: Path) -> None:
    """Until the held run creates ``marker`` (it must not exit before)."""
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"train exited ({process.returncode}) before {marker.name}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {marker.name} within {WAIT_S} s")
        time.sleep(0.02)


def training_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "loss" in r and "phase" not in r]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(variant, tmp_path, tmp_path_factory, assets, start_held_train):
    expected_adapter, expected_rows = reference(variant, tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets, variant)
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    process = start_held_train(recipe, 5, hold)
    wait_for(process, hold / "held")  # step 5 trained and logged; its checkpoint (every 2) would come at 6
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert training_steps(run_dir) == [1, 2, 3, 4, 5] and not (run_dir / ADAPTER_WEIGHTS).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-000004 (step 4/{STEPS})" in resumed.output
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == [4]
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows  # step 5 logged once, by the resumed run


def test_sigterm_from_outside_checkpoints_and_prints_the_resume_command(tmp_path, tmp_path_factory, assets, start_held_train):
    expected_adapter, _ = reference("lora", tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets)
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    process = start_held_train(recipe, 3, hold)
    wait_for(process, hold / "held")
    process.send_signal(signal.SIGTERM)
    wait_for(process, hold / "signalled")
    (hold / "release").touch()  # the step finishes, then the run stops with a checkpoint of it
    stderr = stopped_stderr(process, WAIT_S)
    assert process.returncode == 143
    assert one_line(stderr.strip()) == (
        f"error: interrupted by SIGTERM after step 3; checkpoint saved to {run_dir}/checkpoints/step-000003; "
        f"resume with: lorafam train {recipe} --resume"
    )
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000003")["step"] == 3
    assert training_steps(run_dir) == [1, 2, 3]

    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-000003 (step 3/{STEPS})" in resumed.output
    assert_same_adapter(run_dir, expected_adapter)


def test_a_second_signal_stops_at_once_without_a_checkpoint(tmp_path, tmp_path_factory, assets, start_held_train):
    expected_adapter, expected_rows = reference("lora", tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets)
    run_dir, hold = tmp_path / "run", tmp_path / "hold"
    process = start_held_train(recipe, 3, hold)
    wait_for(process, hold / "held")
    process.send_signal(signal.SIGTERM)
    wait_for(process, hold / "signalled")  # the first one is taken: the run would stop after this step
    process.send_signal(signal.SIGTERM)  # the step is never released: only stopping at once ends the process
    stderr = stopped_stderr(process, SECOND_SIGNAL_EXIT_S)
    assert process.returncode == 143
    assert one_line(stderr.strip()) == "SIGTERM again: stopping now, without a checkpoint of this step"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run_dir / ADAPTER_WEIGHTS).exists()

    resumed = cli("train", recipe, "--resume")  # the newest checkpoint is still good
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-000002 (step 2/{STEPS})" in resumed.output
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints


def test_damaged_and_partial_checkpoints_are_skipped_for_the_previous_one(tmp_path, tmp_path_factory, assets, monkeypatch):
    expected_adapter, expected_rows = reference("lora", tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets)
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    signal_at(monkeypatch, 9, signal.SIGTERM)
    assert cli("train", recipe).exit_code == 143
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008", "step-000009"]

    # A kill during a write leaves: a truncated file (step 9), a folder without its manifest (step 8),
    # a hidden temp folder of a later step, and half a metrics line.
    adapter = root / "step-000009" / ADAPTER_WEIGHTS
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    (root / "step-000008" / MANIFEST).unlink()
    shutil.copytree(root / "step-000009", root / ".step-000010.tmp")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10, "lo')

    # train.resume: auto does what --resume does (and is no recipe difference).
    resumed = cli("train", recipe, "--set", "train.resume=auto")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    warnings = resumed.stderr.splitlines()
    assert warnings[0] == (
        f"warning: skipping checkpoint {root}/step-000009: {ADAPTER_WEIGHTS} does not match its checksum "
        f"in {MANIFEST} (truncated or corrupt)"
    )
    assert warnings[1] == f"warning: skipping checkpoint {root}/step-000008: no {MANIFEST} (the write did not finish)"
    assert len(warnings) == 2
    assert f"resuming from {root}/step-000006 (step 6/{STEPS})" in resumed.output
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows
    # The damaged ones were rewritten or removed; the temp folder was never read and is gone.
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008", "step-000010"]


def test_checkpoint_with_a_bad_safetensors_header_is_skipped(tmp_path, assets, monkeypatch):
    recipe = recipe_for(tmp_path, assets)
    signal_at(monkeypatch, 5, signal.SIGTERM)
    assert cli("train", recipe).exit_code == 143
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000005"
    # Damaged before the manifest was computed (e.g. a bad disk): the checksums match, the header does not.
    (checkpoint / ADAPTER_WEIGHTS).write_bytes(b"\xff" * 64)
    rewrite_manifest(checkpoint)
    warnings: list[str] = []
    found = find_latest_checkpoint(tmp_path / "run", warnings.append)
    assert found is not None and found.step == 4
    assert warnings == [
        f"warning: skipping checkpoint {checkpoint}: {ADAPTER_WEIGHTS} is not a valid safetensors file "
        + warnings[0].split("is not a valid safetensors file ", 1)[1]
    ]


def rewrite_manifest(checkpoint: Path) -> None:
    from lorafam.checkpoint import _describe

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {name: _describe(checkpoint / name) for name in manifest["files"]}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------
# What --resume refuses or reports


def test_resume_with_a_changed_recipe_is_refused_and_touches_nothing(tmp_path, assets, monkeypatch):
    recipe = recipe_for(tmp_path, assets)
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert cli("train", recipe).exit_code == 143
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    refused = cli("train", recipe, "--resume", "--set", "train.lr=0.02")
    assert refused.exit_code == 2
    assert one_line(refused.stderr) == (
        f"error: output_dir {tmp_path / 'run'} holds a different run (its recipe.yaml differs at train.lr: "
        "saved 0.01, now 0.02); --resume needs the recipe the run started with; choose another output_dir "
        "with --set output_dir=..."
    )
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*")) == before


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, tmp_path_factory, assets):
    expected_adapter, _ = reference("lora", tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets)
    result = cli("train", recipe, "--resume")
    assert result.exit_code == 0, result.output + result.stderr
    assert f"no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting from step 0" in result.output
    assert_same_adapter(tmp_path / "run", expected_adapter)  # and a fresh run is deterministic

    again = cli("train", recipe, "--resume")
    assert again.exit_code == 0
    assert f"{tmp_path / 'run'} already holds this run, finished ({STEPS} steps); nothing to resume" in again.output


def test_resume_and_overwrite_together_are_refused(tmp_path, assets):
    result = cli("train", recipe_for(tmp_path, assets), "--resume", "--overwrite")
    assert result.exit_code == 2
    assert one_line(result.stderr) == "error: --overwrite starts over and --resume continues: pass one of them"
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Non-finite losses


def test_diverging_run_stops_naming_the_step_and_last_good_checkpoint(tmp_path, assets):
    # lr 1e30: step 1 is finite and moves B to ~1e30; in step 2 RMSNorm's square overflows and
    # the backward pass turns inf * 0 into NaN gradients (the loss itself stays finite).
    recipe = recipe_for(tmp_path, assets, lr=1e30, save_every=1)
    run_dir = tmp_path / "run"
    result = cli("train", recipe)
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        f"error: gradient norm is nan at step 2/{STEPS}; stopped before the optimizer step (train.on_nan: stop); "
        f"last good checkpoint: {run_dir}/checkpoints/step-000001; lower train.lr, check the data, "
        "or set train.on_nan: skip"
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged" and info["stopped_at_step"] == 2
    assert not (run_dir / ADAPTER_WEIGHTS).exists()
    assert not (run_dir / "checkpoints" / "step-000002").exists()


def test_nan_loss_stops_the_run(tmp_path, assets, monkeypatch):
    # NaN injected into the model's hidden states on the 5th training forward (step 5: grad_accum
    # is 1), so the loss computed from them is NaN.
    forward, calls = transformers.LlamaModel.forward, []

    def nan_on_fifth(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                out.last_hidden_state = out.last_hidden_state * float("nan")
        return out

    monkeypatch.setattr(transformers.LlamaModel, "forward", nan_on_fifth)
    run_dir = tmp_path / "run"
    result = cli("train", recipe_for(tmp_path, assets))
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        f"error: loss is nan at step 5/{STEPS}; stopped before the optimizer step (train.on_nan: stop); "
        f"last good checkpoint: {run_dir}/checkpoints/step-000004; lower train.lr, check the data, "
        "or set train.on_nan: skip"
    )
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # nothing logged for the NaN step


def test_nan_loss_without_checkpoints_says_none_was_written(tmp_path, assets):
    result = cli("train", recipe_for(tmp_path, assets, lr=1e30, save_every=None))
    assert result.exit_code == 1
    assert "no checkpoint was written yet (train.save_every is not set)" in one_line(result.stderr)


def test_on_nan_skip_skips_the_steps_and_counts_them(tmp_path, assets):
    run_dir = tmp_path / "run"
    result = cli("train", recipe_for(tmp_path, assets, lr=1e30, on_nan="skip"))
    assert result.exit_code == 0, result.output + result.stderr
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped[0] == 2 and len(skipped) >= STEPS // 2  # step 1 trained; most later batches give NaN
    assert all(r["loss"] is not None for r in rows if not r.get("skipped"))
    assert all(r["loss"] is None for r in rows if r.get("skipped"))
    info = json.loads((run_dir / "run.json").read_text())
    assert info["skipped_steps"] == len(skipped)
    assert f"skipped {len(skipped)} of {STEPS} optimizer steps for a non-finite loss (train.on_nan: skip)" in result.output
    # No update came from a NaN batch: the adapter holds numbers.
    assert all(torch.isfinite(t).all() for t in load_file(run_dir / ADAPTER_WEIGHTS).values())


# --------------------------------------------------------------------------------------------------
# Safe loading


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_optimizer_and_scheduler_state_load_with_weights_only(optimizer, schedule):
    cfg = TrainConfig(optimizer=optimizer, schedule=schedule, warmup_steps=2, lr=0.1)

    def build():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
        opt = make_optimizer([{"params": params, "lr": cfg.lr, "weight_decay": 0.0}], cfg)
        return params, opt, make_scheduler(opt, cfg, 10)

    params, opt, sched = build()
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step(), sched.step(), opt.zero_grad()
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # raises on anything but tensors and plain containers
    _, fresh_opt, fresh_sched = build()
    fresh_opt.load_state_dict(saved["optimizer"])
    fresh_sched.load_state_dict(saved["scheduler"])
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    assert fresh_sched.state_dict() == sched.state_dict()
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(fresh_opt.state_dict()["state"][0][key]), torch.as_tensor(value))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_payload_in_a_checkpoint_is_refused_not_run(tmp_path, assets, monkeypatch):
    recipe = recipe_for(tmp_path, assets)
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert cli("train", recipe).exit_code == 143
    monkeypatch.undo()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    (checkpoint / OPTIMIZER_STATE).write_bytes(pickle.dumps({"optimizer": _Payload()}))
    rewrite_manifest(checkpoint)  # a consistent forgery, so only the loader stands in the way
    monkeypatch.chdir(tmp_path)
    result = cli("train", recipe, "--resume")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(
        f"error: {checkpoint / OPTIMIZER_STATE} holds objects other than tensors and plain containers; refusing to unpickle it"
    )
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("trust", [None, True])
def test_trust_remote_code_is_false_unless_the_recipe_sets_it(trust, tmp_path, assets, monkeypatch):
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.recipe import ModelConfig

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    cfg = ModelConfig(name=str(assets[0])) if trust is None else ModelConfig(name=str(assets[0]), trust_remote_code=True)
    load_tokenizer(cfg)
    load_model(cfg)
    assert {name for name, _ in seen} == {"AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"}
    assert all(value is bool(trust) for _, value in seen), seen
