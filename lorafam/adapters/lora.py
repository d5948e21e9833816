"""LoRA (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling (Kalajdzievski, 2023, arXiv:2312.03732)
and PiSSA initialization (Meng et al., 2024, arXiv:2404.02948).

h = W0 x + (alpha / r) * B A x, A: r x in, B: out x r. B starts at zero so the model starts as the
base. ``rslora: true`` scales by alpha / sqrt(r) instead, which keeps the update's magnitude stable as
r grows.

``init: pissa`` starts A, B from W0's top-r singular triplets and trains them on top of the frozen
residual W0 - s B0 A0 (same output at init, but the principal directions learn). The base weight is
changed, so the adapter is saved as a plain rank-2r LoRA on the *original* W0, as PEFT does with
``path_initial_model_for_weight_conversion``: W0 + s [B, -B0] [A; A0] = W_res + s B A.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant, dropout_module, kaiming_uniform_
from lorafam.adapters.experts import ExpertLoRALayer
from lorafam.errors import LorafamError
from lorafam.quant import dequantized_weight, set_weight


class LoRAConfig(AdapterConfig):
    variant: Literal["lora"] = "lora"
    rslora: bool = Field(False, description="Scale by alpha/sqrt(r) instead of alpha/r (rsLoRA).")
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default",
        description="default: A Kaiming-uniform, B zero (the paper's reference code); "
        "gaussian: A normal with std 1/r (PEFT's), B zero; pissa: A, B from the top-r SVD of W, which is replaced by "
        "its residual (saved as a rank-2r LoRA on the original W).",
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

    def pair(self) -> tuple[nn.Linear, nn.Linear]:
        """The (A, B) pair this layer computes with: its own. A variant whose layers may share a
        pair (LoRA-drop) overrides only this."""
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        lora_A, lora_B = self.pair()
        update = lora_B(lora_A(self.lora_dropout(x.to(lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        lora_A, lora_B = self.pair()
        return (lora_B.weight @ lora_A.weight) * self.scaling

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A, lora_B = self.pair()
        return lora_B.weight, lora_A.weight

    # ----------------------------------------------------------------------------------------------
    # PiSSA
    @property
    def is_pissa(self) -> bool:
        return hasattr(self, "pissa_A0")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.is_pissa:
            return out
        # W holds the residual W - s B0 A0: add the principal part back to get the original layer.
        h = x.to(self.pissa_A0.dtype)
        principal = (h @ self.pissa_A0.T) @ self.pissa_B0.T
        return out + (self.scaling * principal).to(out.dtype)

    @torch.no_grad()
    def pissa_init(self) -> None:
        """Top-r SVD of W into A, B (s B A = W's principal part); W becomes the residual.

        Same arithmetic as PEFT's ``pissa_init`` (fp32 SVD, sqrt(S / s) split evenly), so the two give
        the same factors. A0, B0 are kept as buffers for the rank-2r conversion at save time. On a
        quantized base the residual is re-quantized (the paper's QPiSSA); the saved rank-2r LoRA is
        then exact only up to that quantization error, as PEFT warns for the same conversion.
        """
        weight = dequantized_weight(self.base_layer)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LorafamError(
                f"adapter.init: pissa needs a float base weight to take its SVD, got {weight.dtype}"
            )
        r = self.lora_A.out_features
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(s[:r] / self.scaling)
        lora_A = root[:, None] * vh[:r]
        lora_B = u[:, :r] * root
        self.lora_A.weight.copy_(lora_A)
        self.lora_B.weight.copy_(lora_B)
        self.register_buffer("pissa_A0", lora_A.clone())
        self.register_buffer("pissa_B0", lora_B.clone())
        set_weight(self.base_layer, weight.float() - self.scaling * lora_B @ lora_A)

    def adapter_named_tensors(self) -> dict[str, torch.Tensor]:
        out = super().adapter_named_tensors()
        if self.is_pissa:
            del out["pissa_A0"], out["pissa_B0"]
            out["lora_A.weight"] = torch.cat([self.lora_A.weight, self.pissa_A0], dim=0)
            out["lora_B.weight"] = torch.cat([self.lora_B.weight, -self.pissa_B0], dim=1)
        return out

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not self.is_pissa:
            return super().load_adapter_tensors(tensors)
        tensors = dict(tensors)
        r = self.lora_A.out_features
        A_pair, B_pair = tensors.pop("lora_A.weight").float(), tensors.pop("lora_B.weight").float()
        A0, B0 = A_pair[r:], -B_pair[:, r:]
        with torch.no_grad():
            if not (torch.equal(A0, self.pissa_A0) and torch.equal(B0, self.pissa_B0)):
                # This W was split differently from the trained one (another SVD implementation, tied
                # singular values): take the file's principal part out of W instead of ours, so
                # W_res + s B A is again what was trained. Sign flips alone keep B0 A0 and land here
                # harmlessly.
                weight = dequantized_weight(self.base_layer).float()
                original = weight + self.scaling * self.pissa_B0 @ self.pissa_A0
                set_weight(self.base_layer, original - self.scaling * B0 @ A0)
                self.pissa_A0.copy_(A0)
                self.pissa_B0.copy_(B0)
            self.lora_A.weight.copy_(A_pair[:r])
            self.lora_B.weight.copy_(B_pair[:, :r])
        super().load_adapter_tensors(tensors)


class LoRA(Variant):
    name = "lora"
    Config = LoRAConfig
    paper = "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)"
    peft_type = "LORA"
    has_low_rank_factors = True
    supports_expert_parameters = True
    #: The layer ``make_layer`` builds; a subclass that changes only which pair a layer uses
    #: (LoRA-drop) sets its own.
    layer_class: ClassVar[type[LoRALayer]] = LoRALayer

    @property
    def scaling(self) -> float:
        cfg = self.config
        return cfg.alpha / (math.sqrt(cfg.r) if cfg.rslora else cfg.r)

    def make_layer(self, base_layer: nn.Linear, path: str) -> LoRALayer:
        layer = self.layer_class(base_layer, self.config.r, self.scaling, self.config.dropout)
        self.init_layer(layer)
        return layer

    def make_expert_layer(self, base: nn.Module, parameter_name: str, path: str) -> ExpertLoRALayer:
        """A pair per expert of a fused weight, initialised as a linear layer's pair (PiSSA: per expert)."""
        layer = ExpertLoRALayer(base, parameter_name, self.config.r, self.scaling)
        self.init_layer(layer)
        return layer

    def init_layer(self, layer: LoRALayer | ExpertLoRALayer) -> None:
        if self.config.init == "pissa":
            layer.pissa_init()
        else:
            self.init_pair(layer.lora_A, layer.lora_B)

    @torch.no_grad()
    def init_pair(self, lora_A: nn.Linear, lora_B: nn.Linear, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform (``init: default``) or N(0, 1/r) (``gaussian``); B zero.

        Drawn from torch's global RNG in place, or where a ``generator`` is given (LoRA-drop's fresh
        pairs) on the CPU from it and then copied, so the numbers do not depend on the device.
        """
        A = lora_A.weight if generator is None else torch.empty(lora_A.weight.shape)
        if self.config.init == "gaussian":
            nn.init.normal_(A, std=1 / self.config.r, generator=generator)
        else:
            kaiming_uniform_(A, generator)
        if generator is not None and lora_A.weight.device.type != "meta":
            lora_A.weight.copy_(A)
        nn.init.zeros_(lora_B.weight)

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        cfg = self.config
        r, alpha = cfg.r, cfg.alpha
        if getattr(cfg, "init", "default") == "pissa":
            # Saved as the rank-2r LoRA [B, -B0][A; A0]: double r and keep alpha/r (or alpha/sqrt(r)
            # under rsLoRA) unchanged, exactly as PEFT's save_pretrained conversion does.
            r, alpha = 2 * r, alpha * (2**0.5 if getattr(cfg, "rslora", False) else 2)
        return super().peft_config(base_model_name, task_type) | {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": getattr(cfg, "rslora", False),
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
        }
