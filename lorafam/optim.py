"""Optimizers and learning-rate schedules named in the ``train:`` section."""

from __future__ import annotations

from typing import Any

import torch
from transformers import get_scheduler

from lorafam.recipe import TrainConfig


def make_optimizer(param_groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the variant's parameter groups (each group carries its own lr)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
