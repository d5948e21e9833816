"""train.compile: every variant trains the same under torch.compile, and resumes bitwise.

The compiler backend here is "aot_eager": Dynamo captures each decoder block with its adapter
layers and AOTAutograd builds its forward and backward graphs, as the default ("inductor") does,
but runs them eagerly instead of generating C++ kernels, which on a 2-core CI machine costs
minutes per variant. What these tests check (the variant's code traced, guards, recompiling after
LoRA-drop restructures, state and resume through compiled blocks) is the same for both backends.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tinyrun import adapter_section, cli, read_metrics, write_recipe

from lorafam.adapters import VARIANTS
from lorafam.adapters.dropout import AdapterDropout, keyed
from lorafam.run import ADAPTER_WEIGHTS


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, **{"backend": "aot_eager", **kw}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def run(tmp_path, assets, variant: str, compile: bool, dropout: float = 0.0, name: str | None = None, **train):
    model, data = assets
    name = name or f"{variant}-{'compiled' if compile else 'eager'}"
    recipe = write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter_section(variant, dropout),
                          train={"compile": compile, "mixed_precision": "no"} | train)
    return recipe, tmp_path / name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_the_same_compiled(variant, tmp_path, assets):
    # 6 steps: past AdaLoRA's budget phase and Delta-LoRA's start step (tinyrun.VARIANT_KEYS)
    eager_recipe, eager = run(tmp_path, assets, variant, compile=False, max_steps=6)
    assert cli("train", eager_recipe).exit_code == 0
    compiled_recipe, compiled = run(tmp_path, assets, variant, compile=True, max_steps=6)
    result = cli("train", compiled_recipe)
    assert result.exit_code == 0, result.output + result.stderr
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    losses = [[r["loss"] for r in read_metrics(run_dir) if "loss" in r] for run_dir in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-6)
    a, b = load_file(eager / ADAPTER_WEIGHTS), load_file(compiled / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.dropout, self.up = torch.nn.Linear(16, 16), AdapterDropout(0.5), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.down(x)))


def test_keyed_dropout_runs_eagerly_in_a_compiled_block_without_recompiling():
    """Adapter dropout runs eagerly inside a compiled block (lorafam/adapters/dropout.py): the masks
    are the eager ones, and keys that change every micro-batch do not compile the block again."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    block, counter = Block().train(), CompileCounter()
    compiled = torch.compile(block, backend=counter)
    x = torch.randn(2, 4, 16)
    compilations = []
    for keys in ([1, 2], [3, 4], [5, 6], [7, 8]):
        with keyed(keys):
            torch.testing.assert_close(compiled(x), block(x), rtol=0, atol=0)  # the eager masks
        compilations.append(counter.frame_count)
    assert compilations[0] > 0 and len(set(compilations)) == 1, compilations


def test_a_compiled_run_with_dropout_trains_the_same_adapter_as_an_eager_one(tmp_path, assets):
    eager_recipe, eager = run(tmp_path, assets, "lora", compile=False, dropout=0.1, max_steps=6)
    assert cli("train", eager_recipe).exit_code == 0
    compiled_recipe, compiled = run(tmp_path, assets, "lora", compile=True, dropout=0.1, max_steps=6)
    result = cli("train", compiled_recipe)
    assert result.exit_code == 0, result.output + result.stderr
    a, b = load_file(eager / ADAPTER_WEIGHTS), load_file(compiled / ADAPTER_WEIGHTS)
    # Compiled kernels round differently (measured <= 7.5e-6 relative, equal losses); other masks
    # (dropout 0 here) differ by 0.07 to 0.57 relative.
    for key in a:
        assert float((b[key] - a[key]).norm() / a[key].norm()) < 1e-4, key
    assert read_metrics(compiled) and [r["loss"] for r in read_metrics(compiled) if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_metrics(eager) if "loss" in r], rel=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_compiled_run_interrupted_and_resumed_matches_the_uninterrupted_one(variant, tmp_path, assets, monkeypatch):
    import os
    import signal

    import lorafam.trainer as trainer

    # 12 steps stopped after 5: AdaLoRA is mid-budget, Delta-LoRA past its start (tinyrun.VARIANT_KEYS).
    whole_recipe, whole = run(tmp_path, assets, variant, compile=True, dropout=0.1, name="whole")
    assert cli("train", whole_recipe).exit_code == 0
    recipe, stopped = run(tmp_path, assets, variant, compile=True, dropout=0.1, name="stopped")
    step_once = trainer.optimizer_step

    def stop_after_five(s, step, skip_nonfinite):  # noqa: ANN001, ANN202
        outcome = step_once(s, step, skip_nonfinite)
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    monkeypatch.setattr(trainer, "optimizer_step", stop_after_five)
    assert cli("train", recipe).exit_code == 143
    monkeypatch.setattr(trainer, "optimizer_step", step_once)
    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert "(step 5/12)" in resumed.output
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    expected, got = load_file(whole / ADAPTER_WEIGHTS), load_file(stopped / ADAPTER_WEIGHTS)
    assert expected.keys() == got.keys()
    for key in expected:  # bitwise, dropout on: the masks follow the examples through compiled blocks
        assert torch.equal(got[key], expected[key]), key
