"""Prompt -> completion, concatenated as they are (no template): the loss is on the completion."""

from __future__ import annotations

from typing import Any

from lorafam.data.formats.base import Format
from lorafam.data.rows import Segments, optional_text, required_text, trained


class PromptCompletion(Format):
    name = "prompt-completion"
    columns = ("prompt", "completion")
    priority = 30

    def segments(self, row: dict[str, Any], response_only: bool) -> Segments:
        prompt = optional_text(row.get("prompt"))
        completion = required_text(row.get("completion"))
        return trained([(prompt, False), (completion, True)], response_only)
