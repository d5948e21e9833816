"""Batches: prepared rows -> padded tensors for the model's forward (the task's collator)."""

from __future__ import annotations

from typing import Callable

import torch

from lorafam.tasks import Task, get_task


def make_collator(tokenizer, task: str | Task) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """``task``'s collate function (lorafam.tasks.base.Task.collator) for ``tokenizer``."""
    return (get_task(task) if isinstance(task, str) else task).collator(tokenizer)
