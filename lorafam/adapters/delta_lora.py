"""Delta-LoRA (Zi et al., 2023, arXiv:2309.02411).

A LoRA (no dropout on its path) whose pre-trained weight also moves: after each optimizer step t
past the start step K, W <- W + lambda * s * (B_t A_t - B_{t-1} A_{t-1}), s = alpha / r, with no
gradient and no optimizer state for W. Paper defaults: lambda (``update_ratio``) = 2, K = 500.

Those updates telescope: after step N > K, W_N = W_0 + lambda * s * (B_N A_N - B_K A_K). So instead
of writing into W every step we keep W_0 untouched and store A_K, B_K (two LoRA-sized buffers,
``delta_lora_start_A/B``), and the forward pass adds W_N - W_0 as one more low-rank path, detached
so the gradients of A and B are those of the paper (W is a constant to them). The model computed is
the paper's at every step, and:

* the adapter file stays LoRA-sized (A, B, A_K, B_K) and loading it onto the original base
  reproduces the trained model exactly, in any base dtype (bf16 would round away the tiny per-step
  updates of an in-place W);
* a resumed run needs nothing beyond the adapter weights: A_K, B_K are among them;
* a quantized base works too, since W_0 is never written.

Until step K the start buffers track A and B, which keeps W's update exactly zero.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lorafam.adapters.lora import LoRA, LoRAConfig, LoRALayer
from lorafam.distributed import full_tensor


class DeltaLoRAConfig(LoRAConfig):
    variant: Literal["delta_lora"] = "delta_lora"  # type: ignore[assignment]
    update_ratio: float = Field(
        2.0, ge=0.0, description="lambda: W moves by lambda * alpha/r times each step's change of BA (paper: 2)."
    )
    start_step: int = Field(
        500, ge=0, description="K: W starts moving after this many optimizer steps (paper: 500)."
    )

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, value: float) -> float:
        if value > 0:
            raise ValueError(
                "delta_lora uses no dropout on the LoRA path (the paper removes it so that W's update, "
                "the change of BA, is the update the forward pass trained); set adapter.dropout: 0"
            )
        return value


class DeltaLoRALayer(LoRALayer):
    reads_base_weight = True  # each step writes its update into W, which must stay fp32

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, update_ratio: float):
        super().__init__(base_layer, r, scaling, dropout=0.0)
        self.update_ratio = update_ratio
        # A and B as of the start step: W's accumulated update is lambda * s * (B A - B_K A_K).
        self.register_buffer("delta_lora_start_A", torch.zeros_like(self.lora_A.weight))
        self.register_buffer("delta_lora_start_B", torch.zeros_like(self.lora_B.weight))

    @torch.no_grad()
    def track_start(self) -> None:
        # Whole tensors: under FSDP2 the factors are sharded, the buffers (never sharded) are not.
        self.delta_lora_start_A.copy_(full_tensor(self.lora_A.weight))
        self.delta_lora_start_B.copy_(full_tensor(self.lora_B.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(h))
        # (W - W_0) x = lambda * s * (B A - B_K A_K) x as one rank-2r path. W is a constant to the
        # optimizer, so its factors are detached (x is not: gradient still flows to the input).
        down = torch.cat([self.lora_A.weight.detach(), self.delta_lora_start_A])
        up = torch.cat([self.lora_B.weight.detach(), -self.delta_lora_start_B], dim=1)
        base_update = self.update_ratio * F.linear(F.linear(h, down), up)
        return out + (self.scaling * (lora + base_update)).to(out.dtype)

    def base_weight_update(self) -> torch.Tensor:
        """W - W_0: what the paper's per-step updates of W have added up to, shape (out, in)."""
        product = self.lora_B.weight @ self.lora_A.weight
        at_start = self.delta_lora_start_B @ self.delta_lora_start_A
        return (self.update_ratio * self.scaling * (product - at_start)).detach()

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() + self.base_weight_update()


class DeltaLoRA(LoRA):
    name = "delta_lora"
    Config = DeltaLoRAConfig
    supports_expert_parameters = False
    expert_parameters_reason = "its moving base weight is implemented for linear layers only"
    paper = "Zi et al., Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices (arXiv:2309.02411)"
    peft_type = None  # PEFT has no Delta-LoRA

    def make_layer(self, base_layer: nn.Linear, path: str) -> DeltaLoRALayer:
        layer = DeltaLoRALayer(base_layer, self.config.r, self.scaling, self.config.update_ratio)
        self.init_layer(layer)
        layer.track_start()
        return layer

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        # Up to and including step K the start buffers follow A and B (W's update stays zero);
        # afterwards they hold A_K, B_K and the forward pass sees the paper's W_t.
        if step <= self.config.start_step:
            for layer in self.layers.values():
                layer.track_start()
        return {}

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        cfg = self.config
        return super().peft_config(base_model_name, task_type) | {
            "update_ratio": cfg.update_ratio,
            "start_step": cfg.start_step,
        }
