"""LoRA+ (Hayou, Ghosh & Yu, 2024, arXiv:2402.12354): LoRA with a larger learning rate for B.

The layers, saved file and merge are plain LoRA; only the optimizer groups differ. With A and B on one
learning rate, feature learning in wide models is inefficient; the paper sets lr_B = lr_ratio * lr_A
(its default ratio is 16). The grouping is PEFT's ``create_loraplus_optimizer``: B and every other
1-D trainable tensor (biases, norms of saved modules) get ``lr * lr_ratio``; everything else (A, 2-D
saved-module weights) gets the base lr. PEFT's separate embedding lr has no counterpart: lorafam
adapts linear layers only, so there are no embedding adapters for it to apply to.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from lorafam.adapters.lora import LoRA, LoRAConfig


class LoRAPlusConfig(LoRAConfig):
    variant: Literal["lora_plus"] = "lora_plus"
    lr_ratio: float = Field(
        16.0, ge=1.0, description="lr of B (and 1-D trainable tensors) over the base lr; the paper's default is 16."
    )


class LoRAPlus(LoRA):
    name = "lora_plus"
    Config = LoRAPlusConfig
    paper = "Hayou et al., LoRA+: Efficient Low Rank Adaptation of Large Models (arXiv:2402.12354)"

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        # The Hugging Face Trainer's no-decay rule, as PEFT applies it: no decay for LayerNorm
        # weights and biases. PEFT decays A, embeddings and decayable B/1-D tensors alike.
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        from transformers.trainer_pt_utils import get_parameter_names

        decay = {n for n in get_parameter_names(self.model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
        b_params = {id(layer.lora_B.weight) for _, layer in self.adapted_layers()}  # fused experts' B too
        groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "B_no_decay": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if id(p) in b_params or p.ndim == 1:
                groups["B" if name in decay else "B_no_decay"].append(p)
            else:
                groups["A"].append(p)
        cfg = self.config
        fast = lr * cfg.lr_ratio
        candidates = [
            {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
            {"params": groups["B"], "lr": fast, "weight_decay": weight_decay},
            {"params": groups["B_no_decay"], "lr": fast, "weight_decay": 0.0},
        ]
        return [g for g in candidates if g["params"]]
