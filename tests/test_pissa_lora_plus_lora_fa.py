"""PiSSA init, LoRA+ and LoRA-FA: what the shared table in test_variants.py cannot see."""

from __future__ import annotations

import math
from pathlib import Path

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from test_variants import inputs, logits, make_model, perturb
from torch import nn

from lorafam.analysis import saved_activation_bytes
from lorafam.adapters import build_variant
from lorafam.adapters.base import PEFT_PREFIX
from lorafam.adapters.lora import LoRA, LoRAConfig, LoRALayer
from lorafam.adapters.lora_fa import LoRAFA, LoRAFAConfig
from lorafam.errors import LorafamError
from lorafam.modeling import head_modules
from lorafam.recipe import load_recipe, validate_recipe
from lorafam.run import load_tensors, save_tensors

R, ALPHA = 4, 8
ARCHS = ["llama", "bert"]
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def adapted(arch: str, variant: str = "lora", **keys):
    model, task = make_model(arch)
    config = {"variant": variant, "r": R, "alpha": ALPHA, "target_modules": "all-linear"} | keys
    validated = validate_recipe(
        {"model": {"name": "tiny", "task": task}, "adapter": config, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    ).adapter
    return model, build_variant(validated).apply(model, head_modules(model, task))


# --------------------------------------------------------------------------------------------------
# PiSSA


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_splits_w_into_top_r_svd_and_residual(arch, rslora):
    base, _ = make_model(arch)
    model, variant = adapted(arch, init="pissa", rslora=rslora)
    batch = inputs(arch)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-5, rtol=1e-5)
    s = variant.scaling
    assert s == (ALPHA / math.sqrt(R) if rslora else ALPHA / R)
    for path, layer in variant.layers.items():
        original = base.get_submodule(path).weight
        u, sv, vh = torch.linalg.svd(original, full_matrices=False)
        principal = s * layer.lora_B.weight @ layer.lora_A.weight
        torch.testing.assert_close(principal, u[:, :R] * sv[:R] @ vh[:R], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight + principal, original, atol=1e-6, rtol=1e-6)
        # The principal part really left W: the residual's top singular value is W's (r+1)-th.
        top = torch.linalg.svdvals(layer.base_layer.weight)[0]
        torch.testing.assert_close(top, sv[R], atol=1e-5, rtol=1e-5)
        assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
        assert not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_matches_peft_init(arch):
    model, variant = adapted(arch, init="pissa")
    peft_base, task = make_model(arch)
    config = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        target_modules=sorted(variant.layers),
        init_lora_weights="pissa",
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
    )
    peft_model = peft.get_peft_model(peft_base, config).eval()
    inner = peft_model.base_model.model
    for path, layer in variant.layers.items():
        theirs = inner.get_submodule(path)
        A, B = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        # Singular vectors are defined up to sign; one LAPACK gives the same ones, but allow a flip.
        sign = torch.sign((layer.lora_A.weight * A).sum(dim=1))
        assert torch.all(sign != 0)
        torch.testing.assert_close(layer.lora_A.weight, sign[:, None] * A, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.lora_B.weight, B * sign, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight, atol=1e-6, rtol=1e-6)

    batch = inputs(arch)
    torch.testing.assert_close(logits(peft_model, batch), logits(model, batch), atol=1e-5, rtol=1e-5)
    # Same trained weights on both residual models -> same function.
    perturb(variant)
    with torch.no_grad():
        for path, layer in variant.layers.items():
            theirs = inner.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
        for path, module in variant.saved_modules.items():  # BERT's classifier head
            inner.get_submodule(path).modules_to_save["default"].load_state_dict(module.state_dict())
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(make_model(arch)[0], batch), atol=1e-3)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_saves_an_equivalent_rank_2r_lora_on_the_original_weight(rslora):
    base, _ = make_model("llama")
    model, variant = adapted("llama", init="pissa", rslora=rslora)
    perturb(variant)
    state = variant.adapter_state_dict()
    config = variant.peft_config("tiny", "CAUSAL_LM")
    assert config["r"] == 2 * R and config["init_lora_weights"] is True
    saved_scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if rslora else config["r"])
    assert saved_scaling == pytest.approx(variant.scaling, rel=1e-12)
    for path, layer in variant.layers.items():
        A, B = state[f"{PEFT_PREFIX}{path}.lora_A.weight"], state[f"{PEFT_PREFIX}{path}.lora_B.weight"]
        assert A.shape == (2 * R, layer.in_features) and B.shape == (layer.out_features, 2 * R)
        trained = layer.base_layer.weight + layer.delta_weight()
        converted = base.get_submodule(path).weight + saved_scaling * B @ A
        torch.testing.assert_close(converted, trained, atol=1e-6, rtol=1e-6)
    assert not any("pissa" in k for k in state), "A0/B0 buffers leaked into the PEFT file"


