"""A transformers causal LM's config and weights as llama.cpp reads them from a GGUF file.

One ``Architecture`` per supported transformers ``model_type`` says which llama.cpp architecture
runs it and how the weights must be laid out for it; everything else is the same code path:

* Llama (and Mistral, which llama.cpp runs as Llama): llama.cpp applies rotary embeddings to
  interleaved pairs (x0, x1), (x2, x3), ... while transformers rotates the two halves of each head
  against each other. llama.cpp's converter therefore permutes the rows of q_proj and k_proj (and
  their biases) so that the same rotation lands on the same features; transformers' GGUF reader
  undoes that permutation on load. Qwen2 runs with the half-rotation in llama.cpp too, so its
  weights are written as they are.
* Biases: a Llama merge can carry biases the base model did not have (GLoRA adds W0 C + E to
  layers without one). llama.cpp's Llama reads optional q/k/v/o and MLP biases; its Qwen2 reads
  q/k/v biases only, so a Qwen2 bias elsewhere is refused instead of silently dropped.
* Mixtral (mixture of experts) runs as llama.cpp's Llama with experts: the router is
  ``ffn_gate_inp`` and the experts are 3-D tensors as transformers 5 stores them, except that the
  fused ``gate_up_proj`` (experts x 2·inter x hidden, gate rows first) is written as llama.cpp's two
  tensors ``ffn_gate_exps`` and ``ffn_up_exps``. Qwen3-MoE runs as llama.cpp's qwen3moe, with the
  same expert tensors, its per-head q/k norms, and transformers' rotary layout (no permutation).
  Both renormalize the chosen experts' weights, so a Qwen3-MoE config with ``norm_topk_prob: false``,
  or with dense MLP layers among the sparse ones, is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import gguf
import numpy as np
import torch

from lorafam.errors import LorafamError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    #: Permute q/k rows into llama.cpp's interleaved rotary layout (see the module docstring).
    interleave_rotary: bool
    #: Linear layers (by attribute name) whose bias this llama.cpp architecture reads.
    biases: tuple[str, ...]
    #: Write ``rope.dimension_count`` and ``vocab_size`` (llama.cpp's converter does for Llama).
    llama_keys: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, True, ATTENTION + MLP, True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, True, ATTENTION + MLP, True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, False, ("q_proj", "k_proj", "v_proj"), False),
    "mixtral": Architecture(gguf.MODEL_ARCH.LLAMA, True, ATTENTION, True),
    "qwen3_moe": Architecture(gguf.MODEL_ARCH.QWEN3MOE, False, (), False),
}


#: ``--quant`` choices: the GGUF tensor type of the large matrices. Each has a numpy quantizer in
#: the gguf library; the k-quants (Q4_K, ...) need llama.cpp's C quantizer (llama-quantize).
QUANT_TYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q5_1": gguf.GGMLQuantizationType.Q5_1,
    "q5_0": gguf.GGMLQuantizationType.Q5_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
#: Below 8 bits the embedding (and untied output) matrix is kept at Q8_0: every token's vector
#: and every logit passes through it, and llama.cpp's own quantizer also keeps it wider (Q6_K).
_EMBEDDING_TYPE_BELOW_8_BITS = gguf.GGMLQuantizationType.Q8_0


def architecture_of(config: Any) -> Architecture:
    model_type = getattr(config, "model_type", None)
    architecture = ARCHITECTURES.get(model_type)
    if architecture is None:
        raise LorafamError(
            f"GGUF export supports the {', '.join(ARCHITECTURES)} architectures; this model is {model_type!r}. "
            "Use `lorafam merge` for a transformers folder instead"
        )
    return architecture


def write_hyperparameters(writer: gguf.GGUFWriter, config: Any, architecture: Architecture, vocab_size: int) -> None:
    """The ``<arch>.*`` keys llama.cpp builds the graph from."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LorafamError(f"GGUF export: hidden_act {config.hidden_act!r} is not the SiLU llama.cpp's {architecture.name} uses")
    if architecture.arch == gguf.MODEL_ARCH.QWEN2 and getattr(config, "use_sliding_window", False):
        raise LorafamError("GGUF export: llama.cpp's qwen2 has no sliding-window attention; this config enables it")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:  # Mixtral, Qwen3-MoE: llama.cpp routes to experts when these are set
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if architecture.arch == gguf.MODEL_ARCH.QWEN3MOE:
        if not config.norm_topk_prob:
            raise LorafamError(
                "GGUF export: llama.cpp's qwen3moe renormalizes the chosen experts' weights; this config has "
                "norm_topk_prob: false, which it cannot run"
            )
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise LorafamError("GGUF export: llama.cpp's qwen3moe has experts in every layer; this config mixes in dense MLP layers")
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):  # llama3 is a tensor: see extra_tensors
        raise LorafamError(f"GGUF export: rope_type {rope_type!r} is not supported (default, linear, yarn, llama3 are)")
    if architecture.llama_keys:
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(head_dim)


