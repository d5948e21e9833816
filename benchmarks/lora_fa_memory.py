"""Activation memory kept for backward: LoRA vs LoRA-FA, side by side on CPU.

    python benchmarks/lora_fa_memory.py [--hidden 2048] [--layers 8] [--r 8] [--batch 4] [--seq 256]

Counts, with torch.autograd.graph.saved_tensors_hooks, the distinct storages autograd keeps during
one forward, leaving out parameters (weights are resident anyway). Two stacks of frozen linears,
every one adapted:

* ``linear``: linears only, so the adapter path is all there is to keep. Per layer LoRA keeps its
  input x (for A's gradient) and A x (for B's); LoRA-FA keeps only A x. The frozen base linear keeps
  nothing for its input gradient g W.
* ``linear+gelu``: GELU between the linears, as in an MLP. GELU keeps its own input, an x-sized
  tensor, so the adapter saving is diluted: the whole-model ratio a real transformer sees is of
  this kind (norms, activations and attention keep x-sized tensors of their own).

The first layer's input does not require grad (it comes from a frozen embedding), the later ones
do (earlier adapters train).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lorafam.adapters.lora import LoRA, LoRAConfig
from lorafam.analysis import saved_activation_bytes
from lorafam.adapters.lora_fa import LoRAFA, LoRAFAConfig


def forward_saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Activation bytes one forward keeps for backward (the loss's own ops not counted)."""
    outputs: list[torch.Tensor] = []
    kept = saved_activation_bytes(lambda: outputs.append(model(x)), model)
    outputs[0].pow(2).mean().backward()  # the graph is complete: B gets its gradients
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return kept


def build(kind: str, hidden: int, layers: int) -> nn.Sequential:
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks.append(nn.Linear(hidden, hidden))
        if kind == "linear+gelu" and i < layers - 1:
            blocks.append(nn.GELU())
    return nn.Sequential(*blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    tokens = args.batch * args.seq
    print(
        f"torch {torch.__version__}, fp32, {args.layers} adapted {args.hidden}x{args.hidden} linears, "
        f"r={args.r}, {args.batch}x{args.seq}={tokens} tokens"
    )
    print(f"{'stack':<12} {'LoRA MiB':>10} {'LoRA-FA MiB':>12} {'LoRA-FA/LoRA':>13} {'r/(in+r)':>9}")
    for kind in ["linear", "linear+gelu"]:
        measured = {}
        for variant_cls, config_cls in [(LoRA, LoRAConfig), (LoRAFA, LoRAFAConfig)]:
            torch.manual_seed(0)
            model = build(kind, args.hidden, args.layers)
            config = config_cls(variant=variant_cls.name, r=args.r, alpha=2 * args.r, target_modules="all-linear")
            variant = variant_cls(config).apply(model)
            with torch.no_grad():  # non-zero B, so the backward is the real one
                for layer in variant.layers.values():
                    layer.lora_B.weight.normal_(std=0.01)
            x = torch.randn(args.batch, args.seq, args.hidden)
            measured[variant_cls.name] = forward_saved_bytes(model, x)
        lora, fa = measured["lora"], measured["lora_fa"]
        mib = 2**20
        print(
            f"{kind:<12} {lora / mib:>10.1f} {fa / mib:>12.1f} {fa / lora:>13.4f} "
            f"{args.r / (args.hidden + args.r):>9.4f}"
        )


if __name__ == "__main__":
    main()
