"""`lorafam export --format gguf-lora`: the adapter alone, as a llama.cpp LoRA GGUF.

llama.cpp (``--lora``, ``--lora-scaled``) and Ollama (``ADAPTER``) add a LoRA file's update to a
base model at run time: for every pair of tensors ``<base tensor>.lora_a`` (A: r x in) and
``<base tensor>.lora_b`` (B: out x r) the layer computes W x + s B A x, with s = alpha / r from the
file's ``adapter.lora.alpha`` (s = 1 when alpha is 0) times the user's scale. So a file can hold
exactly the variants whose update is one low-rank product on the unchanged pre-trained base.

Which variants those are is asked of each variant itself, not looked up by name
(``low_rank_refusal``): a one-layer toy model gets the run's adapter config, every tensor the layer
saves (what training can change) is set to random values, and the layer must then still (1) have a
low-rank pair (``AdapterLayer.low_rank_factors``), (2) leave the base weight as it was, and
(3) have a ``delta_weight()`` that is one number times B @ A. LoRA (any alpha/r, rsLoRA), LoRA+,
LoRA-FA, AdaLoRA (P, Lambda Q over the live triplets), VeRA (Lambda_b B, Lambda_d A) and LoRA-drop
(its own or the shared pair) pass; DoRA (rows rescaled by a magnitude), Delta-LoRA (W moves too),
GLoRA (no single pair) and PiSSA (its base holds a residual) do not, and are refused with a pointer
to the merged export.

Writing: each layer's number (its alpha / r, alpha / sqrt(r), AdaLoRA's alpha / init_r, 1 for VeRA;
whatever the layer computes) is measured from its own ``delta_weight()`` and folded into B, and
the file says alpha = 0, so llama.cpp applies every layer exactly as trained whatever its rank, and
``--lora-scaled X`` scales the whole update by X. The measured number is checked: B A times it must
give ``delta_weight()`` to float32 rounding, or the export stops. Llama's q/k rows are permuted as
the base GGUF permutes them (lorafam.export.tensors), which for B A is a permutation of B's rows.
A quantized (QLoRA) base is written dequantized, the weights the adapter was trained against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from lorafam.errors import LorafamError
from lorafam.export.tensors import Architecture, permute_for_interleaved_rotary

#: |delta_weight() - c B A| / |delta_weight()| above which a layer is not c B A. The two sides are the
#: same float32 product up to rounding (measured on the toy with random tensors: 3e-8..7e-8 for r = 4
#: and 8, 2e-7 for VeRA's r = 256); a variant that is not a product misses by order 1 (there: DoRA
#: 1.0, Delta-LoRA 0.67).
PRODUCT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class LoRAPair:
    """One base tensor's update as llama.cpp reads it: ``lora_b @ lora_a`` is added to it."""

    base_tensor: str  # the GGUF name of the base weight, e.g. blk.0.attn_q.weight
    lora_a: np.ndarray  # (r, in), float32
    lora_b: np.ndarray  # (out, r), float32, the layer's scale folded in

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def low_rank_refusal(adapter_config: Any) -> str | None:
    """Why a run with this ``adapter:`` config cannot be a llama.cpp LoRA file, or None if it can.

    Asked of the variant on a one-layer toy model with random adapter tensors (see the module
    docstring), so a new variant is classified the moment it is registered.
    """
    from lorafam.adapters import build_variant

    r = adapter_config.r
    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(r + 3, r + 5, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator))
    original = base.weight.detach().clone()
    toy = nn.Sequential(base)
    config = adapter_config.model_copy(update={"target_modules": ["0"], "modules_to_save": [], "dropout": 0.0})
    variant = build_variant(config).apply(toy)
    (layer,) = variant.layers.values()
    with torch.no_grad():
        randomized = {
            name: torch.randn(tensor.shape, generator=generator).to(tensor.dtype) if tensor.is_floating_point() else tensor
            for name, tensor in layer.adapter_named_tensors().items()
        }
        layer.load_adapter_tensors(randomized)
        if layer.low_rank_factors() is None:
            return "its update is not the product of one low-rank pair"
        if not torch.equal(layer.base_weight().detach(), original):
            return "it changes the pre-trained base weight the update is added to"
        if _scale_of_product(layer)[1] > PRODUCT_TOLERANCE:
            return "its update is more than a scaled product B·A of its low-rank pair"
    return None


