"""Evaluation (loss, perplexity, accuracy) and the before/after generation sample."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lorafam.distributed import all_reduce_sum
from lorafam.tasks import Task


def iterate_batches(dataset: Any, batch_size: int, collate: Callable, order: list[int] | None = None) -> Iterator[dict]:
    indices = order if order is not None else list(range(len(dataset)))
    for start in range(0, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start : start + batch_size]])


def _without_accelerate_autocast(module: nn.Module) -> Callable[[], None]:
    """Accelerate's ``prepare`` under mixed precision wraps the model's forward in autocast (keeping
    the plain one as ``_original_forward``), so an eval of a prepared model would run in bf16 whatever
    ``autocast`` says. The plain forward is put back for the pass, so ``autocast`` alone decides the
    precision (fp32 by default: the same loss ``lorafam eval`` computes from the saved run). Returns the
    function that re-installs the wrapped forwards."""
    wrapped = [(m, vars(m)["forward"]) for m in module.modules() if "_original_forward" in vars(m) and "forward" in vars(m)]
    for m, _ in wrapped:
        m.forward = m._original_forward

    def restore() -> None:
        for m, forward in wrapped:
            m.forward = forward

    return restore


@torch.no_grad()
def evaluate(
    loss_model: nn.Module,
    task: Task,
    dataset: Any,
    collate: Callable,
    batch_size: int,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = nullcontext,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict[str, float]:
    """The task's metrics over ``dataset``: token-weighted loss (+ perplexity) for causal LMs,
    example-weighted loss + accuracy for classifiers.

    ``loss_model`` is the task's loss module (``task.loss_module(model)``), so only labelled
    positions reach the output head. With several processes each takes every ``num_processes``-th
    batch and the sums are added up; every process runs the same number of forward passes (a
    process short of batches repeats one with weight 0), as sharded models need. The model is put
    in eval mode for the pass and restored to the mode it had. The pass runs in the precision
    ``autocast`` gives, also for a model Accelerate prepared for mixed precision.
    """
    was_training = loss_model.training
    loss_model.eval()
    restore_forwards = _without_accelerate_autocast(loss_model)
    device = next(loss_model.parameters()).device
    n_batches = math.ceil(len(dataset) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    # The rows in order of length, so that each batch pads its rows to about their own length (chats
    # of 20 to 128 tokens padded to the longest of 32 were mostly padding). The sums run over the
    # same rows in any order, so only float rounding moves; every process computes the same order.
    n_rows = min(len(dataset), n_batches * batch_size)
    order = sorted(range(n_rows), key=lambda i: task.row_tokens(dataset[i]))
    starts = list(range(0, n_batches * batch_size, batch_size))
    mine = starts[process_index::num_processes]
    rounds = math.ceil(len(starts) / num_processes)
    names = task.eval_sums  # loss sum, label units, correct, and whatever else the task adds up
    sums = torch.zeros(len(names), dtype=torch.float64)
    try:
        for i in range(rounds):
            counted = i < len(mine)
            start = mine[i] if counted else starts[0]
            batch = collate([dataset[j] for j in order[start : start + batch_size]])
            with autocast():
                out = loss_model(**{k: v.to(device) for k, v in batch.items()})
            if counted:
                sums += torch.tensor([0.0 if out.get(name) is None else float(out[name]) for name in names], dtype=torch.float64)
    finally:
        loss_model.train(was_training)
        restore_forwards()
    all_reduce_sum(sums)
    return task.metrics_from_sums({name: float(value) for name, value in zip(names, sums)})


def eval_rows_with_reference(task: Task, data: Any, reference: Callable[[], Any], tokenizer: Any, batch_size: int) -> Any:
    """``data`` for an eval of a finished run: its eval rows with what the task needs from the model
    the run started from (``Task.add_reference``); the train rows, not scored, are left out."""
    return task.add_reference(dataclasses.replace(data, train=data.train.select([])), reference, tokenizer, batch_size)


@torch.no_grad()
def generate_sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (as a user turn when the tokenizer has a chat template)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        if getattr(tokenizer, "chat_template", None):
            inputs = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
