"""VeRA (Kopiczko et al., 2024, arXiv:2310.11454): Vector-based Random Matrix Adaptation.

h = W0 x + lambda_b * B (lambda_d * A x). One frozen random pair A (r x max_in), B (max_out x r) is
shared by every adapted layer; a layer of shape (out, in) uses the slices A[:, :in] and B[:out, :].
Only the per-layer vectors lambda_d (r, starts at ``d_initial``) and lambda_b (out, starts at zero,
so the model starts as the base) train. There is no alpha / r scale: the vectors carry the scale.

A and B come from a ``torch.Generator`` seeded with ``projection_seed`` and PEFT's Kaiming-uniform
draw (A first, then B), so equal seeds give PEFT's exact matrices and a file saved without them
(``save_projection: false``) is still readable by PEFT.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant, dropout_module

# PEFT's keys for the shared projections in adapter_model.safetensors.
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}
# Where the shared projections live in the adapted model (Variant.set_shared_module).
PROJECTIONS_ATTR = "vera_projections"


class VeRAConfig(AdapterConfig):
    variant: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, description="Rank of the shared random projections (the paper's default, 256).")
    alpha: float = Field(
        16.0, gt=0, description="Unused: VeRA has no alpha / r scale; lambda_b and lambda_d carry it."
    )
    projection_seed: int = Field(
        0, ge=0, lt=2**63, description="Seed of the shared random A and B (PEFT's projection_prng_key)."
    )
    d_initial: float = Field(0.1, description="Initial value of every lambda_d entry (paper: small, <= 0.1).")
    save_projection: bool = Field(
        True,
        description="Store A and B in the adapter file; when false they are regenerated from the seed on "
        "load, which relies on torch's generator giving the same numbers on the loading machine.",
    )

    @field_validator("d_initial")
    @classmethod
    def _d_initial_nonzero(cls, value: float) -> float:
        if value == 0:
            # lambda_b starts at zero too, and with both zero neither vector gets a gradient.
            raise ValueError(
                "must be non-zero: with lambda_b and lambda_d both zero VeRA never trains (paper: 0.1)"
            )
        return value


def kaiming_uniform_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), drawn from ``generator``."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen shared pair, as buffers (non-persistent: the variant saves them under PEFT's keys)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        vera_A = kaiming_uniform_projection((r, max_in), generator)  # drawn first, as in PEFT
        vera_B = kaiming_uniform_projection((max_out, r), generator)
        self.register_buffer("vera_A", vera_A.to(device), persistent=False)
        self.register_buffer("vera_B", vera_B.to(device), persistent=False)


class VeRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, r: int, d_initial: float, dropout: float):
        super().__init__(base_layer)
        device = base_layer.weight.device
        # fp32 whatever the base dtype, as in LoRA: tiny late-training updates survive.
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.vera_dropout = dropout_module(dropout)
        # Set by VeRA.attach once every layer exists (the shared shape is the max over layers). A
        # plain attribute, not a submodule, so the pair is neither saved nor moved once per layer.
        self.projections: tuple[VeRAProjections, ...] = ()

    def sliced_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        shared = self.projections[0]
        return shared.vera_A[:, : self.in_features], shared.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        vera_A, vera_B = self.sliced_projections()
        hidden = self.vera_lambda_d * F.linear(self.vera_dropout(x.to(vera_A.dtype)), vera_A)
        update = self.vera_lambda_b * F.linear(hidden, vera_B)
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        vera_A, vera_B = self.sliced_projections()
        return (self.vera_lambda_b[:, None] * vera_B) @ (self.vera_lambda_d[:, None] * vera_A)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared projections scaled by this layer's trained vectors: (Lambda_b B, Lambda_d A)."""
        vera_A, vera_B = self.sliced_projections()
        return self.vera_lambda_b[:, None] * vera_B, self.vera_lambda_d[:, None] * vera_A


class VeRA(Variant):
    name = "vera"
    Config = VeRAConfig
    paper = "Kopiczko et al., VeRA: Vector-based Random Matrix Adaptation (arXiv:2310.11454)"
    peft_type = "VERA"
    has_low_rank_factors = True
    shared_attr = PROJECTIONS_ATTR

    def make_layer(self, base_layer: nn.Linear, path: str) -> VeRALayer:
        cfg = self.config
        layer = VeRALayer(base_layer, cfg.r, cfg.d_initial, cfg.dropout)
        return layer.train(base_layer.training)  # a new module starts in train mode: keep the model's

    def attach(self, model: nn.Module) -> None:
        layers = list(self.layers.values())
        shared = VeRAProjections(
            self.config.r,
            max_in=max(layer.in_features for layer in layers),
            max_out=max(layer.out_features for layer in layers),
            seed=self.config.projection_seed,
            device=layers[0].base_layer.weight.device,
        )
        self.set_shared_module(shared)
        for layer in layers:
            layer.projections = (shared,)

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        # Under PEFT's keys, not the module's path (its buffers are non-persistent for that reason).
        shared = self.shared_module()
        if shared is None or not self.config.save_projection:
            return {}
        return {key: getattr(shared, name) for name, key in PROJECTION_KEYS.items()}

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        cfg = self.config
        return super().peft_config(base_model_name, task_type) | {
            "projection_prng_key": cfg.projection_seed,
            "save_projection": cfg.save_projection,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": False,
            "bias": "none",
            "init_weights": True,
        }
