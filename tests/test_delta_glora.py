"""Delta-LoRA and GLoRA beyond the shared table: each against its paper, and GLoRA against PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from test_variants import inputs, logits, make_model, perturb

from lorafam.adapters import build_variant
from lorafam.adapters.base import PEFT_PREFIX
from lorafam.errors import LorafamError
from lorafam.modeling import head_modules
from lorafam.recipe import load_recipe, validate_recipe
from lorafam.run import load_tensors, save_adapter, save_tensors

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_for(adapter: dict, task: str = "causal-lm"):
    return validate_recipe(
        {"model": {"name": "tiny", "task": task}, "adapter": adapter, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    )


def adapted(adapter: dict, arch: str):
    model, task = make_model(arch)
    variant = build_variant(recipe_for(dict(adapter), task).adapter).apply(model, head_modules(model, task))
    return model, variant


# --------------------------------------------------------------------------------------------------
# Delta-LoRA

LORA = {"variant": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}
DELTA = {**LORA, "variant": "delta_lora", "start_step": 3}


def train(model, variant, arch, steps, first_step=1, optimizer=None, after_step=None):
    """AdamW steps as the trainer takes them; returns (losses, optimizer)."""
    model.train()
    optimizer = optimizer or torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.01))
    batch, losses = inputs(arch), []
    for step in range(first_step, first_step + steps):
        torch.manual_seed(step)  # the same dropout masks at step t however the run is split
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        (after_step or variant.after_step)(step, 100)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses, optimizer


def papers_algorithm(variant, start_step, update_ratio):
    """Algorithm 1 of the paper, literally, on a plain LoRA: after each step t > K, write
    W += lambda * s * (B_t A_t - B_{t-1} A_{t-1}) into the base weight."""
    previous = {p: (l.lora_B.weight @ l.lora_A.weight).detach().clone() for p, l in variant.layers.items()}

    def after_step(step, total):
        with torch.no_grad():
            for path, layer in variant.layers.items():
                product = layer.lora_B.weight @ layer.lora_A.weight
                if step > start_step:
                    layer.base_layer.weight += update_ratio * layer.scaling * (product - previous[path])
                previous[path] = product.clone()

    return after_step


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_delta_lora_follows_the_papers_algorithm(arch):
    start, steps = DELTA["start_step"], 8
    ours_model, ours = adapted(DELTA, arch)
    ref_model, ref = adapted(LORA, arch)
    lora_model, lora = adapted(LORA, arch)
    for other in (ref, lora):
        other.load_adapter_state_dict({k: v for k, v in ours.adapter_state_dict().items() if "delta_lora" not in k})
    w0 = {p: l.base_layer.weight.detach().clone() for p, l in ref.layers.items()}
    batch = inputs(arch)

    # Up to K steps: W does not move, and the model is plain LoRA.
    papers_after_step = papers_algorithm(ref, start, update_ratio=2.0)
    ours_losses, ours_opt = train(ours_model, ours, arch, start)
    ref_losses, ref_opt = train(ref_model, ref, arch, start, after_step=papers_after_step)
    train(lora_model, lora, arch, steps)
    for layer in ours.layers.values():
        assert torch.count_nonzero(layer.base_weight_update()) == 0
    torch.testing.assert_close(logits(ours_model, batch), logits(ref_model, batch), atol=1e-5, rtol=1e-5)

    # Past K: the paper's per-step writes into W, and ours, give the same model at every step.
    more_ours, _ = train(ours_model, ours, arch, steps - start, start + 1, ours_opt)
    more_ref, _ = train(ref_model, ref, arch, steps - start, start + 1, ref_opt, papers_after_step)
    torch.testing.assert_close(torch.tensor(ours_losses + more_ours), torch.tensor(ref_losses + more_ref), rtol=1e-5, atol=0)
    torch.testing.assert_close(logits(ours_model, batch), logits(ref_model, batch), atol=1e-5, rtol=1e-5)
    for path, layer in ours.layers.items():
        ref_layer = ref.layers[path]
        moved = ref_layer.base_layer.weight - w0[path]
        assert moved.abs().max() > 1e-4, "W did not move past start_step"
        torch.testing.assert_close(layer.base_weight_update(), moved, atol=1e-6, rtol=1e-4)
        # W moved by exactly lambda * s * (B_N A_N - B_K A_K), K = start_step (it telescopes).
        start_product = layer.delta_lora_start_B @ layer.delta_lora_start_A
        expected = 2.0 * layer.scaling * (ref_layer.lora_B.weight @ ref_layer.lora_A.weight - start_product)
        torch.testing.assert_close(moved, expected.detach(), atol=1e-6, rtol=1e-4)
        # Our W_0 itself is never written: W's update lives in the low-rank start buffers.
        torch.testing.assert_close(layer.base_layer.weight, w0[path], atol=0, rtol=0)
    # ...and Delta-LoRA is not plain LoRA.
    assert not torch.allclose(logits(ours_model, batch), logits(lora_model, batch), atol=1e-3)


def test_delta_lora_base_weight_has_no_gradient_or_optimizer_state():
    model, variant = adapted(DELTA, "llama")
    _, optimizer = train(model, variant, "llama", 5)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for layer in variant.layers.values():
        w = layer.base_layer.weight
        assert not w.requires_grad and w.grad is None and id(w) not in in_optimizer and w not in optimizer.state
        assert id(layer.lora_A.weight) in in_optimizer and id(layer.lora_B.weight) in in_optimizer


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_delta_lora_save_load_and_merge_reproduce_the_trained_model(arch, tmp_path):
    model, variant = adapted(DELTA, arch)
    train(model, variant, arch, 7)
    batch = inputs(arch)
    trained = logits(model, batch)
    state = variant.adapter_state_dict()
    path = next(iter(variant.layers))
    assert f"{PEFT_PREFIX}{path}.delta_lora_start_A" in state and f"{PEFT_PREFIX}{path}.delta_lora_start_B" in state
    save_tensors(tmp_path / "adapter_model.safetensors", state)

    fresh, fresh_variant = adapted(DELTA, arch)
    fresh_variant.load_adapter_state_dict(load_tensors(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-6, rtol=1e-6)
    # Without the start buffers, the loaded model would be plain LoRA: they carry W's update.
    assert any(l.base_weight_update().abs().max() > 1e-4 for l in fresh_variant.layers.values())
    torch.testing.assert_close(logits(fresh_variant.merge(), batch), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("resume_at", [2, 5])
def test_delta_lora_resumed_run_continues_exactly(resume_at, tmp_path):
    model, variant = adapted(DELTA, "llama")
    losses, _ = train(model, variant, "llama", 8)

    first, first_variant = adapted(DELTA, "llama")
    first_losses, optimizer = train(first, first_variant, "llama", resume_at)
    save_tensors(tmp_path / "adapter.safetensors", first_variant.adapter_state_dict())
    assert first_variant.train_state() == {}, "everything a resumed run needs is in the adapter file"
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    resumed, resumed_variant = adapted(DELTA, "llama")
    resumed_variant.load_adapter_state_dict(load_tensors(tmp_path / "adapter.safetensors"))
    optimizer = torch.optim.AdamW(resumed_variant.param_groups(lr=1e-2, weight_decay=0.01))
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    rest, _ = train(resumed, resumed_variant, "llama", 8 - resume_at, resume_at + 1, optimizer)
    torch.testing.assert_close(torch.tensor(first_losses + rest), torch.tensor(losses), rtol=1e-6, atol=0)
    torch.testing.assert_close(logits(resumed, inputs("llama")), logits(model, inputs("llama")), atol=1e-6, rtol=1e-6)


def test_delta_lora_defaults_are_the_papers_and_dropout_is_refused():
    cfg = recipe_for({"variant": "delta_lora"}).adapter
    assert (cfg.update_ratio, cfg.start_step, cfg.dropout) == (2.0, 500, 0.0)
    with pytest.raises(LorafamError, match=r"adapter\.dropout: delta_lora uses no dropout"):
        recipe_for({"variant": "delta_lora", "dropout": 0.05})


# --------------------------------------------------------------------------------------------------
# GLoRA

GLORA = {"variant": "glora", "r": 4, "target_modules": "all-linear"}


def test_glora_layer_is_the_papers_formula_with_and_without_a_base_bias():
    torch.manual_seed(0)
    forms = {"A": "lora", "B": "vector", "C": "vector", "D": "vector", "E": "constant"}
    for bias in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=bias))
        variant = build_variant(recipe_for({**GLORA, "forms": forms}).adapter).apply(model)
        perturb(variant)
        layer = variant.layers["0"]
        W, b0 = layer.base_layer.weight, layer.base_layer.bias
        A = layer.glora_A.Xd @ layer.glora_A.Xu
        B = layer.glora_B.X.expand(5, 6)  # one value per output row
        C = layer.glora_C.X
        E = layer.glora_E.X[0]
        x = torch.randn(3, 6)
        # f(x) = (W0 + W0 A + B) x + W0 C + D b0 + E + b0 (the reference code keeps W0 C + E without b0)
        expected = x @ (W + W * A + B).T + (W @ C).squeeze(-1) + E
        if bias:
            expected = expected + layer.glora_D.X * b0 + b0
        else:
            assert layer.glora_D is None, "D scales b0: a layer without a bias has no D"
        torch.testing.assert_close(layer(x), expected.detach())
        merged = layer.merged()
        assert merged.bias is not None, "W0 C + E needs a bias even where the base had none"
        torch.testing.assert_close(merged(x), expected.detach())


def test_glora_without_bias_terms_merges_to_a_bias_free_linear():
    model, variant = adapted({**GLORA, "forms": {"C": "none", "D": "none", "E": "none"}}, "llama")
    perturb(variant)
    assert all(layer.merged().bias is None for layer in variant.layers.values())


# PEFT computes the paper's function where it keeps every term: layers with a bias (BERT), or
# bias-free layers (Llama) with C, D and E off.
PEFT_CASES = [
    ("bert", {"config_A_B": "lora", "config_C": "lora", "config_D_E": "constant"}),
    ("bert", {"config_A_B": "vector", "config_C": "vector", "config_D_E": "vector"}),
    ("bert", {"config_A_B": "constant", "config_C": "none", "config_D_E": "none"}),
    ("llama", {"config_A_B": "lora", "config_C": "none", "config_D_E": "none"}),
    ("llama", {"config_A_B": "vector", "config_C": "none", "config_D_E": "none"}),
]


def our_forms(peft_fields: dict) -> dict:
    ab, c, de = peft_fields["config_A_B"], peft_fields["config_C"], peft_fields["config_D_E"]
    return {"A": ab, "B": ab, "C": c, "D": de, "E": de}


@pytest.mark.parametrize("arch, fields", PEFT_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_glora_equals_peft_glora_with_equal_weights(arch, fields):
    model, variant = adapted({**GLORA, "forms": our_forms(fields)}, arch)
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in variant.layers})
    base, _ = make_model(arch)
    config = peft.GloraConfig(r=4, target_modules=suffixes, init_weights=False, **fields)
    peft_model = peft.get_peft_model(base, config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # PEFT's non-zero init is tiny for constants (std 0.02): make every term count
        for name, p in peft_model.named_parameters():
            if ".glora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = {k: v for k, v in peft.get_peft_model_state_dict(peft_model).items() if not k.endswith(".zeros")}
    ours = variant.live_tensors()
    ours_glora = {k for k in ours if ".glora_" in k}
    assert ours_glora == set(theirs), "tensor names differ from PEFT's"
    with torch.no_grad():
        for key, value in theirs.items():
            assert ours[key].shape == value.shape, key
            ours[key].copy_(value)
    batch = inputs(arch)
    assert not torch.allclose(logits(model, batch), logits(make_model(arch)[0], batch), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(logits(model, batch), logits(peft_model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch, fields", PEFT_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
def test_peft_loads_our_glora_adapter_with_equal_logits(arch, fields, tmp_path):
    model, task = make_model(arch)
    recipe = recipe_for({**GLORA, "forms": our_forms(fields)}, task)
    variant = build_variant(recipe.adapter).apply(model, head_modules(model, task))
    perturb(variant)
    save_adapter(tmp_path, variant, recipe)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GLORA" and {k: saved[k] for k in fields} == fields

    peft_model = peft.PeftModel.from_pretrained(make_model(arch)[0], str(tmp_path)).eval()
    batch = inputs(arch)
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(make_model(arch)[0], batch), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "adapter",
    [
        {**GLORA},  # Llama has no biases: PEFT would drop our W0 C + E
        {**GLORA, "forms": {"A": "lora", "B": "vector", "C": "none", "D": "none", "E": "none"}},  # PEFT ties A, B
        {**GLORA, "forms": {"C": "none", "D": "none", "E": "none"}, "layer_forms": {"down_proj": {"A": "vector", "B": "vector"}}},
    ],
)
def test_glora_that_peft_would_misread_is_not_labelled_peft(adapter, tmp_path):
    model, variant = adapted(adapter, "llama")
    assert variant.peft_config("tiny", "CAUSAL_LM")["peft_type"] == "LORAFAM_GLORA"


def test_glora_layer_forms_override_by_suffix():
    adapter = {**GLORA, "forms": {"D": "vector"}, "layer_forms": {"down_proj": {"A": "vector"}, "layers.1.mlp.down_proj": {"B": "none"}}}
    cfg = recipe_for(adapter).adapter
    # An override names what changes; the rest comes from `forms`, and the saved recipe spells it out.
    assert cfg.layer_forms["down_proj"].model_dump() == {"A": "vector", "B": "lora", "C": "lora", "D": "vector", "E": "constant"}
    assert validate_recipe(recipe_for(adapter).model_dump(mode="json")).adapter == cfg
    model, variant = adapted(adapter, "llama")
    forms = {p: layer.forms for p, layer in variant.layers.items()}
    assert (forms["model.layers.0.mlp.down_proj"].A, forms["model.layers.0.mlp.down_proj"].B) == ("vector", "lora")
    assert (forms["model.layers.1.mlp.down_proj"].A, forms["model.layers.1.mlp.down_proj"].B) == ("lora", "none")
    assert forms["model.layers.0.mlp.up_proj"] == cfg.forms
    layer = variant.layers["model.layers.1.mlp.down_proj"]
    assert layer.glora_B is None and layer.glora_A.Xd.shape == (layer.out_features, 4)


def test_glora_layer_forms_that_match_no_layer_are_refused():
    with pytest.raises(LorafamError, match=r"adapter\.layer_forms: 'down_projj' matches no adapted layer"):
        adapted({**GLORA, "layer_forms": {"down_projj": {"A": "vector"}}}, "llama")


@pytest.mark.parametrize(
    "forms, where, valid",
    [
        ({"A": "lowrank"}, "adapter.forms.A", "'lora', 'vector', 'constant' or 'none'"),
        ({"C": "constant"}, "adapter.forms.C", "'lora', 'vector' or 'none'"),
        ({"E": "lora"}, "adapter.forms.E", "'vector', 'constant' or 'none'"),
    ],
)
def test_glora_invalid_forms_fail_at_recipe_load_listing_the_valid_ones(forms, where, valid):
    with pytest.raises(LorafamError, match=rf"{where}: Input should be {valid}"):
        recipe_for({**GLORA, "forms": forms})
    with pytest.raises(LorafamError, match=rf"adapter\.layer_forms\.q_proj\.{where[-1]}: Input should be {valid}"):
        recipe_for({**GLORA, "layer_forms": {"q_proj": forms}})
    with pytest.raises(LorafamError, match=r"adapter\.forms\.F: unknown key"):
        recipe_for({**GLORA, "forms": {"F": "lora"}})


def test_glora_refuses_dropout():
    with pytest.raises(LorafamError, match=r"adapter\.dropout: glora has no dropout"):
        recipe_for({**GLORA, "dropout": 0.1})


@pytest.mark.parametrize("name", ["delta_lora", "glora"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.adapter.variant == name and recipe.output_dir == f"runs/{name}"
    if name == "delta_lora":
        assert recipe.adapter.start_step < recipe.train.max_steps, "W would never move in this short run"