@pytest.mark.parametrize("other_split", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_save_load_round_trip(arch, other_split, tmp_path):
    model, variant = adapted(arch, init="pissa")
    perturb(variant)
    path = tmp_path / "adapter_model.safetensors"
    save_tensors(path, variant.adapter_state_dict())

    fresh, fresh_variant = adapted(arch, init="pissa")
    if other_split:
        # Another machine's SVD (or a tie in singular values) can split the same W differently into
        # residual + principal part: the loader must take the file's principal part out of W.
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in fresh_variant.layers.values():
                s = layer.scaling
                original = layer.base_layer.weight + s * layer.pissa_B0 @ layer.pissa_A0
                layer.pissa_A0.copy_(torch.randn(layer.pissa_A0.shape, generator=g))
                layer.pissa_B0.copy_(torch.randn(layer.pissa_B0.shape, generator=g))
                layer.base_layer.weight.copy_(original - s * layer.pissa_B0 @ layer.pissa_A0)
    batch = inputs(arch)
    assert not torch.allclose(logits(fresh, batch), logits(model, batch))
    fresh_variant.load_adapter_state_dict(load_tensors(path))
    atol = 1e-5 if other_split else 1e-6
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=atol, rtol=atol)
    for layer, fresh_layer in zip(variant.layers.values(), fresh_variant.layers.values()):
        assert torch.equal(fresh_layer.lora_A.weight, layer.lora_A.weight)
        assert fresh_layer.lora_A.weight.shape == (R, layer.in_features)


@pytest.mark.parametrize("arch", ARCHS)
def test_pissa_merge_and_training(arch):
    model, variant = adapted(arch, init="pissa")
    perturb(variant)
    batch = inputs(arch)
    before = logits(model, batch)
    merged = variant.merge()
    torch.testing.assert_close(logits(merged, batch), before, atol=1e-5, rtol=1e-5)

    model, variant = adapted(arch, init="pissa")
    model.train()
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.0))
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.97, losses


# --------------------------------------------------------------------------------------------------
# LoRA+


def _normalize_peft_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".").replace(".default.", ".")


def _buckets(groups: list[dict], names: dict[int, str]) -> dict[tuple[float, float], set[str]]:
    out: dict[tuple[float, float], set[str]] = {}
    for g in groups:
        if g["params"]:
            out.setdefault((g["lr"], g["weight_decay"]), set()).update(names[id(p)] for p in g["params"])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_plus_groups_match_peft(arch):
    lr, weight_decay = 1e-3, 0.1
    model, variant = adapted(arch, variant="lora_plus")
    assert variant.config.lr_ratio == 16
    ours = _buckets(variant.param_groups(lr, weight_decay), {id(p): n for n, p in model.named_parameters()})

    peft_base, task = make_model(arch)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=sorted(variant.layers),
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
    )
    peft_model = peft.get_peft_model(peft_base, config)
    optimizer = create_loraplus_optimizer(
        peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16, loraplus_weight_decay=weight_decay
    )
    peft_names = {id(p): _normalize_peft_name(n) for n, p in peft_model.named_parameters()}
    assert ours == _buckets(optimizer.param_groups, peft_names)

    fast = {n for (group_lr, _), names in ours.items() if group_lr == lr * 16 for n in names}
    assert {n for n in fast if "lora_B" in n} == {f"{p}.lora_B.weight" for p in variant.layers}
    assert all("lora_A" in n for n in ours[(lr, weight_decay)] if "lora" in n)
    if arch == "bert":  # the head's bias is 1-D: fast lr and no decay, as in PEFT
        assert "classifier.bias" in ours[(lr * 16, 0.0)]


