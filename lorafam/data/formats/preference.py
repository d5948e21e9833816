"""Preference pairs as plain text: ``prompt``, ``chosen`` and ``rejected`` (model.task preference).

Each side is tokenized as a prompt-completion row is (the tokenizer's BOS, the prompt untrained,
the answer and EOS trained), so the log-probabilities compared are those of the answer tokens only.
A pair is one prepared row (lorafam.tasks.preference). Left out and counted, like other bad rows:
a pair whose answers are the same text (it teaches nothing; malformed), an empty side (empty), and
a prompt that leaves no room for an answer within ``data.max_length`` (too long). A pair longer
than ``max_length`` is dropped or cut on both sides, as ``data.too_long`` says.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from lorafam.data.encode import CausalEncoder, batch_rows
from lorafam.data.formats.base import Format
from lorafam.data.rows import MALFORMED, TOO_LONG, Segments, Skip, optional_text, required_text
from lorafam.tasks.base import IGNORE_INDEX

if TYPE_CHECKING:
    from lorafam.recipe import DataConfig


class PreferenceText(Format):
    name = "preference"
    columns = ("prompt", "chosen", "rejected")
    priority = 32  # before preference-chat, whose columns are a subset of these
    task = "preference"
    unpackable = "a row is a pair of answers compared with each other"

    def pair(self, row: dict[str, Any]) -> tuple[Segments, Segments]:
        """The chosen and the rejected side as segments (answer trained, prompt not)."""
        prompt = optional_text(row.get("prompt"))
        chosen, rejected = required_text(row.get("chosen")), required_text(row.get("rejected"))
        if chosen.strip() == rejected.strip():
            raise Skip(MALFORMED)
        return [(prompt, False), (chosen, True)], [(prompt, False), (rejected, True)]

    def encoder(self, cfg: "DataConfig", label_names: list[str] | None, key: str) -> "PreferenceEncoder":
        return PreferenceEncoder(self, cfg.max_length, cfg.too_long, response_only=True)


class PreferenceEncoder(CausalEncoder):
    """Rows of a preference format -> one pair per row: the chosen side in ``input_ids``,
    ``attention_mask`` and ``labels``, the rejected side in ``rejected_input_ids`` and
    ``rejected_labels``. ``fmt.pair(row)`` gives the two sides' segments."""

    def __call__(self, batch: dict[str, list], counts: Counter) -> dict[str, list]:
        pairs: list[tuple[Segments, Segments]] = []
        for row in batch_rows(batch):
            try:
                chosen, rejected = self.fmt.pair(row)
                pairs.append(([(t, on) for t, on in chosen if t], [(t, on) for t, on in rejected if t]))
            except Skip as skip:
                counts[skip.reason] += 1
        sides = self.tokenized([side for pair in pairs for side in pair])
        out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", "rejected_input_ids", "rejected_labels")}
        for (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) in zip(sides[0::2], sides[1::2]):
            prompt = min(_prompt_length(chosen_labels), _prompt_length(rejected_labels))
            if prompt >= self.max_length:  # no answer token would be left
                counts[TOO_LONG] += 1
                continue
            truncated = max(len(chosen_ids), len(rejected_ids)) > self.max_length
            if truncated and self.too_long == "drop":
                counts[TOO_LONG] += 1
                continue
            m = self.max_length
            counts["truncated"] += truncated
            counts["kept"] += 1
            out["input_ids"].append(chosen_ids[:m])
            out["attention_mask"].append([1] * len(chosen_ids[:m]))
            out["labels"].append(chosen_labels[:m])
            out["rejected_input_ids"].append(rejected_ids[:m])
            out["rejected_labels"].append(rejected_labels[:m])
        return out


def _prompt_length(labels: list[int]) -> int:
    """Tokens before the first labelled one (the prompt and the template around it)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
