"""DoRA (Liu et al., 2024, arXiv:2402.09353): Weight-Decomposed Low-Rank Adaptation.

W' = m * V / ||V||_c with V = W0 + s B A (LoRA's update, s = alpha / r) and ||.||_c the norm of each
output row. The magnitude m (one entry per output, PEFT's ``lora_magnitude_vector``) starts at
||W0||_c, so the model starts as the base. Following section 4.3 of the paper, ||V||_c is treated
as a constant in backward (detached): it still tracks B A, but no gradient flows through it.

The forward pass reuses the base layer's output instead of a second full matmul. With
base = W0 x + b and k = m / ||V||_c:

    W' x + b = k * (W0 x + s B A x) + b = base + (k - 1) * (base - b) + k * s * B A x

With dropout active the adapter path sees dropout(x) for both of its terms, as in PEFT:
W' x + b is replaced by base(x) + (k - 1) * W0 dropout(x) + k * s * B A dropout(x), which needs
W0 dropout(x), a second matmul, in training only. On a quantized base W0 (for the norm, that
matmul and merge) is dequantized on the fly by ``base_weight()``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

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
    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base_layer, r, scaling, dropout)
        device = base_layer.weight.device
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.out_features, device=device))

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A||_c per output row, in fp32 and detached (the paper's constant)."""
        weight = self.base_weight().float() + self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        return torch.linalg.vector_norm(weight, dim=1)

    def reset_magnitude(self) -> None:
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        scale = self.lora_magnitude_vector / self.weight_norm()
        x = x.to(self.lora_A.weight.dtype)
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            direction = F.linear(x, self.base_weight().to(x.dtype))
        else:
            bias = self.base_layer.bias
            direction = out.to(x.dtype) if bias is None else out.to(x.dtype) - bias.to(x.dtype)
        update = (scale - 1) * direction + scale * self.scaling * self.lora_B(self.lora_A(x))
        return out + update.to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """m * V / ||V||_c in fp32: magnitude and direction folded into one weight."""
        lora = self.lora_B.weight @ self.lora_A.weight
        weight = self.base_weight().float() + self.scaling * lora
        return (self.lora_magnitude_vector / self.weight_norm())[:, None] * weight

    def delta_weight(self) -> torch.Tensor:
        return self.merged_weight() - self.base_weight().float()

    def merged(self) -> nn.Linear:
        # Write W' directly: W0 + (W' - W0) would round twice.
        linear = super().merged()
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight().to(linear.weight.dtype))
        return linear


class DoRA(LoRA):
    name = "dora"
    Config = DoRAConfig
    paper = "Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"

    def make_layer(self, base_layer: nn.Linear, path: str) -> DoRALayer:
        layer = DoRALayer(base_layer, self.config.r, self.scaling, self.config.dropout)
        self.init_layer(layer)
        layer.reset_magnitude()
        return layer.train(base_layer.training)  # a new module starts in train mode: keep the model's

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        return super().peft_config(base_model_name, task_type) | {"use_dora": True}
