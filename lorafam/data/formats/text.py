"""Plain text: every token is trained (continued pre-training, or data already templated)."""

from __future__ import annotations

from typing import Any

from lorafam.data.formats.base import Format
from lorafam.data.rows import Segments, required_text


class Text(Format):
    name = "text"
    columns = ("text",)
    priority = 50  # last: "text" is also part of other formats' columns (classification)

    def segments(self, row: dict[str, Any], response_only: bool) -> Segments:
        return [(required_text(row.get("text")), True)]
