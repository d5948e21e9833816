"""PEFT is our reference and our file format: its loader must read our adapters, with equal logits."""

from __future__ import annotations

import peft
import pytest
import torch
from test_variants import inputs, logits, make_model, perturb

from lorafam.adapters import build_variant
from lorafam.modeling import head_modules
from lorafam.recipe import validate_recipe
from lorafam.run import save_adapter


def recipe_for(adapter: dict, task: str):
    return validate_recipe(
        {"model": {"name": "tiny", "task": task}, "adapter": adapter, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    )


PEFT_LOADABLE = [
    {"variant": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "query", "value"]},
    {"variant": "lora", "r": 4, "alpha": 8, "rslora": True, "target_modules": "all-linear"},
    {"variant": "vera", "r": 4, "target_modules": "all-linear"},
    {"variant": "vera", "r": 4, "save_projection": False, "projection_seed": 3, "target_modules": "all-linear"},
    {"variant": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    # PiSSA: saved as a rank-2r LoRA on the original base (PEFT's path_initial_model_for_weight_conversion).
    {"variant": "lora", "r": 4, "alpha": 8, "init": "pissa", "target_modules": "all-linear"},
    {"variant": "lora", "r": 4, "alpha": 8, "init": "pissa", "rslora": True, "target_modules": "all-linear"},
    {"variant": "lora_plus", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    {"variant": "lora_fa", "r": 4, "alpha": 8, "target_modules": "all-linear"},
]


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("adapter", PEFT_LOADABLE, ids=lambda a: f"{a['variant']}{'-rslora' if a.get('rslora') else ''}")
def test_peft_loads_our_adapter_with_equal_logits(adapter, arch, tmp_path):
    model, task = make_model(arch)
    recipe = recipe_for(dict(adapter), task)
    variant = build_variant(recipe.adapter).apply(model, head_modules(model, task))
    perturb(variant)
    save_adapter(tmp_path, variant, recipe)

    base, _ = make_model(arch)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = inputs(arch)
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(make_model(arch)[0], batch), atol=1e-3)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)
