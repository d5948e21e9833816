"""LoRA (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling (Kalajdzievski, 2023, arXiv:2312.03732).

h = W0 x + (alpha / r) * B A x, A: r x in, B: out x r. B starts at zero so the model starts as the
base. ``rslora: true`` scales by alpha / sqrt(r) instead, which keeps the update's magnitude stable as
r grows.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant, dropout_module, kaiming_uniform_


class LoRAConfig(AdapterConfig):
    variant: Literal["lora"] = "lora"
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).")
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="default: A Kaiming-uniform, B zero (the paper's reference code); "
        "gaussian: A ~ N(0, 1/r), B zero.",
    )


class LoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__(base_layer)
        device = base_layer.weight.device
        # Adapter weights stay fp32 whatever the base dtype: their updates are tiny relative to
        # their values late in training, which bf16 would round away.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = dropout_module(dropout)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling


class LoRA(Variant):
    name = "lora"
    Config = LoRAConfig
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    peft_type = "LORA"

    @property
    def scaling(self) -> float:
        cfg = self.config
        return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)

    def make_layer(self, base_layer: nn.Linear, path: str) -> LoRALayer:
        layer = LoRALayer(base_layer, self.config.r, self.scaling, self.config.dropout)
        self.init_layer(layer)
        return layer

    def init_layer(self, layer: LoRALayer) -> None:
        with torch.no_grad():
            if self.config.init == "gaussian":
                nn.init.normal_(layer.lora_A.weight, std=1 / self.config.r)
            else:
                kaiming_uniform_(layer.lora_A.weight)
            nn.init.zeros_(layer.lora_B.weight)

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        cfg = self.config
        return super().peft_config(base_model_name, task_type) | {
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": getattr(cfg, "rslora", False),
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
        }