def test_lora_plus_saves_plain_lora():
    _, variant = adapted("llama", variant="lora_plus")
    _, plain = adapted("llama")
    assert variant.peft_config("tiny", "CAUSAL_LM") == plain.peft_config("tiny", "CAUSAL_LM")
    assert variant.adapter_state_dict().keys() == plain.adapter_state_dict().keys()


# --------------------------------------------------------------------------------------------------
# LoRA-FA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_fa_trains_b_only_and_a_never_moves(arch):
    model, variant = adapted(arch, variant="lora_fa")
    initial_A = {p: l.lora_A.weight.detach().clone() for p, l in variant.layers.items()}
    grouped = {id(p) for g in variant.param_groups(1e-2, 0.1) for p in g["params"]}
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.1))
    model.train()
    batch = inputs(arch)
    for _ in range(3):
        model(**batch).loss.backward()
        for layer in variant.layers.values():
            assert layer.lora_A.weight.grad is None
            assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    for path, layer in variant.layers.items():
        assert id(layer.lora_A.weight) not in grouped
        assert not layer.lora_A.weight.requires_grad
        assert torch.equal(layer.lora_A.weight, initial_A[path])
        assert layer.lora_A.weight.abs().sum() > 0, "A must be a random projection, not zero"
        assert layer.lora_B.weight.abs().sum() > 0, "B did not train"


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_lora_fa_keeps_r_values_per_token_where_lora_keeps_in_plus_r(x_requires_grad):
    in_f, out_f, tokens = 64, 48, 10
    torch.manual_seed(0)
    measured = {}
    for variant_cls, config_cls in [(LoRA, LoRAConfig), (LoRAFA, LoRAFAConfig)]:
        config = config_cls(variant=variant_cls.name, r=R, alpha=ALPHA, target_modules=["lin"])
        layer: LoRALayer = variant_cls(config).make_layer(nn.Linear(in_f, out_f).requires_grad_(False), "lin")
        # Inside a model the layer's input requires grad (earlier adapters train), except for the first.
        x = torch.randn(2, tokens // 2, in_f, requires_grad=x_requires_grad)
        measured[variant_cls.name] = saved_activation_bytes(lambda: layer(x).sum(), layer)
    fp32 = 4
    # LoRA keeps x for A's gradient and A x for B's; LoRA-FA only A x. The frozen base keeps nothing.
    assert measured["lora"] == tokens * (in_f + R) * fp32
    assert measured["lora_fa"] == tokens * R * fp32
    assert measured["lora_fa"] / measured["lora"] == pytest.approx(R / (in_f + R))


# --------------------------------------------------------------------------------------------------
# Recipes and validation


@pytest.mark.parametrize(
    "adapter, key",
    [
        ({"variant": "lora_plus", "lr_ratio": 0.5}, "adapter.lr_ratio"),
        ({"variant": "lora_plus", "lr_embedding": 1e-6}, "adapter.lr_embedding: unknown key"),
        ({"variant": "lora_fa", "init": "pissa"}, "adapter.init"),
        ({"variant": "lora", "init": "svd"}, "adapter.init"),
        ({"variant": "lora_fa", "lr_ratio": 16}, "adapter.lr_ratio"),
    ],
)
def test_invalid_keys_fail_with_their_path(adapter, key):
    with pytest.raises(LorafamError, match=key.replace(".", r"\.")):
        validate_recipe({"model": {"name": "tiny"}, "adapter": adapter, "data": {"train": "x.jsonl"}, "output_dir": "o"})


@pytest.mark.parametrize(
    "name, variant, extra",
    [
        ("lora_plus", "lora_plus", {"lr_ratio": 16.0}),
        ("lora_fa", "lora_fa", {"dropout": 0.0}),
        ("pissa", "lora", {"init": "pissa"}),
    ],
)
def test_shipped_recipes_load(name, variant, extra):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.adapter.variant == variant
    assert recipe.output_dir == f"runs/{name}"
    assert recipe.model.name == "smollm2-135m" and recipe.data.train == "chatterbot-english"
    for key, value in extra.items():
        assert getattr(recipe.adapter, key) == value
