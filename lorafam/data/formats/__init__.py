"""The format registry. Adding a format: one new file in this folder and one line here.

Everything format-specific is read from the registered classes: the recipe's ``data.format``
choices, auto-detection, the column checks, and whether ``data.packing`` applies.
"""

from __future__ import annotations

from lorafam.data.formats.base import Format
from lorafam.data.formats.alpaca import Alpaca
from lorafam.data.formats.chat import Chat
from lorafam.data.formats.text import Text
from lorafam.data.formats.prompt_completion import PromptCompletion
from lorafam.data.formats.classification import Classification
from lorafam.data.formats.preference import PreferenceText
from lorafam.data.formats.preference_chat import PreferenceChat
from lorafam.errors import LorafamError

# In the order the recipe reference lists them; auto-detection goes by each format's priority.
FORMATS: dict[str, type[Format]] = {
    cls.name: cls
    for cls in [
        Alpaca,
        Chat,
        Text,
        PromptCompletion,
        Classification,
        PreferenceText,
        PreferenceChat,
    ]
}


def formats_for_task(task: str) -> list[type[Format]]:
    return [f for f in FORMATS.values() if f.task == task]


def detect_format(columns: list[str], key: str = "data.train") -> str:
    """The first format, by priority, whose required columns are all present."""
    by_priority = sorted(FORMATS.values(), key=lambda f: f.priority)
    for fmt in by_priority:
        if all(c in columns for c in fmt.columns):
            return fmt.name
    expected = ", ".join(_columns_and_name(f) for f in by_priority)
    raise LorafamError(
        f"{key}: cannot tell the data format from columns {columns}; expected {expected}, or set data.format"
    )


def _columns_and_name(fmt: type[Format]) -> str:
    columns = "+".join(fmt.columns)
    return columns if fmt.name == "-".join(fmt.columns) else f"{columns} ({fmt.name})"


def resolve_format(requested: str, columns: list[str], task: str, key: str = "data.train") -> str:
    """The format for these columns; ``requested`` is the recipe's ``data.format`` ("auto" detects)."""
    fitting = [f.name for f in formats_for_task(task)]
    if requested != "auto":
        fmt = requested
    elif len(fitting) == 1:
        fmt = fitting[0]  # the task leaves no choice (classification); the column check says what is missing
    else:
        fmt = detect_format(columns, key)
    if fmt not in fitting:
        wanted = fitting[0] if len(fitting) == 1 else f"a {task} format ({', '.join(fitting)})"
        raise LorafamError(f"{key}: format {fmt} does not fit model.task {task}; that task needs {wanted}")
    check_columns(fmt, columns, key)
    return fmt


def check_columns(fmt: str, columns: list[str], key: str) -> None:
    missing = [c for c in FORMATS[fmt].columns if c not in columns]
    if missing:
        raise LorafamError(
            f"{key}: format {fmt} needs column {' and '.join(missing)}; the data has columns {columns}"
        )


def packing_refusal(requested: str, task: str) -> str | None:
    """Why ``data.packing: true`` cannot apply to this ``data.format`` and ``model.task``; None if it can.

    With ``requested`` "auto" every format the task can use must be packable, so the answer does
    not depend on the data's columns and the recipe can be refused at load.
    """
    candidates = [FORMATS[requested]] if requested != "auto" else formats_for_task(task)
    for fmt in candidates:
        if fmt.unpackable:
            via = "" if requested != "auto" else f" (model.task {task} trains format {fmt.name})"
            return (
                f"data.packing: format {fmt.name} cannot put several examples in one row{via}: "
                f"{fmt.unpackable}; set data.packing: false"
            )
    return None


__all__ = ["FORMATS", "Format", "check_columns", "detect_format", "packing_refusal", "resolve_format"]
