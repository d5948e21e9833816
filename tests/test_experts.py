"""Fused expert weights (mixture-of-experts): per-expert low-rank updates on tiny Qwen3-MoE and Mixtral.

What is checked: ``all-linear`` adapts every expert of every fused weight and leaves the router
frozen; the adapted forward is the model's own forward on W_e + s B_e A_e (built here with a loop over
experts, independently of the batched code); gradients reach exactly the experts the router chose, and
equal those of that reference; variants without an expert form are refused in one line; train and
inspect list the experts and name frozen 3-D weights; merge, PEFT, save/load and resume; a step does
not depend on its layout.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from tinyrun import (
    adapter_section, cli, make_chat_data, make_moe_model_folder, make_text_data, read_metrics, tiny_moe_config,
    write_recipe,
)
from transformers import AutoModelForCausalLM

import lorafam.run as run_folder
from lorafam.adapters import VARIANTS
from lorafam.adapters.experts import ExpertLoRALayer
from lorafam.errors import LorafamError
from lorafam.merge import load_adapted
from lorafam.recipe import load_recipe, validate_recipe
from lorafam.run import ADAPTER_WEIGHTS, open_run, save_adapter

ARCHS = ["qwen3_moe", "mixtral"]
EXPERT_VARIANTS = [name for name, v in VARIANTS.items() if v.supports_expert_parameters]
OTHER_VARIANTS = [name for name, v in VARIANTS.items() if not v.supports_expert_parameters]
# Each variant with an expert form, and LoRA's options that change the expert layer (rsLoRA's scale, PiSSA's init).
EXPERT_ADAPTERS = [{"variant": name} for name in EXPERT_VARIANTS] + [
    {"variant": "lora", "rslora": True}, {"variant": "lora", "init": "pissa"},
]


def adapter_id(adapter: dict) -> str:
    return "-".join([adapter["variant"]] + [f"{k}={v}" for k, v in adapter.items() if k != "variant"])


def tiny_moe(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_moe_config(arch)).eval()


def adapt(arch: str, adapter: dict, **keys):
    """(adapted model, the base it came from, variant), r=2, every adapter weight perturbed away from
    its init (B = 0 would make most checks vacuous)."""
    model = tiny_moe(arch)
    base = copy.deepcopy(model)
    cfg = VARIANTS[adapter["variant"]].Config(**({"r": 2, "alpha": 4, "target_modules": "all-linear"} | adapter | keys))
    variant = VARIANTS[cfg.variant](cfg).apply(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in variant.adapted_layers():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer.") and p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model, base, variant


def batch(tokens: int = 10, rows: int = 2, vocab: int = 64) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, vocab, (rows, tokens), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def reference_weight(layer: ExpertLoRALayer) -> torch.Tensor:
    """W' of a fused weight built expert by expert from PEFT's layout (rows e·r.. of lora_A are A_e,
    columns e, e + E, ... of lora_B are B_e): the definition the batched code must meet."""
    E, r = layer.num_experts, layer.r
    weight = layer.original_weight().float()
    if layer.is_pissa:
        weight = layer.base_weight().float()  # the residual; the trained pair holds the rest
    experts = []
    for e in range(E):
        A_e, B_e = layer.lora_A.weight[e * r:(e + 1) * r], layer.lora_B.weight[:, e::E]
        V_e = weight[e] + layer.scaling * B_e @ A_e
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        if magnitude is not None:  # DoRA: m_e times each output row's direction
            V_e = (magnitude[e] / V_e.norm(dim=1))[:, None] * V_e
        experts.append(V_e)
    return torch.stack(experts)


# --------------------------------------------------------------------------------------------------
# What is adapted


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_adapts_every_expert_and_leaves_the_router_frozen(arch):
    model, _, variant = adapt(arch, {"variant": "lora"})
    layers = model.config.num_hidden_layers
    assert sorted(variant.expert_layers) == sorted(
        f"model.layers.{i}.mlp.experts{nest}" for i in range(layers) for nest in ("", ".base_layer")
    )
    # PEFT's nesting: the module's first parameter innermost.
    assert {layer.parameter_name for path, layer in variant.expert_layers.items() if path.endswith("base_layer")} == {"gate_up_proj"}
    for i in range(layers):
        assert not model.model.layers[i].mlp.gate.weight.requires_grad  # the router stays frozen
    r, E = 2, 4
    expected = sum(r * (layer.in_features + layer.out_features) for layer in variant.layers.values())
    expected += sum(r * E * (layer.in_features + layer.out_features) for layer in variant.expert_layers.values())
    trainable, _ = variant.parameter_counts()
    assert trainable == expected
    assert variant.target_notes() == []  # nothing 3-D left frozen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapter", EXPERT_ADAPTERS, ids=adapter_id)
def test_the_adapted_forward_is_the_model_on_each_experts_updated_weight(arch, adapter):
    model, base, variant = adapt(arch, adapter)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in variant.layers.items():
            reference.get_submodule(path).weight.copy_(layer.merged().weight)
        for path, layer in variant.expert_layers.items():
            module = reference.get_submodule(path.split(".base_layer")[0])
            getattr(module, layer.parameter_name).copy_(reference_weight(layer))
    inputs = batch()
    ours = logits(model, inputs)
    assert not torch.allclose(ours, logits(base, inputs), atol=1e-3)  # the experts' updates do something
    torch.testing.assert_close(ours, logits(reference, inputs), atol=1e-5, rtol=1e-5)
    with variant.disabled():  # the base function, also where PiSSA rewrote W
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), atol=1e-5, rtol=1e-5)


def routed_experts(model, inputs) -> dict[int, set[int]]:
    """Per decoder layer, the experts the router sent at least one token of ``inputs`` to."""
    chosen: dict[int, set[int]] = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: chosen.setdefault(i, set()).update(out[2].flatten().tolist()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return chosen


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant_name", EXPERT_VARIANTS)
def test_gradients_reach_exactly_the_experts_tokens_were_routed_to(arch, variant_name):
    model, _, variant = adapt(arch, {"variant": variant_name})
    inputs = batch(tokens=3, rows=1)  # 3 tokens x top-2 of 4 experts: often some expert gets no token
    routed = routed_experts(model, inputs)
    model(**inputs).logits.square().mean().backward()  # every token's output counts (a LM loss skips the last)
    some_unrouted = False
    for path, layer in variant.expert_layers.items():
        chosen = routed[int(path.split(".")[2])]
        some_unrouted |= len(chosen) < layer.num_experts
        for name, p in layer.named_parameters():
            if name.startswith("base_layer.") or not p.requires_grad:
                continue
            per_expert = {  # the gradient's norm on each expert's slice of the tensor
                "lora_A.weight": lambda g: g.view(layer.num_experts, -1).norm(dim=1),
                "lora_B.weight": lambda g: g.view(layer.out_features, layer.r, layer.num_experts).norm(dim=(0, 1)),
                "lora_magnitude_vector": lambda g: g.norm(dim=1),
            }[name](p.grad)
            got = {e for e in range(layer.num_experts) if per_expert[e] > 0}
            assert got == chosen, f"{path} {name}: gradient on experts {got}, tokens routed to {chosen}"
    assert some_unrouted  # else the check above could not tell routing from no routing


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_gradients_equal_those_through_the_reference_weights(arch):
    """dL/dB_e = s dL/dW'_e A_e^T, with dL/dW' from the model run on the reference weights."""
    model, base, variant = adapt(arch, {"variant": "lora"}, target_modules=["q_proj"])
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for path, layer in variant.layers.items():
            reference.get_submodule(path).weight.copy_(layer.merged().weight)
        for path, layer in variant.expert_layers.items():
            getattr(reference.get_submodule(path.split(".base_layer")[0]), layer.parameter_name).copy_(reference_weight(layer))
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    for path, layer in variant.expert_layers.items():
        grad_W = getattr(reference.get_submodule(path.split(".base_layer")[0]), layer.parameter_name).grad
        E, r = layer.num_experts, layer.r
        for e in range(E):
            A_e, B_e = layer.lora_A.weight[e * r:(e + 1) * r], layer.lora_B.weight[:, e::E]
            torch.testing.assert_close(layer.lora_B.weight.grad[:, e::E], layer.scaling * grad_W[e] @ A_e.T, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(layer.lora_A.weight.grad[e * r:(e + 1) * r], layer.scaling * B_e.T @ grad_W[e], atol=1e-6, rtol=1e-4)


def test_explicit_target_parameters_name_what_they_match():
    model, _, variant = adapt("qwen3_moe", {"variant": "lora"}, target_modules=["q_proj"], target_parameters=["down_proj"])
    assert sorted(variant.expert_layers) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert variant.peft_config("m", "CAUSAL_LM")["target_parameters"] == ["experts.down_proj"]
    assert variant.target_notes() == [
        "not adapted: 2 fused 3-D weight(s), 8,192 parameters (experts.gate_up_proj); "
        "adapter.target_parameters: [experts.down_proj, experts.gate_up_proj] would adapt them"  # the whole list
    ]
    with pytest.raises(LorafamError, match=r"^adapter.target_parameters: 'up_proj' matches no 3-D \(fused expert\) "
                       r"parameter in this model; it has: experts.down_proj, experts.gate_up_proj$"):
        adapt("qwen3_moe", {"variant": "lora"}, target_parameters=["up_proj"])


def test_a_dense_model_is_unchanged_by_all_linear(tiny_llama):
    cfg = VARIANTS["lora"].Config(variant="lora", target_modules="all-linear")
    variant = VARIANTS["lora"](cfg).apply(tiny_llama)
    assert variant.expert_layers == {} and variant.target_notes() == []
    assert "target_parameters" not in variant.peft_config("m", "CAUSAL_LM")


# --------------------------------------------------------------------------------------------------
# The CLI: refusals, listing, notes


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {arch: make_moe_model_folder(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return make_text_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def moe_recipe(tmp_path: Path, model: Path, data: Path, name: str = "run", adapter: dict | None = None, **train) -> Path:
    section = {"variant": "lora", "r": 2, "alpha": 4, "target_modules": "all-linear"} | (adapter or {})
    return write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=section, train=train)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
def test_variants_without_an_expert_form_are_refused_in_one_line(variant, tmp_path, moe_folders, text_data):
    section = adapter_section(variant, dropout=0.0) | {"target_parameters": ["experts.gate_up_proj"]}
    named = cli("inspect", moe_recipe(tmp_path, moe_folders["qwen3_moe"], text_data, "named", section))
    assert named.exit_code == 2
    assert one_line(named.stderr).startswith(
        f"error: {tmp_path / 'named.yaml'}: recipe: adapter.target_parameters: {variant} cannot adapt fused expert weights "
        "(experts.gate_up_proj): "
    )
    section = adapter_section(variant, dropout=0.0) | {"target_modules": "all-linear"}
    implied = cli("inspect", moe_recipe(tmp_path, moe_folders["qwen3_moe"], text_data, "implied", section))
    assert implied.exit_code == 2
    assert one_line(implied.stderr).startswith(
        f"error: adapter.target_modules: all-linear: {variant} cannot adapt fused expert weights "
        "(model.layers.0.mlp.experts.gate_up_proj and 3 more): "
    )
    assert "adapter.target_parameters: [] to leave them frozen" in implied.stderr
    section = adapter_section(variant, dropout=0.0) | {"target_modules": "all-linear", "target_parameters": []}
    frozen = cli("inspect", moe_recipe(tmp_path, moe_folders["qwen3_moe"], text_data, "frozen", section))
    assert frozen.exit_code == 0, frozen.output + frozen.stderr
    assert (f"not adapted: 4 fused 3-D weight(s), 12,288 parameters (experts.down_proj, experts.gate_up_proj); {variant} "
            f"cannot adapt them; {', '.join(EXPERT_VARIANTS)} can, with adapter.target_parameters: "
            "[experts.down_proj, experts.gate_up_proj]") in " ".join(frozen.output.split())


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_lists_the_adapted_experts_and_names_the_frozen_ones(arch, tmp_path, moe_folders, text_data):
    adapted = cli("inspect", moe_recipe(tmp_path, moe_folders[arch], text_data, "all"), terminal_width=200)
    assert adapted.exit_code == 0, adapted.output
    rows = {line.split("│")[1].strip(): line for line in adapted.output.splitlines() if " experts x " in line}
    inter = 16
    assert set(rows) == {"experts.gate_up_proj", "experts.down_proj"}
    assert f"4 experts x {2 * inter} x 32 " in rows["experts.gate_up_proj"]
    assert f" {2 * 2 * 4 * (32 + 2 * inter):,} " in rows["experts.gate_up_proj"]  # 2 layers x r·E·(in+out)
    assert f"4 experts x 32 x {inter} " in rows["experts.down_proj"]
    assert "not adapted" not in adapted.output

    attention = cli("inspect", moe_recipe(tmp_path, moe_folders[arch], text_data, "attn", {"target_modules": ["q_proj", "v_proj"]}))
    assert attention.exit_code == 0
    expert_params = 2 * 4 * (2 * inter * 32 + 32 * inter)
    assert (
        f"not adapted: 4 fused 3-D weight(s), {expert_params:,} parameters (experts.down_proj, experts.gate_up_proj); "
        "adapter.target_parameters: [experts.down_proj, experts.gate_up_proj] would adapt them"
    ) in " ".join(attention.output.split())


# --------------------------------------------------------------------------------------------------
# After training: merge, PEFT, save/load, resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory, moe_folders, text_data) -> dict[str, Path]:
    """A 12-step all-linear LoRA run per architecture."""
    runs = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(f"run-{arch}")
        result = cli("train", moe_recipe(folder, moe_folders[arch], text_data))
        assert result.exit_code == 0, result.output + result.stderr
        assert "+ 4 fused expert weights adapted" in result.output
        assert "adapted experts: gate_up_proj in 2 layers (4 experts x" in result.output
        runs[arch] = folder / "run"
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_folds_each_experts_update_and_reloads_with_plain_transformers(arch, trained, moe_folders, tmp_path):
    run_dir = trained[arch]
    saved = load_file(run_dir / ADAPTER_WEIGHTS)
    assert saved["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].abs().sum() > 0  # experts trained
    result = cli("merge", run_dir, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + result.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(moe_folders[arch]).eval()
    adapted, variant = load_adapted(open_run(run_dir))
    for path, layer in variant.expert_layers.items():
        module = path.split(".base_layer")[0]
        folded = getattr(merged.get_submodule(module), layer.parameter_name)
        original = getattr(base.get_submodule(module), layer.parameter_name)
        # Exactly W + s B_e A_e per expert: the batched fold is the expert-by-expert definition.
        torch.testing.assert_close(folded, reference_weight(layer), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(folded, original)
    inputs = batch(vocab=merged.config.vocab_size)
    torch.testing.assert_close(logits(merged, inputs), logits(adapted.eval(), inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_a_trained_expert_adapter_with_equal_logits(arch, trained, moe_folders):
    run_dir = trained[arch]
    assert json.loads((run_dir / "adapter_config.json").read_text())["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    adapted, _ = load_adapted(open_run(run_dir))
    base = AutoModelForCausalLM.from_pretrained(moe_folders[arch]).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(run_dir)).eval()
    inputs = batch(vocab=base.config.vocab_size)
    torch.testing.assert_close(logits(peft_model, inputs), logits(adapted.eval(), inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("adapter", [a for a in EXPERT_ADAPTERS if a["variant"] != "dora"], ids=adapter_id)
def test_peft_loads_every_peft_expressible_expert_adapter(arch, adapter, tmp_path):
    """LoRA, rsLoRA, LoRA+, LoRA-FA and PiSSA (a rank-2r LoRA on the original W) in PEFT's own layout.
    DoRA has no expert form in PEFT (its ParamWrapper refuses use_dora)."""
    model, base, variant = adapt(arch, adapter)
    recipe = validate_recipe({"model": {"name": "m"}, "adapter": {"r": 2, "alpha": 4, "target_modules": "all-linear"} | adapter,
                              "data": {"train": "x.jsonl"}, "output_dir": "o"})
    save_adapter(tmp_path, variant, recipe)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    inputs = batch()
    torch.testing.assert_close(logits(peft_model, inputs), logits(model, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter", EXPERT_ADAPTERS, ids=adapter_id)
def test_a_saved_expert_adapter_loads_back_into_a_fresh_model(adapter, tmp_path):
    model, _, variant = adapt("qwen3_moe", adapter)
    state = variant.adapter_state_dict()
    fresh, _, loaded = adapt("qwen3_moe", adapter)
    with torch.no_grad():  # another init: loading must overwrite every adapter tensor
        for _, layer in loaded.adapted_layers():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer."):
                    p.mul_(0.5)
    loaded.load_adapter_state_dict(state)
    inputs = batch()
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=1e-6, rtol=1e-6)


STEPS = 12


def test_a_resumed_moe_run_ends_bitwise_equal_to_an_uninterrupted_one(trained, moe_folders, text_data, tmp_path, monkeypatch):
    original = run_folder.write_metrics

    def write_metrics(handle, row):  # SIGTERM as the loop logs step 7: it checkpoints step 7 and stops
        original(handle, row)
        if row.get("step") == 7 and "loss" in row and "phase" not in row:
            os.kill(os.getpid(), signal.SIGTERM)

    recipe = moe_recipe(tmp_path, moe_folders["qwen3_moe"], text_data)
    monkeypatch.setattr(run_folder, "write_metrics", write_metrics)
    stopped = cli("train", recipe)
    monkeypatch.undo()
    assert stopped.exit_code == 143
    assert (tmp_path / "run" / "checkpoints" / "step-000007").is_dir()
    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert "resuming from" in resumed.output
    expected, got = load_file(trained["qwen3_moe"] / ADAPTER_WEIGHTS), load_file(tmp_path / "run" / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


# --------------------------------------------------------------------------------------------------
# A step does not depend on its layout, routing included


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return make_chat_data(tmp_path_factory.mktemp("chat") / "chat.jsonl", rows=72)


def layout_recipe(tmp_path: Path, model: Path, data: Path, name: str, batch_size: int = 4, accum: int = 1) -> Path:
    """The layout tests' run: 6 SGD steps of LoRA on every linear and expert weight, at a per-process
    batch layout (a launcher adds processes)."""
    return write_recipe(
        tmp_path / f"{name}.yaml", model, data, tmp_path / name,
        adapter={"variant": "lora", "r": 2, "alpha": 4, "target_modules": "all-linear"},
        train={"max_steps": 6, "batch_size": batch_size, "grad_accum": accum, "optimizer": "sgd", "lr": 0.05,
               "mixed_precision": "no", "save_every": 100, "log_every": 1},
        data_keys={"max_length": 40},
    )


def layout_run(tmp_path: Path, model: Path, data: Path, batch_size: int, accum: int) -> Path:
    path = layout_recipe(tmp_path, model, data, f"b{batch_size}x{accum}", batch_size, accum)
    result = cli("train", path)
    assert result.exit_code == 0, result.output + result.stderr
    return Path(load_recipe(path).output_dir)


@pytest.mark.parametrize("arch", ARCHS)
def test_grad_accum_trains_the_same_expert_adapter_as_one_big_batch(arch, tmp_path, moe_folders, chat_data):
    reference = load_file(layout_run(tmp_path, moe_folders[arch], chat_data, 8, 1) / ADAPTER_WEIGHTS)
    layout = load_file(layout_run(tmp_path, moe_folders[arch], chat_data, 2, 4) / ADAPTER_WEIGHTS)
    assert reference.keys() == layout.keys()
    for key in reference:
        norm = reference[key].double().norm()
        assert norm > 0, f"{key}: nothing trained"
        assert float((reference[key].double() - layout[key].double()).norm() / norm) < 1e-5, key


def test_two_processes_train_the_same_expert_adapter_as_one(tmp_path, moe_folders, chat_data):
    """DDP (two gloo processes under `accelerate launch`): each routes its own rows, and the step is the
    one-process step of the same global batch."""
    from test_distributed import launch

    reference = load_file(layout_run(tmp_path, moe_folders["qwen3_moe"], chat_data, 8, 1) / ADAPTER_WEIGHTS)
    path = layout_recipe(tmp_path, moe_folders["qwen3_moe"], chat_data, "two")
    result = launch("-m", "lorafam", "train", path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    two = load_file(tmp_path / "two" / ADAPTER_WEIGHTS)
    assert any("experts" in key for key in two) and two.keys() == reference.keys()
    for key in reference:
        norm = reference[key].double().norm()
        assert norm > 0 and float((reference[key].double() - two[key].double()).norm() / norm) < 1e-5, key


@pytest.mark.parametrize("adapter", EXPERT_ADAPTERS, ids=adapter_id)
def test_merge_folds_every_expert_variant_into_the_fused_weights_exactly(adapter):
    """DoRA's per-expert magnitude and PiSSA's residual included: the merged plain model computes what
    the adapted one did, and its fused weights are the expert-by-expert reference."""
    model, base, variant = adapt("qwen3_moe", adapter)
    inputs = batch()
    before = logits(model, inputs)
    expected = {path: reference_weight(layer).detach() for path, layer in variant.expert_layers.items()}
    names = {path: layer.parameter_name for path, layer in variant.expert_layers.items()}
    merged = variant.merge()
    assert not any(isinstance(m, ExpertLoRALayer) for m in merged.modules())
    assert set(dict(merged.named_parameters())) == set(dict(base.named_parameters()))  # a plain model again
    for path, weight in expected.items():
        torch.testing.assert_close(getattr(merged.get_submodule(path.split(".base_layer")[0]), names[path]), weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(merged, inputs), before, atol=1e-5, rtol=1e-5)


def test_a_qlora_moe_run_trains_the_float_experts_says_so_and_merges(tmp_path, moe_folders, text_data):
    recipe = moe_recipe(tmp_path, moe_folders["qwen3_moe"], text_data, max_steps=4)
    raw = load_recipe(recipe).model_dump(mode="json")
    raw["model"]["quantization"] = "nf4"
    recipe.write_text(json.dumps(raw))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    assert ("the fused expert weights stay float32 on this quantized base (12,288 parameters): bitsandbytes "
            "quantizes linear layers only") in " ".join(result.output.split())
    saved = load_file(tmp_path / "run" / ADAPTER_WEIGHTS)
    assert saved["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"].abs().sum() > 0
    merged = cli("merge", tmp_path / "run", "--output", tmp_path / "merged")  # its own reload check runs
    assert merged.exit_code == 0, merged.output + merged.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_subspace_is_reported_per_expert(arch, trained, tmp_path):
    """The LoRA paper's section 7.2 per expert: each expert's update against its W_e (one run), and each
    expert's A_e against the same expert of another run (here the run itself: phi is 1 everywhere)."""
    one = cli("analyze", "subspace", trained[arch], "--output", tmp_path / "one")
    assert one.exit_code == 0, one.output + one.stderr
    matrices = {m["path"]: m for m in json.loads((tmp_path / "one" / "subspace.json").read_text())["matrices"]}
    experts = [p for p in matrices if "[" in p]
    assert len(experts) == 2 * 2 * 4 and len(matrices) - len(experts) == 2 * 4
    assert matrices["model.layers.0.mlp.experts.down_proj[3]"]["rows"] == 2
    same = cli("analyze", "subspace", trained[arch], trained[arch], "--module", "experts.down_proj", "--output", tmp_path / "two")
    assert same.exit_code == 0, same.output + same.stderr
    matrices = json.loads((tmp_path / "two" / "subspace.json").read_text())["matrices"]
    assert sorted(m["path"] for m in matrices) == sorted(
        f"model.layers.{i}.mlp.experts.down_proj[{e}]" for i in range(2) for e in range(4))
    for m in matrices:
        assert all(abs(x - 1) < 1e-5 for row in m["phi"] for x in row), m["path"]


