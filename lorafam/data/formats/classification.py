"""Classification: ``text`` -> one ``label`` per row, for model.task sequence-classification."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from lorafam.data.encode import batch_rows, special_tokens_around
from lorafam.data.formats.base import Format
from lorafam.data.rows import EMPTY, MALFORMED, TOO_LONG, Skip, required_text
from lorafam.errors import LorafamError

if TYPE_CHECKING:
    import datasets

    from lorafam.recipe import DataConfig


def label_key(value: Any) -> Any:
    """A label value as str or int; raises Skip for missing or unusable ones."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Skip(EMPTY)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)  # CSV columns with gaps come back as floats
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise Skip(EMPTY)
        return value
    raise Skip(MALFORMED)


class Classification(Format):
    name = "classification"
    columns = ("text", "label")
    priority = 40  # before text: text+label is classification data (a wrong model.task is then named)
    task = "sequence-classification"
    unpackable = "one label per row: the classification head pools a single position of each row"

    @classmethod
    def label_names(cls, train: "datasets.Dataset", given: list[str] | None) -> list[str]:
        """``given`` (e.g. a resumed model's), else the ClassLabel names or the sorted label values."""
        if given is not None:
            return list(given)
        import datasets  # here, not at the top: the format registry is imported by every recipe load

        feature = train.features.get("label")
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        keys = set()
        for value in train["label"]:
            try:
                keys.add(label_key(value))
            except Skip:
                pass
        if all(isinstance(k, int) for k in keys):
            return [str(k) for k in sorted(keys)]
        return sorted({str(k) for k in keys})

    def encoder(self, cfg: "DataConfig", label_names: list[str] | None, key: str) -> "ClassificationEncoder":
        return ClassificationEncoder(self.tokenizer, cfg.max_length, cfg.too_long, list(label_names or []), key)


class ClassificationEncoder:
    """Rows -> ``input_ids``, ``attention_mask`` and one class id ``labels`` per row."""

    labels_per_token = False

    def __init__(self, tokenizer, max_length: int, too_long: str, label_names: list[str], key: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.too_long = too_long
        self.label_ids = {name: i for i, name in enumerate(label_names)}
        self.label_names = label_names
        self.key = key
        _, self.suffix = special_tokens_around(tokenizer)

    def label_id(self, value: Any) -> int:
        key = label_key(value)
        if str(key) in self.label_ids:
            return self.label_ids[str(key)]
        if isinstance(key, int) and 0 <= key < len(self.label_names):
            return key  # already a class id (e.g. a ClassLabel column)
        raise LorafamError(f"{self.key}: label {key!r} is not one of the model's labels {self.label_names}")

    def __call__(self, batch: dict[str, list], counts: Counter) -> dict[str, list]:
        texts, label_ids = [], []
        for row in batch_rows(batch):
            try:
                text = required_text(row["text"])
                label_ids.append(self.label_id(row["label"]))
                texts.append(text)
            except Skip as skip:
                counts[skip.reason] += 1
        # Tokenize one token past max_length: anything that long is too long, and long articles are
        # not tokenized in full only to be cut.
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"] if texts else []
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        keep_tail = len(self.suffix)
        for ids, label in zip(encoded, label_ids):
            if len(ids) > self.max_length:
                if self.too_long == "drop":
                    counts[TOO_LONG] += 1
                    continue
                # Keep the closing special token ([SEP]): the model was pretrained with it there.
                ids = ids[: self.max_length - keep_tail] + ids[len(ids) - keep_tail :]
                counts["truncated"] += 1
            counts["kept"] += 1
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(label)
        return out
