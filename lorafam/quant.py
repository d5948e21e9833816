"""Quantized bases: QLoRA (Dettmers et al., 2023, arXiv:2305.14314) for any variant.

A QLoRA recipe is a LoRA recipe plus ``model.quantization: nf4``. The base model is loaded through
transformers' ``BitsAndBytesConfig``; every linear layer except the output head becomes a frozen
bitsandbytes ``Linear4bit`` (or ``Linear8bitLt`` for ``int8``), and the adapter trains in fp32 on
top. Nothing here imports bitsandbytes until a quantized model is actually used, so the
unquantized path pays nothing.

What lives here:

* ``bnb_config``: the recipe's ``model:`` keys as a ``BitsAndBytesConfig``;
* ``prepare_for_kbit_training``: PEFT's ``prepare_model_for_kbit_training`` practice, done ourselves;
* ``keep_training_layout``: the guard against bitsandbytes' CPU inference repacking (see there);
* ``dequantized_weight`` / ``set_weight``: a layer's dense W on the fly (DoRA's norm, PiSSA's SVD,
  merge) and writing one back (re-quantized when the layer is quantized);
* ``dequantize_model``: every remaining quantized linear replaced by a plain one (merge);
* ``estimate_weight_memory``: the 4-bit vs 16-bit weight memory `lorafam inspect` reports.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorafam.errors import LorafamError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from lorafam.recipe import ModelConfig

FOUR_BIT = ("nf4", "fp4")
QUANTIZATIONS = (*FOUR_BIT, "int8")

#: bitsandbytes' 4-bit block size (transformers does not expose another one).
BLOCKSIZE = 64
#: Double quantization quantizes the fp32 absmax of each 64-weight block to 8 bits, in blocks of 256
#: with one fp32 constant each (QLoRA paper, section 3).
DOUBLE_QUANT_BLOCKSIZE = 256


def double_quant(cfg: ModelConfig) -> bool:
    """``model.double_quant`` resolved: on by default for nf4/fp4 (as in the paper), n/a for int8."""
    if cfg.quantization not in FOUR_BIT:
        return False
    return True if cfg.double_quant is None else cfg.double_quant


def bnb_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    """The ``quantization_config`` for ``from_pretrained``; None for an unquantized base."""
    if cfg.quantization is None:
        return None
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=double_quant(cfg),
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype(cfg)),
        bnb_4bit_quant_storage=quant_storage(cfg),
    )


def compute_dtype(cfg: ModelConfig) -> str:
    """``model.compute_dtype`` resolved: ``auto`` is bfloat16 where bf16 runs natively (a bf16 GPU, a
    CPU with AMX or AVX512_BF16), else float32. bitsandbytes dequantizes every 4-bit weight to this
    dtype for each matmul; on a CPU that emulates bf16 a bf16 4-bit layer's forward and backward took
    ~21x as long as a float32 one (benchmarks/qlora_compute.py)."""
    if cfg.compute_dtype != "auto":
        return cfg.compute_dtype
    from lorafam.hardware import native_bf16

    return "bfloat16" if native_bf16()[0] else "float32"


def quant_storage(cfg: ModelConfig) -> torch.dtype:
    """The dtype of the tensors bitsandbytes packs 4-bit weights into (the bytes are the same in any).

    uint8, bitsandbytes' default, except under an FSDP launch: FSDP shards floating-point parameters
    only (Accelerate leaves uint8-packed weights whole on every GPU, with a warning), and casts what
    it shards to the mixed-precision dtype before gathering it. Packed into the compute dtype, the
    4-bit weights are sharded, and that cast leaves their bytes alone when it is to the same dtype
    (bf16 by default on both sides); this is the setting bitsandbytes and PEFT document for QLoRA
    under FSDP. DeepSpeed keeps uint8: its bf16/fp16 modes cast every floating-point weight.
    """
    from lorafam.hardware import launched_engine

    return getattr(torch, compute_dtype(cfg)) if launched_engine() == "fsdp" else torch.uint8


def check_sharded_storage(cfg: ModelConfig, mixed_precision: str) -> None:
    """Refuse a 4-bit base under FSDP whose storage dtype (the compute dtype, see ``quant_storage``)
    differs from the autocast dtype: FSDP would cast the packed weights and scramble them."""
    from lorafam.hardware import launched_engine

    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision)
    compute = compute_dtype(cfg)
    if cfg.quantization in FOUR_BIT and launched_engine() == "fsdp" and autocast not in (None, compute):
        raise LorafamError(
            f"model.compute_dtype: {compute} under FSDP with {mixed_precision} mixed precision: FSDP casts "
            f"every weight it shards to {autocast}, and the 4-bit weights are packed in {compute} there; "
            f"set model.compute_dtype: {autocast} (or train.mixed_precision: no)"
        )


# --------------------------------------------------------------------------------------------------
# Telling quantized layers apart (by class name: importing bitsandbytes is not free)


def is_4bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def is_8bit(module: nn.Module) -> bool:
    return type(getattr(module, "weight", None)).__name__ == "Int8Params"


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module)


def parameter_count(param: torch.Tensor) -> int:
    """Weights a parameter stands for: a 4-bit one packs two per stored byte, so numel() halves it."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Preparing a quantized model for training


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """Make a freshly loaded quantized model trainable the way QLoRA / PEFT do.

    * every base parameter frozen (the quantized ones cannot train anyway);
    * non-quantized fp16/bf16 parameters (norms, embeddings, the head) cast to fp32: they are a
      small share of the memory and fp32 keeps the norms' statistics and the logits stable
      (PEFT's ``prepare_model_for_kbit_training`` does exactly this);
    * the embeddings' output requires grad, so reentrant gradient checkpointing still sees a
      tensor that needs grad at every checkpoint's input (PEFT's default);
    * the CPU inference repacking switched off (see ``keep_training_layout``).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and not _is_quantized_param(param):
            param.data = param.data.to(torch.float32)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    keep_training_layout(model)
    return model


def _is_quantized_param(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def keep_training_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns layers touched.

    ``Linear4bit.forward`` on a CPU with AVX512-BF16 converts its weight, for good, to a CPU-only
    packed layout the first time it runs with ``not self.training and not x.requires_grad`` -- an
    eval-mode, no-grad pass: ``from_pretrained``'s eval mode plus any evaluate()/generate() during
    training. ``matmul_4bit`` then routes through the ``gemv_4bit`` op, which has no autograd
    formula: train-mode backward silently passes no gradient to the layer's input, so every
    adapter below the last quantized layer stops learning. The conversion is gated on the
    per-instance flag ``support_avx512bf16_for_cpu`` (set from the CPU in ``__init__``), so
    clearing it on each layer disables the path whatever mode or grad state later passes use;
    a layer already repacked is converted back. Costs nothing on unquantized models (one walk over
    the modules) and on CUDA (the flag is only read for CPU inputs).
    """
    touched = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        module.support_avx512bf16_for_cpu = False
        _unpack_cpu_layout(module)
        touched += 1
    return touched


