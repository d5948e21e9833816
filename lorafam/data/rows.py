"""What a raw row becomes before tokenization, and why a row may be left out.

A causal-lm row becomes *segments*: pieces of text, each marked trainable or not. They are tokenized
one by one and concatenated (lorafam.data.encode), so the loss mask falls exactly on segment
boundaries.
"""

from __future__ import annotations

from typing import Any

# A row as segments: (text, trainable). Tokenized one by one and concatenated.
Segments = list[tuple[str, bool]]

# The report counters a skipped row can land in (see lorafam.data.prepare.REPORT_KEYS).
EMPTY, MALFORMED, TOO_LONG = "dropped_empty", "dropped_malformed", "dropped_too_long"


class Skip(Exception):
    """A row that cannot be used; ``reason`` is its report counter. Bad rows never stop a run."""

    def __init__(self, reason: str):
        self.reason = reason


def required_text(value: Any) -> str:
    """A text field that must hold something: missing or blank is empty, a non-string malformed."""
    if value is None:
        raise Skip(EMPTY)
    if not isinstance(value, str):
        raise Skip(MALFORMED)
    if not value.strip():
        raise Skip(EMPTY)
    return value


def optional_text(value: Any) -> str:
    """A text field that may be missing (then ""); a non-string is malformed."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Skip(MALFORMED)
    return value


def trained(segments: Segments, response_only: bool) -> Segments:
    """``segments`` as marked when the loss is on responses only, else every segment trained."""
    return segments if response_only else [(text, True) for text, _ in segments]
