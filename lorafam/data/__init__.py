"""From the recipe's ``data:`` section to batches.

Flow, one module per step:

- ``sources`` (+ ``packaged``): raw rows from a packaged alias, a local file or folder, or the hub.
- ``formats``: the registry of row formats (alpaca, chat, text, prompt-completion,
  classification; one file each). It resolves the format from the columns and turns each row into
  text *segments*, each trained or not (``rows``).
- ``encode``: segments -> token ids and labels, the loss mask on segment boundaries; truncate or
  drop to ``max_length``.
- ``packing``: with ``data.packing``, several examples per training row.
- ``prepare``: ``prepare_data`` runs the steps above and counts what it left out.
- ``collate``: ``make_collator``, the task's collator (lorafam.tasks.base.Task.collator), pads rows
  into tensors.

Adding a format: one file in ``formats/`` and one line in ``formats/__init__.py``.

The names below load on first use: the format registry is imported by every recipe load
(lorafam.recipe builds ``data.format``'s choices from it), which must not pay for ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "IGNORE_INDEX": "encode",
    "PreparedData": "prepare",
    "REPORT_KEYS": "prepare",
    "prepare_data": "prepare",
    "make_collator": "collate",
    "load_source": "sources",
    "PACKAGED_DATASETS": "packaged",
    "FORMATS": "formats",
    "resolve_format": "formats",
    "check_columns": "formats",
    "PackingReport": "packing",
    "check_packing_support": "packing",
}

if TYPE_CHECKING:
    from lorafam.data.collate import make_collator
    from lorafam.data.encode import IGNORE_INDEX
    from lorafam.data.formats import FORMATS, check_columns, resolve_format
    from lorafam.data.packaged import PACKAGED_DATASETS
    from lorafam.data.packing import PackingReport, check_packing_support
    from lorafam.data.prepare import REPORT_KEYS, PreparedData, prepare_data
    from lorafam.data.sources import load_source


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lorafam.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
