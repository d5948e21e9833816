"""Batches: prepared rows -> padded tensors for the model's forward."""

from __future__ import annotations

from typing import Callable

import torch

from lorafam.tasks import get_task

from lorafam.data.encode import IGNORE_INDEX


def make_collator(tokenizer, task: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate function that pads each batch to its longest row.

    Padding goes on the right whatever ``tokenizer.padding_side`` says: left padding shifts the
    position ids of causal LMs during training.

    Plain rows give ``input_ids``, ``attention_mask`` and ``labels``. Packed rows (they carry
    ``position_ids``; see lorafam.data.packing) give ``input_ids``, ``labels`` and ``position_ids``
    and no ``attention_mask``: the model finds the examples from the restarting position ids, which
    it does only without a mask (and with ``use_cache=False``). The padding of a packed row gets
    position ids 0, 1, 2, ... so the model sees it as one more sequence of its own: it neither
    attends into the row's last example nor is attended to, and its labels carry no loss.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    classification = not get_task(task).token_labels

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
                "position_ids": torch.tensor(
                    [p + list(range(longest - len(p))) for p in positions], dtype=torch.long
                ),
            }
        batch = {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0)}
        if classification:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        else:
            batch["labels"] = padded("labels", IGNORE_INDEX)
        return batch

    return collate
