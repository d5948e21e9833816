"""Sequence packing (``data.packing``): several tokenized examples per training row.

A packed row is its examples one after another, each whole (never split), up to ``max_length``
tokens, with ``position_ids`` that restart at 0 for every example. Models built on transformers'
mask utilities (Llama, Qwen, Mistral, Gemma, GPT-2, ...) read restarting position ids as separate
sequences and mask attention between them, but only when they are called with no
``attention_mask`` and no cache (``use_cache=False``); ``check_packing_support`` verifies that a
given model really isolates the examples.

Labels never cross examples: a causal LM predicts token t+1 at position t, so each example's first
label would be predicted from the previous example's last token. That label is set to
IGNORE_INDEX; unpacked, it is never predicted either (nothing comes before it), so a packed batch
has exactly the unpacked batch's label tokens and the same loss.

Rows are filled by best-fit decreasing: examples longest first (ties in a seeded random order),
each into the row whose free space it fills most tightly, a new row when none has room. It packs
as tightly as first-fit decreasing (both within 11/9 of the fewest rows possible), is one bisect
per example over the sorted free spaces, and is deterministic for a seed. Packing happens once, in
prepare_data; the trainer then shuffles packed rows like any others.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from lorafam.tasks.base import IGNORE_INDEX
from lorafam.errors import LorafamError

PACKED_COLUMNS = ("input_ids", "labels", "position_ids")


def assign_rows(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices per packed row, by best-fit decreasing (see the module docstring)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted; full rows leave the list
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            row, space = len(rows) - 1, max_length
        else:
            space, row = free.pop(k)
            rows[row].append(i)
        space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, row))
    return rows


def padding_fraction(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of the tokens in padded batches that are padding, for batches of ``batch_size`` rows
    in a seeded random order (as the trainer draws them), each padded to its longest row."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded if padded else 0.0


@dataclass
class PackingReport:
    """What packing did to the training rows: counts, and the padding it saves."""

    max_length: int
    example_lengths: list[int] = field(repr=False)
    row_lengths: list[int] = field(repr=False)

    @property
    def examples(self) -> int:
        return len(self.example_lengths)

    @property
    def rows(self) -> int:
        return len(self.row_lengths)

    def padding(self, batch_size: int, seed: int = 0) -> tuple[float, float]:
        """Padding fraction of batches of ``batch_size`` rows, without and with packing."""
        return (
            padding_fraction(self.example_lengths, batch_size, seed),
            padding_fraction(self.row_lengths, batch_size, seed),
        )

    def as_dict(self, batch_size: int) -> dict[str, Any]:
        """For run.json: rows before/after and the padding fraction before/after at ``batch_size``."""
        before, after = self.padding(batch_size)
        return {
            "rows_before": self.examples,
            "rows_after": self.rows,
            "tokens": sum(self.example_lengths),
            "max_length": self.max_length,
            "batch_size": batch_size,
            "padding_before": round(before, 4),
            "padding_after": round(after, 4),
        }

    def summary(self, batch_size: int) -> str:
        """One line for the CLI's data report."""
        before, after = self.padding(batch_size)
        return (
            f"packed {self.examples} examples into {self.rows} rows of up to {self.max_length} tokens; "
            f"padding at batch {batch_size}: {before:.0%} -> {after:.0%}"
        )


def pack(train: datasets.Dataset, max_length: int, seed: int) -> tuple[datasets.Dataset, PackingReport]:
    """``train`` (columns input_ids, labels; one example per row) as packed rows with columns
    input_ids, labels and position_ids. Works on the Arrow columns: no Python list per token."""
    table = train.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    offsets = ids.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    if not pa.types.is_list(labels.type) or not np.array_equal(np.diff(labels.offsets.to_numpy()), lengths):
        raise ValueError("packing needs one label per token")
    starts = offsets[:-1] - offsets[0]
    flat_ids = ids.flatten().to_numpy()
    flat_labels = labels.flatten().to_numpy()

    rows = assign_rows(lengths.tolist(), max_length, seed)
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    example_lengths = lengths[order]
    example_begin = np.cumsum(example_lengths) - example_lengths  # where each example starts in the packed stream
    # Token t of example e sits at position t of that example: positions restart per example.
    position = np.arange(int(example_lengths.sum())) - np.repeat(example_begin, example_lengths)
    gather = np.repeat(starts[order], example_lengths) + position
    packed_ids = flat_ids[gather]
    packed_labels = flat_labels[gather].copy()
    packed_labels[example_begin] = IGNORE_INDEX  # never predicted from the previous example's last token

    row_lengths = np.array([int(lengths[row].sum()) for row in rows], dtype=np.int64)
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(row_lengths)]), pa.int32())

    def column(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(row_offsets, pa.array(values, pa.int64()))

    packed = datasets.Dataset(
        pa.table({"input_ids": column(packed_ids), "labels": column(packed_labels), "position_ids": column(position)})
    )
    report = PackingReport(max_length, lengths.tolist(), row_lengths.tolist())
    return packed, report


@torch.no_grad()
def check_packing_support(model: torch.nn.Module) -> None:
    """Raise a LorafamError unless ``model`` keeps packed examples apart.

    Runs a tiny packed row of two examples (position ids restarting, no attention mask, no cache:
    the call the trainer makes) and each example alone. The packed logits must match the lone ones;
    a model that ignores ``position_ids`` or attends across examples matches a plain concatenation
    instead. The comparison is relative to how much the context changes the logits, so it holds
    for tiny random models and low-precision ones alike. Runs in eval mode (no dropout) and
    restores the mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    first = torch.tensor([[(7 * i + 3) % vocab for i in range(6)]], device=device)
    second = torch.tensor([[(11 * i + 5) % vocab for i in range(5)]], device=device)
    joined = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(6), torch.arange(5)]).unsqueeze(0).to(device)
    try:
        try:
            alone = model(input_ids=second, use_cache=False).logits.float()
            packed = model(input_ids=joined, position_ids=positions, use_cache=False).logits[:, 6:].float()
            concatenated = model(input_ids=joined, use_cache=False).logits[:, 6:].float()
        except Exception as e:  # e.g. a forward that takes no position_ids
            why = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise LorafamError(
                f"data.packing: {type(model).__name__} cannot run packed rows ({why}); set data.packing: false"
            ) from None
    finally:
        model.train(was_training)
    leak = (packed - alone).abs().max().item()
    context = (concatenated - alone).abs().max().item()
    if not leak <= 0.01 * context:
        raise LorafamError(
            f"data.packing: {type(model).__name__} lets packed examples see each other (with "
            f"attention implementation {getattr(model.config, '_attn_implementation', '?')}); set data.packing: false"
        )