@pytest.mark.parametrize("arch", ARCHS)
def test_decomposition_is_reported_per_expert(arch, trained, tmp_path):
    """DoRA's Delta M / Delta D (magnitude and direction change per output row) for each expert, at
    each saved step, beside the linear layers."""
    result = cli("analyze", "decomposition", trained[arch], "--output", tmp_path / "dec")
    assert result.exit_code == 0, result.output + result.stderr
    data = json.loads((tmp_path / "dec" / "decomposition.json").read_text())
    steps = data["steps"]
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        points = data["modules"][name]["points"]
        assert len(points) == len(steps) * 2 * 4  # steps x layers x experts
    adapted, variant = load_adapted(open_run(trained[arch]))  # the final step's weights
    layer = variant.expert_layers["model.layers.1.mlp.experts"]  # down_proj
    W, V = layer.base_weight().detach().double(), reference_weight(layer).detach().double()
    for e in range(layer.num_experts):
        (point,) = [p for p in data["modules"]["experts.down_proj"]["points"]
                    if p["step"] == steps[-1] and p["path"] == f"model.layers.1.mlp.experts.down_proj[{e}]"]
        rows_m = (V[e].norm(dim=1) - W[e].norm(dim=1)).abs().mean()
        rows_d = (1 - torch.nn.functional.cosine_similarity(V[e], W[e], dim=1)).mean()
        assert point["delta_m"] == pytest.approx(float(rows_m), rel=1e-4) and point["delta_m"] > 0
        assert point["delta_d"] == pytest.approx(float(rows_d), rel=1e-3) and point["delta_d"] > 0


