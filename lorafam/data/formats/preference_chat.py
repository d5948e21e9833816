"""Preference pairs as chats: ``chosen`` and ``rejected`` message lists that share every message but
the last, an assistant answer (model.task preference). A ``prompt`` column of messages, when the
rows have one (TRL's conversational form), goes in front of both.

Both sides are rendered with the tokenizer's chat template; only the final answer is trained: its
content plus the template's end-of-turn marker (lorafam.data.formats.chat). Rows are left out and
counted as for the plain-text form (lorafam.data.formats.preference), and also when the two lists
do not share their prompt or do not end with an assistant turn (malformed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafam.data.formats.chat import Chat, chat_messages
from lorafam.data.formats.preference import PreferenceEncoder
from lorafam.data.rows import EMPTY, MALFORMED, Segments, Skip

if TYPE_CHECKING:
    from lorafam.recipe import DataConfig


class PreferenceChat(Chat):
    name = "preference-chat"
    columns = ("chosen", "rejected")
    priority = 34  # after preference (prompt + chosen + rejected as text)
    task = "preference"
    unpackable = "a row is a pair of answers compared with each other"

    def pair(self, row: dict[str, Any]) -> tuple[Segments, Segments]:
        prompt = row.get("prompt")
        prompt = [] if prompt is None or isinstance(prompt, str) and not prompt else prompt
        if not isinstance(prompt, list) or not isinstance(row.get("chosen"), list) or not isinstance(row.get("rejected"), list):
            raise Skip(MALFORMED)
        chosen, rejected = chat_messages(prompt + row["chosen"]), chat_messages(prompt + row["rejected"])
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
            raise Skip(MALFORMED)
        if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
            raise Skip(EMPTY)
        if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
            raise Skip(MALFORMED)
        return self._last_answer_only(chosen), self._last_answer_only(rejected)

    def _last_answer_only(self, messages: list[dict[str, str]]) -> Segments:
        """The rendered chat with only its final assistant turn trained (earlier ones are prompt)."""
        segments = self.segments({"messages": messages}, response_only=True)
        last = max(i for i, (_, trained) in enumerate(segments) if trained)
        return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]

    def encoder(self, cfg: "DataConfig", label_names: list[str] | None, key: str) -> PreferenceEncoder:
        return PreferenceEncoder(self, cfg.max_length, cfg.too_long, response_only=True)