def _unpack_cpu_layout(module: nn.Module) -> None:
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state


# --------------------------------------------------------------------------------------------------
# Dense weights on the fly


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The layer's dense weight (out, in); a fresh tensor for quantized layers, never kept resident.

    For an unquantized ``nn.Linear`` this is ``linear.weight`` itself (no copy). 4-bit weights come
    back in the dtype they were quantized from (the recipe's ``model.dtype``), int8 ones in fp32.
    Never differentiable: W is frozen.
    """
    if is_4bit(linear):
        import bitsandbytes.functional as bnbF

        _unpack_cpu_layout(linear)
        weight = linear.weight
        return bnbF.dequantize_4bit(weight.data, weight.quant_state).reshape(weight.quant_state.shape)
    if is_8bit(linear):
        import bitsandbytes.functional as bnbF

        weight = linear.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = linear.state.SCB
        return bnbF.int8_vectorwise_dequant(weight.data, scales).float()
    return linear.weight


@torch.no_grad()
def set_weight(linear: nn.Module, value: torch.Tensor) -> None:
    """Write ``value`` as the layer's weight; a quantized layer re-quantizes it with its own settings.

    For init schemes that rewrite W once (PiSSA's residual). A 4-bit layer re-quantizes with the
    same quant type, block size and double quantization it had, so it stays 4-bit.
    """
    if is_4bit(linear):
        import bitsandbytes.functional as bnbF

        _unpack_cpu_layout(linear)
        weight = linear.weight
        state = weight.quant_state
        data, new_state = bnbF.quantize_4bit(
            value.to(state.dtype).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=weight.data.dtype,
        )
        weight.data = data
        weight.quant_state = new_state
        linear.quant_state = new_state
        return
    if is_8bit(linear):
        import bitsandbytes.functional as bnbF

        data, scales, _ = bnbF.int8_vectorwise_quant(value.float().contiguous())
        linear.weight.data = data
        linear.weight.SCB = scales
        linear.state.SCB = scales
        return
    linear.weight.copy_(value.to(linear.weight.dtype))


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Replace every quantized linear by a plain ``nn.Linear`` with the dequantized weight, in ``dtype``.

    Also drops the model's quantization config, so ``save_pretrained`` writes a plain model.
    """
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        weight = dequantized_weight(module)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        vars(model).pop(flag, None)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


# --------------------------------------------------------------------------------------------------
# bitsandbytes' noise


_quieted = False
_paged_note_shown = False


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes messages that say nothing actionable to a lorafam user.

    On CPU every import logs that the optional ``kernels`` package (a fused kernel fetched from the
    hub) is missing; bitsandbytes then uses its bundled CPU library, which is what we want.
    """
    global _quieted
    if _quieted:
        return
    _quieted = True

    class _DropKernelsNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "kernels-community" not in record.getMessage()

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())


def note_paged_on_cpu(optimizer_name: str) -> None:
    """Say once, in one line, that paging is a CUDA feature; hide bitsandbytes' own warning."""
    global _paged_note_shown
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    if _paged_note_shown:
        return
    _paged_note_shown = True
    plain = optimizer_name.replace("paged_", "")
    print(
        f"note: train.optimizer {optimizer_name}: paging needs CUDA; on CPU it runs as {plain} "
        "(same updates, no paging)",
        file=sys.stderr,
    )


# --------------------------------------------------------------------------------------------------
# Weight memory, from the architecture alone


def bits_per_param(quantization: str, double_quant: bool) -> float:
    """Bits per quantized weight including its quantization constants.

    4-bit: 4 bits plus one fp32 absmax per 64 weights (0.5 bits); with double quantization the
    absmax is 8-bit plus one fp32 constant per 256 blocks: 8/64 + 32/(64*256) ~= 0.127 bits.
    int8: 8 bits plus one fp32 scale per output row (counted per layer, see estimate_weight_memory).
    """
    if quantization == "int8":
        return 8.0
    constants = 8 / BLOCKSIZE + 32 / (BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE) if double_quant else 32 / BLOCKSIZE
    return 4.0 + constants


@dataclass(frozen=True)
class WeightMemory:
    quantized_params: int  # weights of the linear layers that get quantized
    other_params: int  # embeddings, norms, head, biases: kept in 16 bits
    quantized_bytes: float  # the whole base with its linears quantized
    bytes_16bit: float  # the whole base at 16 bits per parameter

    @property
    def saved_bytes(self) -> float:
        return self.bytes_16bit - self.quantized_bytes


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Module paths transformers' bitsandbytes integration quantizes: every linear but those it skips
    (the output head, tied weights, the last module, ``_keep_in_fp32_modules``)."""
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and should_convert_module(name, skip)
    ]


def estimate_weight_memory(model: nn.Module, quantization: str, double_quant: bool) -> WeightMemory:
    """Weight memory of ``model`` (meta device is fine) with and without quantization.

    Counts each parameter once (tied weights too). Linear weights that get quantized cost
    ``bits_per_param``; everything else (and the 16-bit figure) costs 16 bits per parameter.
    """
    quantized, extra_bits = 0, 0.0
    for name in quantized_linear_names(model):
        module = model.get_submodule(name)
        quantized += module.weight.numel()
        if quantization == "int8":
            extra_bits += 32 * module.out_features
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    other = total - quantized
    quantized_bits = quantized * bits_per_param(quantization, double_quant) + extra_bits + 16 * other
    return WeightMemory(quantized, other, quantized_bits / 8, 16 * total / 8)


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    raise AssertionError("unreachable")


def memory_lines(memory: WeightMemory, quantization: str, double_quant: bool) -> list[str]:
    """What `lorafam inspect` prints for a quantized recipe."""
    label = quantization + (" + double quant" if double_quant else "")
    bits = bits_per_param(quantization, double_quant)
    return [
        f"base weights ({label}): {format_bytes(memory.quantized_bytes)} vs {format_bytes(memory.bytes_16bit)} "
        f"at 16-bit ({format_bytes(memory.saved_bytes)} saved)",
        f"  {memory.quantized_params:,} linear weights at {bits:.3f} bits each; "
        f"{memory.other_params:,} others (embeddings, norms, head) at 16 bits",
    ]


def describe(model_cfg: Any) -> str:
    """A short label for messages, e.g. 'nf4 (double quant, bfloat16 compute)'."""
    if model_cfg.quantization is None:
        return "none"
    if model_cfg.quantization == "int8":
        return "int8"
    dq = ", double quant" if double_quant(model_cfg) else ""
    return f"{model_cfg.quantization}{dq}, {compute_dtype(model_cfg)} compute"

