"""DoRA (Liu et al., 2024, arXiv:2402.09353): Weight-Decomposed Low-Rank Adaptation.

W' = m * V / ||V||_c with V = W0 + s B A (LoRA's update, s = alpha / r) and ||.||_c the norm of each
output row. The magnitude m (one entry per output, PEFT's ``lora_magnitude_vector``) starts at
||W0||_c, so the model starts as the base. Following section 4.3 of the paper, ||V||_c is treated
as a constant in backward (detached): it still tracks B A, but no gradient flows through it.

The norm is computed without forming V (out x in) every step. Per output row,

    ||W0 + s B A||^2 = ||W0||^2 + 2 s rowsum((W0 A^T) * B) + s^2 rowsum((B (A A^T)) * B)

where ||W0||^2 never changes (W0 is frozen) and is cached, and the rest costs one (out x in x r)
product and (out x r)-sized work: about half the time of forming V and taking its norm. It equals
the direct norm to fp32 rounding (tests/test_vera_dora.py); only a row that s B A nearly cancels
(||V|| << ||W0||) would lose relative precision, about eps * ||W0||^2 / ||V||^2.

The forward pass reuses the base layer's output instead of a second full matmul. With
base = W0 x + b and k = m / ||V||_c, and k * s folded into the rows of B (an out x r product, not a
pass over the activations):

    W' x + b = k * base + (1 - k) * b + (k s B) A x

which is one fused multiply-add over the output (``addcmul``), the bias term riding in the lora
matmul. With dropout active the adapter path sees dropout(x) for both of its terms, as in PEFT:
W' x + b is replaced by base(x) + (k - 1) * W0 dropout(x) + k * s * B A dropout(x), which needs
W0 dropout(x), a second matmul, in training only. On a quantized base W0 (for the norm, that
matmul and merge) is dequantized on the fly by ``base_weight()``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from lorafam.adapters.experts import ExpertLoRALayer
from lorafam.adapters.lora import LoRA, LoRAConfig, LoRALayer


class DoRAConfig(LoRAConfig):
    variant: Literal["dora"] = "dora"
    # The schema itself carries the restriction, so the recipe reference generated from it is true.
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="default: A Kaiming-uniform, B zero (the paper's reference code); gaussian: A normal with "
        "std 1/r, B zero. No pissa: DoRA's magnitude starts from the base weight, which PiSSA would rewrite.",
    )


class DoRALayer(LoRALayer):
    reads_base_weight = True  # the column norms of W + BA, in fp32

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base_layer, r, scaling, dropout)
        device = base_layer.weight.device
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=device))
        # ||W0||_c^2 per output row, derived from the frozen W0: not persistent (never saved in an
        # adapter or checkpoint), recomputed whenever W0 or the layer's dtype/device may have changed.
        self.register_buffer("base_norm_sq", torch.empty(0), persistent=False)
        self.refresh_base_norm()
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def refresh_base_norm(self) -> None:
        """Recompute the cached ||W0||_c^2 from the current W0, in fp32 (fp64 if the adapter is)."""
        dtype = torch.promote_types(self.lora_A.weight.dtype, torch.float32)
        self.base_norm_sq = self.base_weight().to(dtype).square().sum(dim=1)

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .half() convert buffers too: a squared norm rounded to 16 bits would put
        # a ~0.4% error into every scale, so recompute it from W0 in the layer's new dtype instead.
        super()._apply(fn, recurse)
        self.refresh_base_norm()
        return self

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A||_c per output row, detached (the paper's constant), in fp32 or wider.

        Computed from the cached ||W0||_c^2, W0 A^T and A A^T (see the module docstring), outside
        autocast: a 16-bit cross term would shift every scale by up to ~0.4%.
        """
        dtype = self.base_norm_sq.dtype
        A, B, s = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype), self.scaling
        with _autocast_off(A.device):
            cross = ((self.base_weight().to(dtype) @ A.T) * B).sum(dim=1)
            lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)
        # The sum is ||V||^2 >= 0; rounding alone can push a (near-)zero row below 0, where sqrt is NaN.
        return (self.base_norm_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()

    def reset_magnitude(self) -> None:
        # With B = 0 this is sqrt(||W0||^2) exactly, the norm forward divides by: the scale is 1.
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        scale = self.lora_magnitude_vector / self.weight_norm()
        x = x.to(self.lora_A.weight.dtype)
        scaled_B = self.lora_B.weight * (self.scaling * scale)[:, None]
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            direction = F.linear(x, self.base_weight().to(x.dtype))
            update = torch.addcmul(F.linear(self.lora_A(x), scaled_B), direction, scale - 1)
            return out + update.to(out.dtype)
        bias = self.base_layer.bias
        shift = None if bias is None else (1 - scale) * bias
        return torch.addcmul(F.linear(self.lora_A(x), scaled_B, shift), out, scale).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """m * V / ||V||_c in fp32: magnitude and direction folded into one weight (V formed once,
        so the norm here is V's own, not the cached expansion)."""
        lora = self.lora_B.weight @ self.lora_A.weight
        weight = self.base_weight().float() + self.scaling * lora
        norm = torch.linalg.vector_norm(weight, dim=1)
        return (self.lora_magnitude_vector / norm)[:, None] * weight

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().float()

    def merged(self) -> nn.Linear:
        # Write W' directly: W0 + (W' - W0) would round twice.
        linear = super().merged()
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight().to(linear.weight.dtype))
        return linear

    def set_base_weight(self, value: torch.Tensor) -> None:
        super().set_base_weight(value)
        self.refresh_base_norm()

    def adapter_named_tensors(self) -> dict[str, torch.Tensor]:
        out = super().adapter_named_tensors()
        del out["base_norm_sq"]  # derived from W0, not part of the adapter
        return out


