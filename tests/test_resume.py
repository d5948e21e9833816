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
from tinyrun import (  # one_thread: an autouse fixture, active where imported
    one_thread,
    adapter_section,
    cli,
    cli_env,
    make_model_folder,
    make_text_data,
    read_metrics,
    write_recipe,
)

import lorafam.trainer as trainer
from lorafam.adapters import VARIANTS
from lorafam.checkpoint import MANIFEST, OPTIMIZER_STATE, find_latest_checkpoint, verify_checkpoint
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.recipe import TrainConfig
from lorafam.run import ADAPTER_WEIGHTS

STEPS = 12  # tinyrun's recipe: 12 steps, a checkpoint every 2, keep_last 3 (the default)
# The variants whose resume the issue names; killed from outside with SIGKILL. Every registered
# variant gets the in-process interrupt/resume test below.
SIGKILL_VARIANTS = [v for v in ("lora", "adalora", "delta_lora") if v in VARIANTS]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_model_folder(root / "model"), make_text_data(root / "train.jsonl")


def recipe_for(tmp_path: Path, assets, variant: str = "lora", name: str = "run", **train) -> Path:
    model, data = assets
    return write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter_section(variant), train=train)


_references: dict[str, tuple[dict[str, torch.Tensor], list[dict]]] = {}


def reference(variant: str, tmp_path_factory, assets) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The uninterrupted run of ``variant``: final adapter tensors and metrics rows (computed once)."""
    if variant not in _references:
        folder = tmp_path_factory.mktemp(f"reference-{variant}")
        result = cli("train", recipe_for(folder, assets, variant))
        assert result.exit_code == 0, result.output + result.stderr
        run_dir = folder / "run"
        # keep_last: 3 of the 5 checkpoints (steps 2..10) remain; the final step writes none.
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006", "step-000008", "step-000010"]
        _references[variant] = (load_file(run_dir / ADAPTER_WEIGHTS), comparable(read_metrics(run_dir)))
    return _references[variant]


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "step_seconds")} for row in rows]


def assert_same_adapter(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(run_dir / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    for key in expected:  # bitwise: resuming must not change a single float
        assert torch.equal(got[key], expected[key]), f"{key}: max diff {(got[key] - expected[key]).abs().max()}"


def signal_at(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process while the loop logs ``step`` (mid-step, before its checkpoint)."""
    original = trainer.write_metrics

    def write_metrics(handle, row):
        original(handle, row)
        if row.get("step") == step and "loss" in row and "phase" not in row:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(trainer, "write_metrics", write_metrics)


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


# --------------------------------------------------------------------------------------------------
# Killed from outside


# The CLI as a user runs it, with each logged step slowed by 0.25 s so the test can kill it mid-run
# whatever the machine's speed. Nothing else is changed.
SLOW_CLI = (
    "import sys, time, lorafam.trainer as t; w = t.write_metrics; "
    "t.write_metrics = lambda h, row: (w(h, row), time.sleep(0.25)); "
    "from lorafam.cli import main; sys.argv[0] = 'lorafam'; main()"
)


def start_slow_train(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, "train", str(recipe)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a training row at ``step`` or later (and the process still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"train exited early ({process.returncode}): {process.stderr.read()}"
        try:
            rows = read_metrics(run_dir)
        except (OSError, json.JSONDecodeError):
            rows = []
        if any(r.get("step", 0) >= step and "loss" in r for r in rows):
            return
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.parametrize("variant", SIGKILL_VARIANTS)
def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(variant, tmp_path, tmp_path_factory, assets):
    expected_adapter, expected_rows = reference(variant, tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets, variant)
    run_dir = tmp_path / "run"
    process = start_slow_train(recipe)
    wait_for_step(process, run_dir, 5)  # past the step-4 checkpoint, somewhere in step 5 or 6
    process.kill()
    assert process.wait() == -signal.SIGKILL
    killed_at = max(r["step"] for r in read_metrics(run_dir) if "loss" in r)
    assert killed_at < STEPS and not (run_dir / ADAPTER_WEIGHTS).exists()

    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    newest = find_latest_checkpoint(run_dir, print)
    assert "resuming from" in resumed.output and newest is not None
    assert_same_adapter(run_dir, expected_adapter)
    assert comparable(read_metrics(run_dir)) == expected_rows


def test_sigterm_from_outside_checkpoints_and_prints_the_resume_command(tmp_path, tmp_path_factory, assets):
    expected_adapter, _ = reference("lora", tmp_path_factory, assets)
    recipe = recipe_for(tmp_path, assets)
    run_dir = tmp_path / "run"
    process = start_slow_train(recipe)
    wait_for_step(process, run_dir, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted by SIGTERM after step ")
    assert last.endswith(f"; resume with: lorafam train {recipe} --resume")
    step = int(last.split("after step ")[1].split(";")[0])
    assert 3 <= step < STEPS
    assert verify_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}")["step"] == step

    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert_same_adapter(run_dir, expected_adapter)


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
