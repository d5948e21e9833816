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
* ``collator``: prepared rows -> the padded tensors of one batch (the batch contract);
* ``metrics`` / ``format_metrics``: eval sums -> the numbers users see, and their console line;
* ``probe_logits``: the logits a merge check compares.

A data format names the task its rows are for (``Format.task``); a recipe resolves its task once
(``Recipe.task``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

#: Labels with this value carry no loss (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


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

    #: The ``LossOutput`` entries an eval adds up over its batches (and processes); a missing one
    #: counts 0. ``metrics_from_sums`` turns them into the metrics.
    eval_sums: ClassVar[tuple[str, ...]] = ("loss_sum", "count", "correct")

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """The eval's sums (keyed by ``eval_sums``) -> metrics. Default: ``metrics``."""
        return self.metrics(sums["loss_sum"], int(sums["count"]), int(sums["correct"]))

    def row_tokens(self, row: dict[str, Any]) -> int:
        """The input tokens of one prepared row (tokens/s): its ``input_ids``."""
        return len(row["input_ids"])

    def row_keys(self, example_keys: list[int]) -> list[int]:
        """The adapter-dropout key of each row of a collated batch, from its examples' keys
        (lorafam.adapters.dropout): one row per example by default."""
        return example_keys

    def for_recipe(self, recipe: Any) -> "Task":
        """This task as the recipe configures it (a preference objective); default: itself."""
        return self

    def add_reference(self, data: Any, reference: Callable[[], Any], tokenizer: Any, batch_size: int,
                      say: Callable[[str], None] = lambda line: None) -> Any:
        """``data`` (lorafam.data.PreparedData) with what the task needs from the model a run starts
        from, before any training; ``reference()`` is a context manager giving that model (the
        adapter off: ``Variant.disabled``); ``say`` tells the user what is being computed (it can
        take minutes). Default: ``data`` unchanged, ``reference`` not entered."""
        return data

    def row_features(self) -> Any:
        """The columns of a prepared row (``datasets.Features``), which every format's encoder of this
        task produces: token ids, the attention mask, and the labels (per token, or one per row)."""
        import datasets  # here: the task registry is imported by every recipe load

        sequence = getattr(datasets, "List", None) or datasets.Sequence  # List is datasets >= 4
        ids = sequence(datasets.Value("int64"))
        return datasets.Features({
            "input_ids": ids,
            "attention_mask": sequence(datasets.Value("int8")),
            "labels": ids if self.token_labels else datasets.Value("int64"),
        })

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """A collate function that pads each batch to its longest row.

        Padding goes on the right whatever ``tokenizer.padding_side`` says: left padding shifts the
        position ids of causal LMs during training.

        Plain rows give ``input_ids``, ``attention_mask`` and ``labels`` (per token, padded with
        IGNORE_INDEX, where ``token_labels``; else one per row). Packed rows (they carry
        ``position_ids``; see lorafam.data.packing) give ``input_ids``, ``labels`` and
        ``position_ids`` and no ``attention_mask``: the model finds the examples from the restarting
        position ids, which it does only without a mask (and with ``use_cache=False``). The padding
        of a packed row gets position ids 0, 1, 2, ... so the model sees it as one more sequence of
        its own: it neither attends into the row's last example nor is attended to, and its labels
        carry no loss.
        """
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        token_labels = self.token_labels

        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            longest = max(len(e["input_ids"]) for e in examples)

            def padded(key: str, value: int) -> torch.Tensor:
                rows = [list(map(int, e[key])) for e in examples]
                return torch.tensor([r + [value] * (longest - len(r)) for r in rows], dtype=torch.long)

            if "position_ids" in examples[0]:
                positions = [list(map(int, e["position_ids"])) for e in examples]
                return {
                    "input_ids": padded("input_ids", pad_id),
                    "labels": padded("labels", IGNORE_INDEX),
                    "position_ids": torch.tensor([p + list(range(longest - len(p))) for p in positions], dtype=torch.long),
                }
            batch = {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0)}
            if token_labels:
                batch["labels"] = padded("labels", IGNORE_INDEX)
            else:
                batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
            return batch

        return collate

    def probe_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The logits a merge check compares: a token-labelled model's only at real tokens (pad
        positions are never used)."""
        return logits[batch["attention_mask"].bool()] if self.token_labels else logits

    def search_fitness(self, metrics: dict[str, float]) -> float:
        """How good a structure is, higher better (GLoRA's search): minus the eval loss."""
        return -metrics["loss"]

    #: The metrics printed after an eval, in this order (``metrics`` may hold more).
    shown_metrics: ClassVar[tuple[str, ...]] = ("loss",)

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """One line for the console, e.g. 'loss 1.4884  perplexity 4.4300'."""
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in self.shown_metrics if k in metrics)

    @staticmethod
    def perplexity(loss: float) -> float:
        return math.exp(min(loss, 50.0))