def test_lora_plus_puts_the_experts_B_in_the_fast_group_and_lora_fa_freezes_their_A():
    _, _, plus = adapt("qwen3_moe", {"variant": "lora_plus"})
    groups = plus.param_groups(lr=1e-3, weight_decay=0.0)
    fast = {id(p) for g in groups if g["lr"] == 1e-3 * plus.config.lr_ratio for p in g["params"]}
    slow = {id(p) for g in groups if g["lr"] == 1e-3 for p in g["params"]}
    for layer in plus.expert_layers.values():
        assert id(layer.lora_B.weight) in fast and id(layer.lora_A.weight) in slow
    _, _, fa = adapt("qwen3_moe", {"variant": "lora_fa"})
    trainable = {id(p) for p in fa.trainable_parameters()}
    for layer in fa.expert_layers.values():
        assert id(layer.lora_A.weight) not in trainable and id(layer.lora_B.weight) in trainable


def test_fsdp2_trains_the_same_expert_adapter_as_one_process(tmp_path, moe_folders, chat_data):
    """FSDP2 on two CPU processes: the fused expert weights and their adapters sharded, gathered whole to save."""
    from test_distributed import launch_fsdp

    reference = layout_run(tmp_path, moe_folders["qwen3_moe"], chat_data, 8, 1)
    path = layout_recipe(tmp_path, moe_folders["qwen3_moe"], chat_data, "fsdp")
    result = launch_fsdp("train", path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "engine: FSDP2 on 2 process(es)" in result.stdout
    expected, saved = load_file(reference / ADAPTER_WEIGHTS), load_file(tmp_path / "fsdp" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    for key in expected:
        norm = expected[key].double().norm()
        assert norm > 0 and float((expected[key].double() - saved[key].double()).norm() / norm) < 1e-5, key


class TransposedExperts(torch.nn.Module):
    """Experts stored (experts, in, out) and applied as x @ W_e, marked ``is_transposed`` as
    transformers marks such modules (e.g. GPT-OSS's)."""

    is_transposed = True

    def __init__(self, experts: int = 3, d_in: int = 5, d_out: int = 7):
        super().__init__()
        self.num_experts = experts
        self.weight = torch.nn.Parameter(torch.randn(experts, d_in, d_out))

    def forward(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x[:, None], self.weight[expert])[:, 0]


def test_an_experts_in_x_out_layout_gets_the_same_per_expert_update():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"experts": TransposedExperts(), "proj": torch.nn.Linear(7, 7)})
    base = copy.deepcopy(model)
    cfg = VARIANTS["lora"].Config(variant="lora", r=2, alpha=4, target_modules=["proj"], target_parameters=["experts.weight"])
    variant = VARIANTS["lora"](cfg).apply(model)
    (layer,) = variant.expert_layers.values()
    assert (layer.num_experts, layer.out_features, layer.in_features) == (3, 7, 5)
    torch.nn.init.normal_(layer.lora_B.weight)
    x, expert = torch.randn(6, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    E, r = 3, 2
    want = torch.stack([  # x (W_e + s (B_e A_e)^T), the update in (out, in) terms transposed into this layout
        x[i] @ (base["experts"].weight[e] + layer.scaling * (layer.lora_B.weight[:, e::E] @ layer.lora_A.weight[e * r:(e + 1) * r]).T)
        for i, e in enumerate(expert.tolist())
    ])
    torch.testing.assert_close(model["experts"](x, expert), want, atol=1e-5, rtol=1e-5)
    variant.merge()
    torch.testing.assert_close(model["experts"](x, expert), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_amplification_is_reported_per_expert(arch, trained, tmp_path):
    """The LoRA paper's section 7.3 numbers for each expert of each adapted fused weight, beside the
    linear layers; ||Delta W_e|| is the expert-by-expert reference's."""
    result = cli("analyze", "amplification", trained[arch], "--output", tmp_path / "amp", "--samples", "1")
    assert result.exit_code == 0, result.output + result.stderr
    rows = json.loads((tmp_path / "amp" / "amplification.json").read_text())["layers"]
    experts = [row for row in rows if "expert" in row]
    assert len(experts) == 2 * 2 * 4 and len(rows) - len(experts) == 2 * 4  # 2 layers x 2 weights x 4 experts; q/k/v/o
    adapted, variant = load_adapted(open_run(trained[arch]))
    for path, layer in variant.expert_layers.items():
        name = f"{path.split('.base_layer')[0]}.{layer.parameter_name}"
        want = (reference_weight(layer) - layer.base_weight()).detach().double()
        for e in range(layer.num_experts):
            (row,) = [r for r in experts if r["path"] == f"{name}[{e}]"]
            assert row["delta_norm"] == pytest.approx(float(want[e].norm()), rel=1e-5)
            assert row["delta_norm"] > 0 and row["r"] == 2
    only = cli("analyze", "amplification", trained[arch], "--module", "experts.down_proj", "--layer", "1",
               "--output", tmp_path / "one", "--samples", "1")
    assert only.exit_code == 0, only.output + only.stderr
    rows = json.loads((tmp_path / "one" / "amplification.json").read_text())["layers"]
    assert [row["module"] for row in rows] == [f"experts.down_proj[{e}]" for e in range(4)]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_the_same_expert_adapter_as_one_process(stage, tmp_path, moe_folders, chat_data):
    """DeepSpeed ZeRO-2 / ZeRO-3 on two CPU processes: the same adapter as one process of the same global batch."""
    from test_distributed import ROOT, launch_deepspeed

    reference = layout_run(tmp_path, moe_folders["qwen3_moe"], chat_data, 8, 1)
    path = write_recipe(
        tmp_path / "ds.yaml", moe_folders["qwen3_moe"], chat_data, tmp_path / "ds",
        adapter={"variant": "lora", "r": 2, "alpha": 4, "target_modules": "all-linear"},
        train={"max_steps": 6, "batch_size": 4, "grad_accum": 1, "optimizer": "sgd", "lr": 0.05,
               "mixed_precision": "no", "save_every": None, "log_every": 1},
        data_keys={"max_length": 40},
    )
    result = launch_deepspeed(ROOT / "configs" / f"deepspeed_zero{stage}.yaml", tmp_path / "extensions", "train", path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"engine: DeepSpeed ZeRO-{stage} on 2 process(es)" in " ".join(result.stdout.split())
    expected, saved = load_file(reference / ADAPTER_WEIGHTS), load_file(tmp_path / "ds" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    for key in expected:
        norm = expected[key].double().norm()
        assert norm > 0 and float((expected[key].double() - saved[key].double()).norm() / norm) < 1e-5, key
