"""Adapting a mixture-of-experts model's fused expert weights: trainable parameters and step time (issue 24).

    python benchmarks/moe_experts.py                     # random Qwen3-MoE, 4 layers, 8 experts (top 2), batch 4 x 128, r 8
    python benchmarks/moe_experts.py --threads 2 --rounds 6

Three sides on the same random model and batches, in rounds A B C C B A (one process, one optimizer
step each: forward, backward, AdamW): lorafam LoRA on the attention only (``target_parameters: []``,
what ``all-linear`` gave before), lorafam LoRA on attention + every expert (``all-linear``), and
PEFT's LoRA with the same ``target_modules`` + ``target_parameters``. Reported: trainable parameters,
each side's median step time, and per round its time over the attention-only side's (median, min..max).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from lorafam.adapters import VARIANTS


def model_for(args) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=args.hidden // 8, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.expert_intermediate, num_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=4 * args.length,
    )
    return Qwen3MoeForCausalLM(config)


def lorafam_side(base, args, target_parameters):
    model = copy.deepcopy(base)
    cfg = VARIANTS["lora"].Config(variant="lora", r=args.r, alpha=2 * args.r, target_modules="all-linear",
                                  target_parameters=target_parameters)
    variant = VARIANTS["lora"](cfg).apply(model)
    return model, variant.trainable_parameters()


def peft_side(base, args):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return model, [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per round (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    base = model_for(args)
    total = sum(p.numel() for p in base.parameters())
    experts = sum(p.numel() for n, p in base.named_parameters() if p.ndim == 3)
    sides = {
        "lorafam LoRA, attention only": lorafam_side(base, args, []),
        "lorafam LoRA, attention + experts": lorafam_side(base, args, None),
        "PEFT LoRA, attention + experts": peft_side(base, args),
    }
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.length), generator=g) for _ in range(args.steps + 1)]
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4) for name, (_, params) in sides.items()}

    def step(name: str, ids: torch.Tensor) -> None:
        model = sides[name][0]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            step(name, batches[0])  # warm-up
            start = time.perf_counter()
            for ids in batches[1:]:
                step(name, ids)
            times[name].append((time.perf_counter() - start) / args.steps)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"model: random Qwen3-MoE, {args.layers} layers, hidden {args.hidden}, {args.experts} experts (top 2, "
          f"inter {args.expert_intermediate}), {total:,} params of which {experts:,} in fused expert weights; "
          f"batch {args.batch} x {args.length}, r {args.r}, AdamW, fp32")
    reference = times[names[0]]
    for name in names:
        trainable = sum(p.numel() for p in sides[name][1])
        ratios = [t / r for t, r in zip(times[name], reference)]
        print(f"{name:36s} trainable {trainable:>10,}  step {statistics.median(times[name]) * 1000:8.1f} ms  "
              f"x{statistics.median(ratios):.2f} ({min(ratios):.2f}..{max(ratios):.2f}) of attention-only")


if __name__ == "__main__":
    main()
