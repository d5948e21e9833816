"""Chat: a ``messages`` list rendered by the tokenizer's chat template; the loss is on assistant turns."""

from __future__ import annotations

from typing import Any

from lorafam.data.formats.base import Format
from lorafam.data.rows import EMPTY, MALFORMED, Segments, Skip
from lorafam.errors import LorafamError


def chat_messages(value: Any) -> list[dict[str, str]]:
    """A row's ``messages`` as role/content dicts; Skip if unusable or without an assistant answer."""
    if value is None:
        raise Skip(EMPTY)
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Skip(MALFORMED)
    messages = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise Skip(MALFORMED)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise Skip(EMPTY)
    return messages


class Chat(Format):
    """Splits a rendered conversation into template text (masked) and assistant turns (trained).

    Each assistant turn i is what the template adds between ``messages[:i]`` + generation prompt and
    ``messages[:i+1]``: the content plus the template's end-of-turn marker, which must be trained or
    the model never learns to stop. Whitespace after the marker stays masked.
    """

    name = "chat"
    columns = ("messages",)
    priority = 10
    writes_special_tokens = True

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise LorafamError(
                "data.format chat: the tokenizer has no chat template; use a chat model, or convert the data "
                "to prompt-completion or text"
            )
        super().__init__(tokenizer)

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def segments(self, row: dict[str, Any], response_only: bool) -> Segments:
        messages = chat_messages(row.get("messages"))
        try:
            full = self.render(messages)
            if not response_only:
                return [(full, True)]
            segments: Segments = []
            done = ""  # the rendered text already split into segments
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                turn = self.render(messages[: i + 1])
                prompt = self.render(messages[:i], generation_prompt=True) if i > 0 else None
                if prompt is not None and prompt.startswith(done) and turn.startswith(prompt):
                    start = len(prompt)
                else:
                    # Template not prefix-stable (e.g. it rewrites earlier turns) or the conversation
                    # starts with the assistant: fall back to finding the content itself.
                    if not turn.startswith(done):
                        raise LorafamError(
                            "data.format chat: this chat template renders earlier turns differently as the "
                            "conversation grows, so assistant turns cannot be located; set data.response_only: false"
                        )
                    found = turn.find(message["content"], len(done))
                    if found < 0:
                        raise Skip(MALFORMED)
                    start = found
                answer = turn[start:].rstrip()
                end = start + len(answer)
                segments += [(turn[len(done) : start], False), (answer, True)]
                done = turn[:end]
            if not full.startswith(done):
                raise LorafamError(
                    "data.format chat: the chat template is not prefix-stable; set data.response_only: false"
                )
            segments.append((full[len(done) :], False))
            return segments
        except (LorafamError, Skip):
            raise
        except Exception:  # the template itself rejected the conversation (e.g. roles must alternate)
            raise Skip(MALFORMED) from None
