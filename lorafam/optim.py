"""Optimizers and learning-rate schedules named in the ``train:`` section."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

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
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    warmup = cfg.warmup_steps if warmup is None else warmup
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
