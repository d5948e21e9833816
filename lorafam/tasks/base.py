"""What a task is: the model class, the head trained in full, how labels are counted and scored.

lorafam supports a task by one small file in this folder (a ``Task`` subclass) and one registry line
in ``lorafam/tasks/__init__.py``; nothing else compares task names. The training loop, eval and
run folders ask the task:

* ``auto_class`` / ``peft_task_type``: which transformers class loads the model, and what
  adapter_config.json says to PEFT;
* ``head_modules``: modules trained in full and saved with the adapter (a classifier's head);
* ``loss_module``: an ``nn.Module`` around the model whose forward returns the *sum* of the loss
  over a batch's label units and their count, so the trainer can normalise a whole optimizer step
  (every micro-batch on every process) by the step's total count;
* ``label_count``: the label units of a batch, counted before any forward pass;
* ``metrics``: eval sums -> the numbers users see.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn


class TaskLossModule(nn.Module):
    """Base of the tasks' loss modules: the transformers model at ``self.model``, plus the few
    attributes of it that Accelerate's FSDP2 preparation reads from the module it is given (which
    layers to shard, the embeddings to group with the final norm, weight tying)."""

    # Accelerate looks up ``getattr(module, module.base_model_prefix)`` for the final norm.
    base_model_prefix = "body"

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    @property
    def body(self) -> nn.Module | None:
        """The model without its head (LlamaModel in a LlamaForCausalLM), when it has one."""
        body = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        return body if isinstance(body, nn.Module) and body is not self.model else None

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None

    def tie_weights(self) -> None:
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()


class LossOutput(dict):
    """``loss_sum`` (summed over label units), ``count`` (label units) and, where the task has one,
    ``correct`` (argmax hits). A dict of tensors, which DistributedDataParallel passes through."""


class Task:
    """One kind of model head and loss. Subclasses set the class attributes and ``loss_module``."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: adapter_config.json's ``task_type`` (PEFT's TaskType value).
    peft_task_type: ClassVar[str]
    #: True: labels are per token (padded with IGNORE_INDEX); False: one label per example.
    token_labels: ClassVar[bool]
    #: transformers' Auto class name, resolved lazily (importing transformers is not free).
    auto_class_name: ClassVar[str]
    #: Name of the count in eval metrics ("tokens" or "examples").
    count_name: ClassVar[str]
    #: True when the head is sized from the data's labels and may replace the checkpoint's own.
    sized_head: ClassVar[bool] = False
    #: True when the model writes text (generation samples, chat, GGUF export).
    generates: ClassVar[bool] = False
    #: The Hugging Face Hub's pipeline tag for a model card.
    pipeline_tag: ClassVar[str]

    @property
    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    def head_modules(self, model: nn.Module) -> list[str]:
        """Modules trained in full and saved with the adapter. Default: none."""
        return []

    def configure(self, config: Any, label_names: list[str] | None, pad_token_id: Any) -> None:
        """Adjust the model config before loading (label set, pad id). Default: nothing."""

    def loss_module(self, model: nn.Module) -> nn.Module:
        """A module whose forward(**batch) returns a ``LossOutput`` for ``model``."""
        raise NotImplementedError

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def metrics(self, loss_sum: float, count: int, correct: int) -> dict[str, float]:
        """Eval sums -> metrics: the loss is always the mean over label units."""
        if count == 0:
            return {"loss": float("nan")}
        return {"loss": loss_sum / count, self.count_name: count}

    #: The metrics printed after an eval, in this order (``metrics`` may hold more).
    shown_metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """One line for the console, e.g. 'loss 1.4884  perplexity 4.4300'."""
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in self.shown_metrics if k in metrics)

    @staticmethod
    def perplexity(loss: float) -> float:
        return math.exp(min(loss, 50.0))
