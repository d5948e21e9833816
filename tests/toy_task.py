"""A new task in two small classes, to show what one costs: a regression head (one number per text,
squared-error loss) and its data format (``text`` + ``target``). Nothing else in lorafam changes.

Registered by ``register()`` before lorafam.recipe is imported (the recipe's ``model.task`` and
``data.format`` choices are read from the registries when its schema is built), as a plugin would.
Used by tests/test_new_task.py in a fresh process.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafam.data.encode import batch_rows
from lorafam.data.formats.base import Format
from lorafam.data.rows import MALFORMED, Skip, required_text
from lorafam.tasks.base import LossOutput, TaskLossModule
from lorafam.tasks.classification import SequenceClassification


class Regression(SequenceClassification):
    """A sequence-classification model with one output, trained on squared error."""

    name = "regression"
    description = "regression: one number per text (toy task of the tests)"
    count_name = "examples"
    shown_metrics = ("loss",)
    sized_head = False

    def configure(self, config: Any, label_names: list[str] | None, pad_token_id: Any) -> None:
        config.num_labels, config.problem_type = 1, "regression"

    def loss_module(self, model: nn.Module) -> nn.Module:
        return RegressionLoss(model)

    def row_features(self) -> Any:
        features = super().row_features()
        features["labels"] = type(features["labels"])("float32")
        return features

    def collator(self, tokenizer: Any):
        pad = tokenizer.pad_token_id or 0

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            longest = max(len(r["input_ids"]) for r in rows)
            return {
                "input_ids": torch.tensor([r["input_ids"] + [pad] * (longest - len(r["input_ids"])) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (longest - len(r["input_ids"])) for r in rows]),
                "labels": torch.tensor([float(r["labels"]) for r in rows]),
            }

        return collate

    def metrics(self, loss_sum: float, count: int, correct: int) -> dict[str, float]:
        return {"loss": loss_sum / count, "examples": count} if count else {"loss": float("nan")}


class RegressionLoss(TaskLossModule):
    def forward(self, labels: torch.Tensor, **inputs: Any) -> LossOutput:
        predicted = self.model(**inputs).logits.float().squeeze(-1)
        return LossOutput(loss_sum=F.mse_loss(predicted, labels, reduction="sum"),
                          count=torch.tensor(labels.numel(), device=labels.device))


class RegressionFormat(Format):
    name = "regression"
    columns = ("text", "target")
    priority = 35
    task = "regression"
    unpackable = "one number per row"

    def encoder(self, cfg: Any, label_names: list[str] | None, key: str) -> Any:
        tokenizer, max_length = self.tokenizer, cfg.max_length

        def encode(batch: dict[str, list], counts: Counter) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
            for row in batch_rows(batch):
                try:
                    text = required_text(row["text"])
                    if not isinstance(row["target"], (int, float)):
                        raise Skip(MALFORMED)
                except Skip as skip:
                    counts[skip.reason] += 1
                    continue
                ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
                counts["kept"] += 1
                out["input_ids"].append(ids)
                out["attention_mask"].append([1] * len(ids))
                out["labels"].append(float(row["target"]))
            return out

        return encode


def register() -> None:
    """The two registry lines a new task adds (lorafam/tasks/__init__.py, lorafam/data/formats/__init__.py)."""
    from lorafam.data.formats import FORMATS
    from lorafam.tasks import TASKS

    TASKS[Regression.name] = Regression()
    FORMATS[RegressionFormat.name] = RegressionFormat
