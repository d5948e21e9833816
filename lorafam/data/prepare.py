"""From the recipe's ``data:`` section to tokenized (optionally packed) train/eval datasets."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import datasets

from lorafam.data.formats import FORMATS, check_columns, packing_refusal, resolve_format
from lorafam.data.packing import PackingReport, pack
from lorafam.data.sources import load_source
from lorafam.errors import LorafamError
from lorafam.tasks import get_task

if TYPE_CHECKING:
    from lorafam.recipe import DataConfig

REPORT_KEYS = ("read", "kept", "truncated", "dropped_too_long", "dropped_empty", "dropped_malformed")


@dataclass
class PreparedData:
    """Tokenized data ready for a DataLoader with ``make_collator``'s collate function.

    ``report`` counts rows over train and eval together; ``read`` is the rows that were tokenized
    (after ``max_samples``), so ``read == kept + dropped_too_long + dropped_empty + dropped_malformed``.
    ``truncated`` rows are among the kept ones.

    With ``data.packing``, ``train`` holds packed rows (columns input_ids, labels, position_ids;
    several examples each) and ``packing`` says what packing did; ``eval`` stays one example per row.
    """

    train: datasets.Dataset  # columns input_ids, attention_mask, labels (packed: see above)
    eval: datasets.Dataset | None  # columns input_ids, attention_mask, labels
    format: str  # the resolved format name
    label_names: list[str] | None  # classification only: class id -> name
    report: dict[str, int]
    packing: PackingReport | None = None


def prepare_data(
    cfg: "DataConfig", tokenizer, task: str, seed: int, label_names: list[str] | None = None
) -> PreparedData:
    """Load, split, format and tokenize the recipe's data, and pack it if ``cfg.packing``.

    ``task`` is "causal-lm" or "sequence-classification". For classification, ``label_names`` fixes
    the class ids (e.g. those of a model being resumed); otherwise they are the sorted label values
    of ``cfg.train``. ``seed`` fixes the held-out split, ``max_samples``' choice and the packing.

    Bad rows never stop a run: they are dropped and counted in ``report``. Bad *input* (missing
    file, missing column, nothing usable left) is a one-line LorafamError.
    """
    with _no_progress_bars():
        train_raw = load_source(cfg.train, "data.train")
        eval_raw = load_source(cfg.eval, "data.eval") if cfg.eval is not None else None
        fmt_name = resolve_format(cfg.format, train_raw.column_names, task, "data.train")
        if eval_raw is not None:
            check_columns(fmt_name, eval_raw.column_names, "data.eval")
        if cfg.packing and (refusal := packing_refusal(fmt_name, task)):
            raise LorafamError(refusal)

        fmt_class = FORMATS[fmt_name]
        label_names = fmt_class.label_names(train_raw, label_names)  # before the split: held-out rows have known labels
        if eval_raw is None and len(train_raw) >= 2:
            split = train_raw.train_test_split(test_size=cfg.eval_split, seed=seed)
            train_raw, eval_raw = split["train"], split["test"]
        if cfg.max_samples is not None and len(train_raw) > cfg.max_samples:
            train_raw = train_raw.shuffle(seed=seed).select(range(cfg.max_samples))

        fmt = fmt_class(tokenizer)
        counts: Counter = Counter()
        features = get_task(task).row_features()
        train = _encode(train_raw, fmt.encoder(cfg, label_names, "data.train"), features, counts, f"train-{cfg!r}")
        if len(train) == 0:
            raise LorafamError(
                f"data.train: no usable rows in {cfg.train} ({counts['read']} read: {_describe(counts)}); "
                f"check data.format ({fmt_name}), data.max_length ({cfg.max_length}) and the rows themselves"
            )
        eval_data = None
        if eval_raw is not None:
            eval_counts: Counter = Counter()
            eval_data = _encode(eval_raw, fmt.encoder(cfg, label_names, "data.eval"), features, eval_counts, f"eval-{cfg!r}")
            if len(eval_data) == 0:
                if cfg.eval is not None:
                    raise LorafamError(
                        f"data.eval: no usable rows in {cfg.eval} ({eval_counts['read']} read: {_describe(eval_counts)})"
                    )
                eval_data = None  # a held-out slice that happened to be all bad: train without eval
            counts.update(eval_counts)

    packing = None
    if cfg.packing:
        # Eval stays one example per row: its loss is the same per-example, token-weighted figure
        # with or without packing, so runs stay comparable.
        train, packing = pack(train, cfg.max_length, seed)
    return PreparedData(
        train=train,
        eval=eval_data,
        format=fmt_name,
        label_names=label_names,
        report={k: int(counts[k]) for k in REPORT_KEYS},
        packing=packing,
    )


def _encode(raw: datasets.Dataset, encoder, features: datasets.Features, counts: Counter, tag: str) -> datasets.Dataset:
    counts["read"] += len(raw)
    # The counts come from running the function, so results must never come from the map cache;
    # an explicit fingerprint also spares datasets from hashing the tokenizer.
    fingerprint = hashlib.sha256(f"{raw._fingerprint}-{tag}".encode()).hexdigest()[:16]
    return raw.map(
        encoder,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        fn_kwargs={"counts": counts},
        features=features,
        load_from_cache_file=False,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _describe(counts: Counter) -> str:
    parts = [f"{counts[k]} {k.removeprefix('dropped_').replace('_', ' ')}" for k in REPORT_KEYS[3:] if counts[k]]
    return ", ".join(parts) or "none dropped"
