"""train.recast_frozen_weights: mixed precision keeps no autocast copy of the frozen weights for
backward, and trains the same.

lorafam.frozen_weights routes ``F.linear`` calls on frozen fp32 weights through ``FrozenLinear``
under autocast; these tests show that nothing else changes (every variant's bf16 run trains a
bitwise-equal adapter with and without it) and that what changes is what autograd holds.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from safetensors.torch import load_file
from tinyrun import adapter_section, cli, read_metrics, write_recipe
from transformers import LlamaForCausalLM

import lorafam.engine
from lorafam.adapters import VARIANTS, build_variant
from lorafam.adapters.lora import LoRAConfig
from lorafam.frozen_weights import uncopied_frozen_weights
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


def train(tmp_path, assets, variant: str, name: str, **train_keys):
    model, data = assets
    recipe = write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter_section(variant, 0.1),
                          train={"mixed_precision": "bf16", "max_steps": 6} | train_keys)
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    return tmp_path / name


@pytest.fixture
def entered(monkeypatch):
    """Whether each engine autocast of the runs entered the mode."""
    seen: list[bool] = []
    original = lorafam.engine.uncopied_frozen_weights
    monkeypatch.setattr(lorafam.engine, "uncopied_frozen_weights", lambda device, enabled: seen.append(enabled) or original(device, enabled))
    return seen


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_the_same_bf16_adapter_with_its_frozen_weights_recast(variant, tmp_path, assets, entered):
    """`lorafam train` in bf16 with train.recast_frozen_weights and without (the default): the same
    losses and the same adapter, bit for bit."""
    recast = train(tmp_path, assets, variant, "recast", recast_frozen_weights=True)
    assert entered and all(entered), "a bf16 run on one process must train without the copies when asked"
    entered.clear()
    plain = train(tmp_path, assets, variant, "plain")
    assert entered and not any(entered), "the default keeps autocast's copies"
    losses = [[r["loss"] for r in read_metrics(run) if "loss" in r] for run in (recast, plain)]
    assert losses[0] == losses[1]
    a, b = load_file(recast / ADAPTER_WEIGHTS), load_file(plain / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("run", ["fp32", "bf16 with gradient checkpointing"])
def test_runs_the_mode_does_not_apply_to_train_without_it(run, tmp_path, assets, entered):
    """fp32 has no copies to spare; under gradient checkpointing a block's recomputation in backward
    (outside the mode) must save what its forward saved, or torch refuses the recomputation."""
    keys = {"mixed_precision": "no"} if run == "fp32" else {"gradient_checkpointing": True}
    train(tmp_path, assets, "lora", "run", max_steps=2, recast_frozen_weights=True, **keys)
    assert entered and not any(entered)