class ExpertDoRALayer(ExpertLoRALayer):
    """DoRA on a fused expert weight: a magnitude per expert output row, W_e' = m_e * V_e / ||V_e||_c
    with V_e = W_e + s B_e A_e, the norm detached as for linear layers. V is formed anyway on this
    path (the update is folded into the weight), so the norm is V's own, batched over experts."""

    def __init__(self, base: nn.Module, parameter_name: str, r: int, scaling: float):
        super().__init__(base, parameter_name, r, scaling)
        device = self.lora_A.weight.device
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.num_experts, self.out_features, device=device))

    def reset_magnitude(self) -> None:
        # With B = 0, V = W and the scale m / ||V|| is 1 exactly.
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.adapted_canonical_lora().norm(dim=-1))

    def adapted_canonical_lora(self) -> torch.Tensor:
        """V = W + s B A, (experts, out, in), fp32."""
        return super().adapted_canonical()

    def adapted_canonical(self) -> torch.Tensor:
        V = self.adapted_canonical_lora()
        with _autocast_off(V.device):
            norm = V.detach().norm(dim=-1)
        return (self.lora_magnitude_vector / norm).unsqueeze(-1) * V


def _autocast_off(device: torch.device) -> AbstractContextManager:
    # The meta device (`lorafam inspect` builds models there) has no autocast to switch off.
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def _refresh_after_load(layer: DoRALayer, incompatible_keys: object) -> None:
    """load_state_dict post-hook: a state dict may carry a new W0 (a module-level function, so the
    model still pickles)."""
    layer.refresh_base_norm()


class DoRA(LoRA):
    name = "dora"
    Config = DoRAConfig
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"

    def make_layer(self, base_layer: nn.Linear, path: str) -> DoRALayer:
        layer = DoRALayer(base_layer, self.config.r, self.scaling, self.config.dropout)
        self.init_layer(layer)
        layer.reset_magnitude()
        return layer.train(base_layer.training)  # a new module starts in train mode: keep the model's

    def make_expert_layer(self, base: nn.Module, parameter_name: str, path: str) -> ExpertDoRALayer:
        layer = ExpertDoRALayer(base, parameter_name, self.config.r, self.scaling)
        self.init_layer(layer)
        layer.reset_magnitude()
        return layer

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        return super().peft_config(base_model_name, task_type) | {"use_dora": True}
