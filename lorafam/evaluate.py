"""Evaluation (loss, perplexity, accuracy) and the before/after generation sample."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


def iterate_batches(dataset: Any, batch_size: int, collate: Callable, order: list[int] | None = None) -> Iterator[dict]:
    indices = order if order is not None else list(range(len(dataset)))
    for start in range(0, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start : start + batch_size]])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    collate: Callable,
    task: str,
    batch_size: int,
    max_batches: int | None = None,
    autocast: Callable[[], Any] = nullcontext,
) -> dict[str, float]:
    """Token-weighted loss (+ perplexity) for causal LMs; example-weighted loss + accuracy for classifiers.

    The model is put in eval mode for the pass and restored to the mode it had.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count, correct = 0.0, 0, 0
    try:
        for i, batch in enumerate(iterate_batches(dataset, batch_size, collate)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch).logits.float()
            if task == "causal-lm":
                shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
                shift_labels = labels[:, 1:].reshape(-1)
                loss_sum += nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
                count += int((shift_labels != -100).sum())
            else:
                loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(-1) == labels).sum())
                count += labels.numel()
    finally:
        model.train(was_training)
    if count == 0:
        return {"loss": float("nan")}
    loss = loss_sum / count
    if task == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    return {"loss": loss, "accuracy": correct / count, "examples": count}


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
