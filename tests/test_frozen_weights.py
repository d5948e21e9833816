"""train.frozen_weights: mixed precision keeps no second copy of the frozen weights, and trains the same.

``hold`` (the default) holds the frozen linear weights in the autocast dtype through the steps, their
fp32 values in a file; ``recast`` routes ``F.linear`` calls on frozen fp32 weights through
``FrozenLinear`` under autocast; ``copy`` is autocast's own way. These tests show that nothing a
run computes changes (every variant's bf16 run trains a bitwise-equal adapter and evaluates the same
in all three), that the weights a run ends with are those it loaded, and that what changes is what
the steps hold. And that the CLI bounds oneDNN's per-shape caches, which bf16 matmuls on the CPU
filled with a new entry for each sequence length.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama_config
from safetensors.torch import load_file
from tinyrun import adapter_section, cli, read_metrics, write_recipe
from transformers import LlamaForCausalLM

import lorafam.engine
from lorafam.adapters import VARIANTS, build_variant
from lorafam.adapters.lora import LoRAConfig
from lorafam.frozen_weights import HeldWeights, holdable_weights, uncopied_frozen_weights
from lorafam.hardware import KERNEL_CACHE_BOUNDS, bound_kernel_caches
from lorafam.run import ADAPTER_WEIGHTS
from lorafam.tasks import get_task


def adapted_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    variant = build_variant(LoRAConfig(variant="lora", r=4, target_modules="all-linear")).apply(model)
    with torch.no_grad():
        for layer in variant.layers.values():
            layer.lora_B.weight.normal_(0, 0.1)
    return model.train()


def saved_during_step(model: torch.nn.Module, uncopied: bool) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """A bf16-autocast forward and backward of the causal-LM loss: the tensors autograd saved for
    backward, the loss and the trainable parameters' gradients."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    saved: list[torch.Tensor] = []
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16), uncopied_frozen_weights("cpu", uncopied):
            out = get_task("causal-lm").loss_module(model)(input_ids=ids, labels=ids)
    out["loss_sum"].backward()
    return saved, out["loss_sum"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_autograd_keeps_no_bf16_copy_of_a_frozen_weight_and_the_gradients_are_the_same():
    model = adapted_llama()
    frozen = {tuple(p.shape) for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}

    def copies(saved: list[torch.Tensor]) -> int:
        """bf16 tensors shaped like a frozen weight, or like its transpose (what matmul keeps)."""
        return sum(1 for t in saved if t.dtype == torch.bfloat16 and t.dim() == 2 and
                   (tuple(t.shape) in frozen or tuple(t.shape)[::-1] in frozen))

    plain_saved, plain_loss, plain_grads = saved_during_step(model, uncopied=False)
    saved, loss, grads = saved_during_step(model, uncopied=True)
    # Plain autocast keeps a bf16 copy of each frozen linear weight whose input needs a gradient
    # (the head, and every layer's linears but the first layer's q/k/v, which read the frozen
    # embeddings); without the copies the fp32 parameter itself is kept in each one's place.
    assert copies(plain_saved) >= 9
    assert copies(saved) == 0
    frozen_params = {id(p) for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    assert sum(1 for t in saved if id(t) in frozen_params) == copies(plain_saved)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name


def test_nothing_changes_without_autocast_or_gradients():
    model = adapted_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with uncopied_frozen_weights("cpu"):  # fp32: autocast is off
        out = model(input_ids=ids)
        assert "FrozenLinear" not in type(out.logits.grad_fn).__name__
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(input_ids=ids).logits.grad_fn is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(model(input_ids=ids).logits.grad_fn).__name__ == "FrozenLinearBackward"


def test_held_weights_are_what_autocast_computes_with_and_come_back_exactly(tmp_path):
    """HeldWeights on an adapted model: the frozen linear bases are held in bf16 (their autocast
    values), the step saves the parameters themselves and computes what plain autocast computes,
    ``originals`` and ``release`` give back every weight bit for bit, and the store never has a name
    in the folder."""
    model = adapted_llama()
    variant_kept = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain_saved, plain_loss, plain_grads = saved_during_step(model, uncopied=False)

    params = holdable_weights(model, variant_kept)
    names = {id(p): n for n, p in model.named_parameters()}
    held = sorted(names[id(p)] for p in params)
    # Every layer's seven linears (their bases), not the LoRA factors, not the head tied to the embedding.
    assert len(held) == 2 * 7 and all(n.endswith(".weight") and "lora_" not in n for n in held)
    assert "lm_head.weight" not in held and "model.embed_tokens.weight" not in held
    store = HeldWeights(params, torch.bfloat16, tmp_path)
    assert list(tmp_path.iterdir()) == []
    for n, p in model.named_parameters():
        expected = loaded[n].to(torch.bfloat16) if n in held else loaded[n]
        assert p.dtype == expected.dtype and torch.equal(p, expected), n

    saved, loss, grads = saved_during_step(model, uncopied=False)
    # Autograd keeps views of the held parameters (matmul saves W's transpose), and no copies.
    storages = {p.untyped_storage().data_ptr() for p in params}
    frozen_shapes = {tuple(p.shape) for p in params}
    kept = [t for t in saved if t.untyped_storage().data_ptr() in storages]
    copies = [t for t in saved if t.dtype == torch.bfloat16 and t.dim() == 2 and t.untyped_storage().data_ptr() not in storages
              and (tuple(t.shape) in frozen_shapes or tuple(t.shape)[::-1] in frozen_shapes)]
    assert len(kept) >= 9 and copies == []
    assert torch.equal(loss, plain_loss)
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name

    with store.originals():
        for n, p in model.named_parameters():
            assert p.dtype == loaded[n].dtype and torch.equal(p, loaded[n]), n
    assert all(p.dtype == torch.bfloat16 for p in params)
    store.release()
    for n, p in model.named_parameters():
        assert p.dtype == loaded[n].dtype and torch.equal(p, loaded[n]), n
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # no views of one buffer
    assert store._file.closed


def train(tmp_path, assets, variant: str, name: str, **train_keys):
    model, data = assets
    recipe = write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter_section(variant, 0.1),
                          train={"mixed_precision": "bf16", "max_steps": 6} | train_keys)
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    return tmp_path / name


@pytest.fixture
def entered(monkeypatch):
    """Per engine autocast of the runs, whether it entered the recast mode; per pass, how many
    weight elements it held."""
    seen: list[bool] = []
    held: list[int] = []
    original = lorafam.engine.uncopied_frozen_weights
    monkeypatch.setattr(lorafam.engine, "uncopied_frozen_weights", lambda device, enabled: seen.append(enabled) or original(device, enabled))
    hold = lorafam.engine.Engine.hold_frozen_weights
    monkeypatch.setattr(lorafam.engine.Engine, "hold_frozen_weights", lambda self, *a: held.append(hold(self, *a)) or held[-1])
    prepare = lorafam.engine.Engine.prepare

    def prepared(self, loss_module, *args):
        # The causal-LM loss applies the head to the labelled positions only where its probe of the
        # model (in fp32) succeeded; a probe of held bf16 weights would fail and fall back.
        assert loss_module.split_head, "the loss module fell back to the full logits"
        return prepare(self, loss_module, *args)

    monkeypatch.setattr(lorafam.engine.Engine, "prepare", prepared)
    return seen, held


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_and_evaluates_the_same_bf16_adapter_however_its_frozen_weights_are_kept(
        variant, tmp_path, assets, entered):
    """`lorafam train` in bf16 with train.frozen_weights hold (the default), recast and copy: the same
    losses, the same fp32 evals and the same adapter, bit for bit."""
    recast_modes, held = entered
    runs = {}
    for mode in ("hold", "recast", "copy"):
        recast_modes.clear(), held.clear()
        runs[mode] = train(tmp_path, assets, variant, mode, frozen_weights=mode, eval_every=3)
        assert recast_modes and all(recast_modes) == (mode == "recast"), mode
        # Every pass (a preparatory one too) holds the untargeted linears at least.
        assert held and (all(held) if mode == "hold" else not any(held)), (mode, held)
    rows = {mode: [{k: v for k, v in r.items() if k != "tokens_per_s" and k != "step_seconds"}
                   for r in read_metrics(run)] for mode, run in runs.items()}
    assert any("eval_loss" in r for r in rows["hold"])
    assert rows["hold"] == rows["recast"] == rows["copy"]
    adapters = {mode: load_file(run / ADAPTER_WEIGHTS) for mode, run in runs.items()}
    assert adapters["hold"].keys() == adapters["copy"].keys() == adapters["recast"].keys()
    for key in adapters["hold"]:
        assert torch.equal(adapters["hold"][key], adapters["copy"][key]), key
        assert torch.equal(adapters["recast"][key], adapters["copy"][key]), key


@pytest.mark.parametrize("run", ["fp32", "bf16 with gradient checkpointing"])
def test_runs_the_recast_mode_does_not_apply_to_train_without_it(run, tmp_path, assets, entered):
    """fp32 has no copies to spare; under gradient checkpointing a block's recomputation in backward
    (outside the mode) must save what its forward saved, or torch refuses the recomputation."""
    recast_modes, held = entered
    keys = {"mixed_precision": "no"} if run == "fp32" else {"gradient_checkpointing": True}
    train(tmp_path, assets, "lora", "run", max_steps=2, frozen_weights="recast", **keys)
    assert recast_modes and not any(recast_modes)
    assert held == [0]


def test_an_fp32_run_holds_nothing(tmp_path, assets, entered):
    train(tmp_path, assets, "lora", "run", max_steps=2, mixed_precision="no")
    assert entered[1] == [0]


# --------------------------------------------------------------------------------------------------
# oneDNN's shape-keyed caches (lorafam.hardware.bound_kernel_caches)


def test_kernel_cache_bounds_are_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")  # the user's own choice wins
    bound_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == KERNEL_CACHE_BOUNDS["LRU_CACHE_CAPACITY"]
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"


# Through the CLI's entry: a bf16 matmul of one shape, as many other shapes as the bound holds, then
# the first shape again. oneDNN reports (ONEDNN_VERBOSE) whether it built that primitive again.
_CACHE_PROBE = """
import torch
import lorafam.cli

def command():
    weight = torch.randn(64, 64, dtype=torch.bfloat16)
    for rows in [3, *range(4, 4 + {others}), 3]:
        torch.randn(rows, 64, dtype=torch.bfloat16) @ weight

lorafam.cli.app = command
lorafam.cli.main()
"""


def test_cli_bounds_onednn_primitive_cache() -> None:
    others = int(KERNEL_CACHE_BOUNDS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_BOUNDS} | {"ONEDNN_VERBOSE": "profile_create"}
    out = subprocess.run([sys.executable, "-c", _CACHE_PROBE.format(others=others)], env=env,
                         capture_output=True, text=True, check=True).stdout
    creates = [line for line in out.splitlines() if ",matmul," in line and "create:" in line]
    if not creates:
        pytest.skip("this CPU's bf16 matmuls do not run through oneDNN: no cache to bound")
    # oneDNN's line: ...,create:cache_miss|cache_hit,...,<src>:<weights>,<ms>
    events = [(line.split(",")[3], line.split(",")[-2]) for line in creates]
    assert len(events) == others + 2, events[:3]
    # 3x64 built at first, pushed out by the newer shapes, built again: the cache is bounded (by
    # default it holds 1024 primitives, and the second 3x64 would be a cache hit).
    assert [event for event, shape in events if shape == "3x64:64x64"] == ["create:cache_miss"] * 2, events[-1]
