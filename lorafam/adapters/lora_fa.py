"""LoRA-FA (Zhang et al., 2023, arXiv:2308.03303v1): LoRA with the projection-down A frozen.

A keeps its random LoRA init (Kaiming-uniform) and never trains; B starts at zero and is the only
trainable factor, so the update s B A stays in the row space of A. The point is activation memory:
LoRA must keep each adapted layer's input x (in values per token) to compute A's gradient, while
LoRA-FA keeps only A x (r values per token) for B's gradient. The input gradient through the adapter
path, A^T B^T g, needs only the weights.

No custom autograd function is needed for that: autograd saves an input of ``linear`` only when the
other operand requires grad, so with A frozen ``lora_A(x)`` saves nothing of x, and the frozen base
linear saves only W (x's gradient is g W). tests/test_pissa_lora_plus_lora_fa.py measures the saved bytes, and
benchmarks/lora_fa_memory.py compares whole stacks. Adapter dropout would keep an in-sized mask per
token again, so the recipes leave it at 0.

The file is a plain LoRA adapter (A and B keys), loadable by PEFT. Not implemented: the gradient
correction of the paper's later revision (PEFT's ``create_lorafa_optimizer``), which preconditions
B's gradient by (A A^T)^-1 / s^2 inside a custom optimizer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from lorafam.adapters.experts import ExpertLoRALayer
from lorafam.adapters.lora import LoRA, LoRAConfig, LoRALayer


class LoRAFAConfig(LoRAConfig):
    variant: Literal["lora_fa"] = "lora_fa"
    # PiSSA is left out: it rewrites W and trains A, and LoRA-FA's A is a frozen random projection.
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="Init of the frozen A: default Kaiming-uniform (LoRA's, as in the paper), gaussian normal with std 1/r.",
    )


class LoRAFA(LoRA):
    name = "lora_fa"
    Config = LoRAFAConfig
    paper = "Zhang et al., LoRA-FA: Memory-efficient Low-rank Adaptation for LLM Fine-tuning (arXiv:2308.03303)"

    def make_layer(self, base_layer: nn.Linear, path: str) -> LoRALayer:
        layer = super().make_layer(base_layer, path)
        layer.lora_A.weight.requires_grad_(False)
        return layer

    def make_expert_layer(self, base: nn.Module, parameter_name: str, path: str) -> ExpertLoRALayer:
        layer = super().make_expert_layer(base, parameter_name, path)
        layer.lora_A.weight.requires_grad_(False)  # every expert's A, frozen as a linear layer's
        return layer
