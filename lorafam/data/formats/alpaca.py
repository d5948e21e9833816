"""Alpaca: instruction (+ optional input) -> output, in Stanford Alpaca's prompt template."""

from __future__ import annotations

from typing import Any

from lorafam.data.formats.base import Format
from lorafam.data.rows import Segments, optional_text, required_text, trained

# The prompts from Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py), so models tuned on
# alpaca-style data elsewhere see the template they expect.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class Alpaca(Format):
    name = "alpaca"
    columns = ("instruction", "output")  # ``input`` is optional
    priority = 20

    def segments(self, row: dict[str, Any], response_only: bool) -> Segments:
        instruction = required_text(row.get("instruction"))
        output = required_text(row.get("output"))
        extra = optional_text(row.get("input"))
        if extra.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
        else:
            prompt = ALPACA_PROMPT.format(instruction=instruction)
        return trained([(prompt, False), (output, True)], response_only)
