"""Tokenization: segments -> input ids and labels, with the loss mask on segment boundaries.

Each segment is tokenized on its own and the pieces are concatenated. Tokenizing the prompt and
prompt+response and comparing lengths breaks whenever BPE merges across the boundary; this cannot.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from lorafam.data.rows import EMPTY, TOO_LONG, Segments, Skip
from lorafam.tasks.base import IGNORE_INDEX

if TYPE_CHECKING:
    from lorafam.data.formats.base import Format


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after text by itself (e.g. BOS; [CLS] ... [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def batch_rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    """A ``datasets.map`` batch (columns of values) as a list of rows."""
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


class CausalEncoder:
    """Rows of a causal-lm format -> ``input_ids``, ``attention_mask`` and per-token ``labels``.

    Called by ``datasets.map`` on batches of raw rows; skipped rows are counted in ``counts``.
    """

    labels_per_token = True

    def __init__(self, fmt: "Format", max_length: int, too_long: str, response_only: bool):
        self.fmt = fmt
        self.tokenizer = fmt.tokenizer
        self.max_length = max_length
        self.too_long = too_long
        self.response_only = response_only
        prefix, _ = special_tokens_around(self.tokenizer)
        # Chat templates write their own BOS/end markers; other formats get the tokenizer's BOS (if it
        # adds one by itself) and an EOS after the response so the model learns to stop.
        self.prefix = [] if fmt.writes_special_tokens else prefix
        eos = self.tokenizer.eos_token_id
        self.suffix = [] if fmt.writes_special_tokens or eos is None else [eos]

    def __call__(self, batch: dict[str, list], counts: Counter) -> dict[str, list]:
        per_row: list[Segments] = []
        for row in batch_rows(batch):
            try:
                per_row.append([(t, trainable) for t, trainable in self.fmt.segments(row, self.response_only) if t])
            except Skip as skip:
                counts[skip.reason] += 1
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, labels in self.tokenized(per_row):
            truncated = len(ids) > self.max_length
            if truncated:
                if self.too_long == "drop":
                    counts[TOO_LONG] += 1
                    continue
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                # Nothing left to learn from (the prompt alone fills max_length).
                counts[TOO_LONG if truncated else EMPTY] += 1
                continue
            counts["truncated"] += truncated
            counts["kept"] += 1
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    def tokenized(self, per_row: list[Segments]) -> list[tuple[list[int], list[int]]]:
        """Each row's segments -> (token ids, labels), the tokenizer's BOS and the EOS around them."""
        # One tokenizer call for the whole batch: the Rust tokenizer is fast in bulk, slow per call.
        texts = [text for segments in per_row for text, _ in segments]
        token_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        rows = []
        for segments in per_row:
            ids, labels = list(self.prefix), [IGNORE_INDEX] * len(self.prefix)
            for _, trainable in segments:
                piece = next(token_ids)
                ids += piece
                labels += piece if trainable else [IGNORE_INDEX] * len(piece)
            ids += self.suffix
            labels += self.suffix if (self.suffix and segments and segments[-1][1]) else [IGNORE_INDEX] * len(self.suffix)
            rows.append((ids, labels))
        return rows