def _rope_parameters(config: Any) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling together in rope_parameters; older configs split them.
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope:
        rope = dict(getattr(config, "rope_scaling", None) or {})
        rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's long-context rope ("llama3"), as llama.cpp applies them
    (the ``rope_freqs`` tensor): high frequencies untouched, low ones slowed by ``factor``, a smooth
    ramp between."""
    rope = _rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * np.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    ramp = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, ramp))
    return divisors.astype(np.float32)


def permute_for_interleaved_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows (or bias entries) from half-split to interleaved pairs.

    Row j of a head's first half and row j of its second half form the j-th rotation pair in
    transformers; llama.cpp expects that pair at rows 2j and 2j+1.
    """
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    gguf_name: str
    tensor_type: gguf.GGMLQuantizationType


def gguf_tensors(model: torch.nn.Module, architecture: Architecture, quant: str) -> Iterator[tuple[TensorPlan, np.ndarray]]:
    """(plan, data) for every tensor of the GGUF file, data already in its GGUF type."""
    config = model.config
    state = dict(_split_fused_gate_up(model.state_dict()))
    names = gguf.get_tensor_name_map(architecture.arch, config.num_hidden_layers)
    tied = _tied(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    unknown = []
    for hf_name in state:
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        if names.get_name(hf_name, try_suffixes=(".weight", ".bias")) is None:
            unknown.append(hf_name)
    if unknown:
        raise LorafamError(f"GGUF export: no llama.cpp {architecture.name} tensor for {', '.join(unknown[:3])}")
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if not gguf_name.endswith((".weight", ".bias")):
            gguf_name += ".weight"  # a bare parameter (fused experts): llama.cpp names it a weight
        if hf_name.endswith(".bias"):
            layer = hf_name.rsplit(".", 2)[-2]
            if layer not in architecture.biases:
                raise LorafamError(
                    f"GGUF export: the merged model has a bias on {hf_name.removesuffix('.bias')}, which llama.cpp's "
                    f"{architecture.name} does not read (it reads biases on {', '.join(architecture.biases)}); "
                    "adapt other layers or keep the merged transformers folder"
                )
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if architecture.interleave_rotary:
            if ".q_proj." in hf_name:
                data = permute_for_interleaved_rotary(data, heads)
            elif ".k_proj." in hf_name:
                data = permute_for_interleaved_rotary(data, kv_heads)
        tensor_type = _tensor_type(gguf_name, data, quant)
        yield TensorPlan(hf_name, gguf_name, tensor_type), _convert(data, tensor_type)
    if _rope_parameters(config).get("rope_type") == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield TensorPlan("(rope_parameters)", name, gguf.GGMLQuantizationType.F32), llama3_rope_factors(config)


def _split_fused_gate_up(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The state with each fused ``experts.gate_up_proj`` as ``experts.gate_proj`` and ``experts.up_proj``
    (the first and second half of its rows, as the experts' forward chunks it), in place."""
    for name, tensor in state.items():
        if name.endswith("experts.gate_up_proj") and tensor.ndim == 3:
            gate, up = tensor.chunk(2, dim=1)
            yield name.removesuffix("gate_up_proj") + "gate_proj", gate
            yield name.removesuffix("gate_up_proj") + "up_proj", up
        else:
            yield name, tensor


def _tied(model: torch.nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _tensor_type(gguf_name: str, data: np.ndarray, quant: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter's rule: vectors, norms and MoE routers stay F32; matrices take ``quant``, except that
    below 8 bits the embedding/output stays Q8_0 and a matrix whose rows do not split into
    quantization blocks falls back to F16."""
    if data.ndim <= 1 or gguf_name.endswith(("_norm.weight", ".ffn_gate_inp.weight")):
        # The router too (as llama.cpp's converter keeps it): a rounded router could pick other experts.
        return gguf.GGMLQuantizationType.F32
    wanted = QUANT_TYPES[quant]
    if quant.startswith(("q4", "q5")) and gguf_name.split(".")[0] in ("token_embd", "output"):
        wanted = _EMBEDDING_TYPE_BELOW_8_BITS
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if data.shape[-1] % block != 0:
        return gguf.GGMLQuantizationType.F16
    return wanted


def _convert(data: np.ndarray, tensor_type: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(data, tensor_type)
