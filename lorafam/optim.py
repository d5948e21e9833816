"""Optimizers and learning-rate schedules named in the ``train:`` section."""

from __future__ import annotations

import math
from typing import Any

import torch

from lorafam.recipe import TrainConfig


#: train.optimizer names served by bitsandbytes, and its class for each. The 8-bit ones keep Adam's
#: two moments block-quantized to 8 bits (Dettmers et al., arXiv:2110.02861); paged ones put the
#: state in CUDA unified memory, which spills to CPU RAM on a memory spike instead of failing
#: (the QLoRA paper's paged optimizers).
BNB_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


def make_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the variant's parameter groups (each group carries its own lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer in BNB_OPTIMIZERS:
        return _bnb_optimizer(param_groups, cfg)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _bnb_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    from lorafam.quant import note_paged_on_cpu, quiet_bitsandbytes

    quiet_bitsandbytes()
    import bitsandbytes as bnb

    on_cuda = any(p.is_cuda for g in param_groups for p in g["params"])
    if cfg.optimizer.startswith("paged_") and not on_cuda:
        note_paged_on_cpu(cfg.optimizer)
    optimizer_class = getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])
    return optimizer_class(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, warmup: int | None = None) -> Any:
    """Linear warmup from 0, then constant, linear to 0 or half a cosine to 0 over the remaining steps.

    The same multipliers as transformers' ``get_scheduler`` ("constant_with_warmup", "linear",
    "cosine"), written out on torch's LambdaLR: importing transformers.optimization pulls in the
    Trainer's utilities (and PEFT with them where it is installed), seconds on every start.
    """
    warmup = cfg.warmup_steps if warmup is None else warmup
    decay_steps = max(1, total_steps - warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if cfg.schedule == "linear":
            return max(0.0, (total_steps - step) / decay_steps)
        if cfg.schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / decay_steps)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