def _scale_of_product(layer: Any) -> tuple[float, float]:
    """(c, relative residual) of the least-squares fit delta_weight() ~ c B A, in float64.

    A zero product (B = 0, or no live rank) gives c = 0, with residual 0 only if the update is zero.
    """
    up, down = layer.low_rank_factors()
    product = up.detach().double() @ down.detach().double()
    delta = layer.delta_weight().detach().double()
    norm_sq = (product * product).sum()
    scale = float((delta * product).sum() / norm_sq) if norm_sq > 0 else 0.0
    residual = torch.linalg.vector_norm(delta - scale * product)
    size = torch.linalg.vector_norm(delta)
    return scale, float(residual / size) if size > 0 else float(residual)


def lora_pairs(model: nn.Module, variant: Any, architecture: Architecture) -> list[LoRAPair]:
    """Every adapted layer of ``variant`` (loaded into ``model``) as the pair llama.cpp applies.

    Layers whose update is exactly zero (untrained B, an AdaLoRA matrix pruned to rank 0) are left
    out: llama.cpp then runs the base tensor alone, which is the same function.
    """
    if getattr(variant, "expert_layers", None):
        raise LorafamError(
            "--format gguf-lora: the adapter changes fused expert weights, which this export does not write as "
            "llama.cpp LoRA tensors; use --format gguf (the merged model)"
        )
    config = model.config
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    pairs = []
    for path, layer in variant.layers.items():
        base_tensor = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
        if base_tensor is None:
            raise LorafamError(f"--format gguf-lora: no llama.cpp {architecture.name} tensor for the adapted layer {path}")
        if tied and base_tensor == "output.weight":
            raise LorafamError(
                "--format gguf-lora: the adapter changes the output head, which this model ties to the embeddings "
                "(llama.cpp has no separate output tensor to apply it to); use --format gguf"
            )
        scale, residual = _scale_of_product(layer)
        if residual > PRODUCT_TOLERANCE:
            raise LorafamError(
                f"--format gguf-lora: layer {path}'s update is not its low-rank pair's product (relative residual "
                f"{residual:.1e}); use --format gguf"
            )
        if scale == 0.0:
            continue
        up, down = (t.detach().to("cpu", torch.float64) for t in layer.low_rank_factors())
        lora_b = (up * scale).float().numpy()
        lora_a = down.float().numpy()
        if architecture.interleave_rotary:
            if path.endswith(".q_proj"):
                lora_b = permute_for_interleaved_rotary(lora_b, heads)
            elif path.endswith(".k_proj"):
                lora_b = permute_for_interleaved_rotary(lora_b, kv_heads)
        pairs.append(LoRAPair(base_tensor, np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)))
    if not pairs:
        raise LorafamError("--format gguf-lora: every adapted layer's update is zero (an untrained adapter); nothing to write")
    return pairs


def write_lora_gguf(path: Path, pairs: list[LoRAPair], architecture: Architecture, name: str, tags: list[str] = ()) -> None:
    """The llama.cpp LoRA file: general.type adapter, adapter.type lora, alpha 0 (scales are in B)."""
    writer = gguf.GGUFWriter(str(path), architecture.name, use_temp_file=False)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        if tags:
            writer.add_tags(list(tags))
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # 0: llama.cpp applies B A with scale 1 (times --lora-scaled); each layer's own scale is in B.
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        for pair in pairs:
            writer.add_tensor(f"{pair.base_tensor}.lora_a", pair.lora_a)
            writer.add_tensor(f"{pair.base_tensor}.lora_b", pair.lora_b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def load_adapted_keeping_base(run: Any) -> tuple[nn.Module, Any, set[str]]:
    """``lorafam.merge.load_adapted``, also returning the model's module paths before the adapter
    went in, so ``strip_adapter`` can take out whatever the variant added (LoRA-drop's shared pairs,
    VeRA's projections) without knowing which variant it was."""
    from lorafam.modeling import head_modules, load_model
    from lorafam.run import adapt, load_adapter_weights

    model = load_model(run.recipe.model, run.label_names)
    own_modules = {path for path, _ in model.named_modules()}
    variant = adapt(model, run.recipe, head_modules(model, run.recipe.model.task), run.info.prepare)
    load_adapter_weights(variant, run.folder)
    return model, variant, own_modules


def strip_adapter(model: nn.Module, variant: Any, own_modules: set[str], dtype: torch.dtype) -> nn.Module:
    """``model`` with every adapter layer replaced by its frozen base layer and every module the
    variant added removed, as a plain float model (a quantized base dequantized into ``dtype``):
    the base the adapter file applies to."""
    from lorafam.quant import dequantize_model

    for path, layer in variant.layers.items():
        model.set_submodule(path, layer.base_layer)
    variant.layers = {}
    for path, _ in list(model.named_modules()):
        parent, _, attr = path.rpartition(".")
        if path not in own_modules and parent in own_modules:
            delattr(model.get_submodule(parent) if parent else model, attr)
    model = dequantize_model(model, dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()
