"""Sequence classification: one label per example, a fresh head trained in full."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafam.errors import LorafamError
from lorafam.tasks.base import LossOutput, Task, TaskLossModule

# Output heads of sequence-classification models in transformers, by attribute name.
KNOWN_HEADS = ("classifier", "score", "classification_head", "logits_proj")


class SequenceClassification(Task):
    name = "sequence-classification"
    description = "sequence-classification: a head over labels from the data"
    peft_task_type = "SEQ_CLS"
    token_labels = False
    auto_class_name = "AutoModelForSequenceClassification"
    count_name = "examples"
    shown_metrics = ("loss", "accuracy")
    sized_head = True
    pipeline_tag = "text-classification"

    def head_modules(self, model: nn.Module) -> list[str]:
        """The top-level head (``classifier`` for BERT, ``score`` for Llama, ...), found by name or,
        failing that, as the top-level linear whose width is the number of labels."""
        children = dict(model.named_children())
        found = [name for name in KNOWN_HEADS if name in children]
        if not found:
            num_labels = getattr(getattr(model, "config", None), "num_labels", None)
            found = [name for name, m in children.items() if isinstance(m, nn.Linear) and m.out_features == num_labels]
        if not found:
            raise LorafamError(
                f"cannot find the classification head of this {type(model).__name__}; name it in "
                "adapter.modules_to_save"
            )
        return found

    def configure(self, config: Any, label_names: list[str] | None, pad_token_id: Any) -> None:
        if label_names is not None:
            labels = list(label_names)
            if len(labels) < 2 or len(set(labels)) != len(labels):
                raise LorafamError(f"data: sequence-classification needs at least 2 distinct labels, got {labels}")
            config.num_labels = len(labels)
            config.id2label = dict(enumerate(labels))
            config.label2id = {label: i for i, label in enumerate(labels)}
        if getattr(config, "pad_token_id", None) is None:
            # Decoder classifiers (Llama, GPT-2) pick each row's last non-pad token; without a pad
            # id they refuse batches larger than one.
            config.pad_token_id = pad_token_id() if callable(pad_token_id) else pad_token_id

    def loss_module(self, model: nn.Module) -> nn.Module:
        return ClassificationLoss(model)

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def metrics(self, loss_sum: float, count: int, correct: int) -> dict[str, float]:
        out = super().metrics(loss_sum, count, correct)
        if count:
            out = {"loss": out["loss"], "accuracy": correct / count, "examples": count}
        return out


class ClassificationLoss(TaskLossModule):
    """forward(**batch) -> LossOutput(loss_sum, count, correct) over the batch's examples."""

    def forward(self, labels: torch.Tensor, **inputs: Any) -> LossOutput:
        logits = self.model(**inputs).logits.float()
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(-1) == labels).sum()
        return LossOutput(loss_sum=loss_sum, count=torch.tensor(labels.numel(), device=labels.device), correct=correct)
