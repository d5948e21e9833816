"""An Ollama Modelfile for an exported GGUF: its chat template in Go template syntax, stop tokens.

Ollama renders prompts with Go's text/template, not Jinja, so the chat template must be
translated. Jinja is a programming language and cannot be translated in general; instead the
template is *measured*. Most chat templates wrap every message in fixed text per role
(ChatML: ``<|im_start|>user\\n`` ... ``<|im_end|>\\n``; Llama 3: ``<|start_header_id|>user<|end_header_id|>\\n\\n``
... ``<|eot_id|>``), optionally after a start string and with a default system message when the
conversation has none. ``infer_chat_format`` renders probe conversations with unique marker
contents through the tokenizer's own template, reads those texts off, and keeps the result only
if re-rendering every probe from them reproduces the template's output exactly. A template that
does something else (Mistral's [INST] folds the system message into a user turn) gets no
TEMPLATE: Ollama then picks one of its own from the chat template inside the GGUF, and the
export says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_MARK = {"system": "LfmSysMark", "user": "LfmUserMark", "assistant": "LfmAssistantMark"}


@dataclass(frozen=True)
class ChatFormat:
    """A chat template that wraps each message in fixed text per role."""

    start: str  # once, before everything (often the BOS token's text)
    prefix: dict[str, str]  # role -> text before the message content
    suffix: dict[str, str]  # role -> text after it
    generation_prompt: str  # after the conversation, when the model is to answer
    default_system: str | None  # system content the template inserts when the conversation has none
    system: bool = True  # False: the template refuses or ignores system messages
    trims: bool = False  # the template strips whitespace around each message's content

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the chat template renders for ``messages`` (the check behind ``infer_chat_format``)."""
        parts = [self.start]
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            parts += [self.prefix["system"], self.default_system, self.suffix["system"]]
        for message in messages:
            role, content = message["role"], message["content"]
            parts += [self.prefix[role], content.strip() if self.trims else content, self.suffix[role]]
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def end_of_turn(self) -> str:
        """The text that ends the model's own turn."""
        return self.suffix["assistant"]


def _probes(with_system: bool) -> list[tuple[list[dict[str, str]], bool]]:
    """Conversations whose rendering must match, with contents that have inner whitespace."""

    def msg(role: str, n: int) -> dict[str, str]:
        return {"role": role, "content": f"{_MARK[role]}{n} two  words\nand a line"}

    probes = [
        ([msg("user", 1)], True),
        ([msg("user", 1), msg("assistant", 1), msg("user", 2)], True),
        ([msg("user", 1), msg("assistant", 1)], False),
        ([msg("user", 1), msg("assistant", 1), msg("user", 2), msg("assistant", 2)], False),
    ]
    if with_system:
        probes += [
            ([msg("system", 1), msg("user", 1)], True),
            ([msg("system", 1), msg("user", 1), msg("assistant", 1), msg("user", 2)], True),
            ([msg("system", 1), msg("user", 1), msg("assistant", 1)], False),
        ]
    return probes


def _renders_every_probe(chat: ChatFormat, render) -> bool:
    for messages, generation in _probes(chat.system):
        if render(messages, generation) != chat.render(messages, generation):
            return False
    if chat.system:
        # A system message after the first turn, where the template renders one, must match too:
        # it is what tells the start text apart from the system prefix.
        middle = [_marked("user", 1), _marked("assistant", 1), _marked("system", 2), _marked("user", 2)]
        rendered = render(middle, True)
        if rendered is not None and _MARK["system"] in rendered and rendered != chat.render(middle, True):
            return False
    return True


def _marked(role: str, n: int) -> dict[str, str]:
    return {"role": role, "content": f"{_MARK[role]}{n}"}


def _between(text: str, left: str | None, right: str | None) -> str | None:
    """The text between two markers (None: start / end of text); None when they are absent."""
    start = 0
    if left is not None:
        at = text.find(left)
        if at < 0:
            return None
        start = at + len(left)
    if right is None:
        return text[start:]
    end = text.find(right, start)
    return None if end < 0 else text[start:end]


def infer_chat_format(tokenizer: Any) -> ChatFormat | None:
    """The ChatFormat that renders exactly like the tokenizer's chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], generation: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception:  # a template may raise on a role it does not support (e.g. system)
            return None

    u1, a1, u2, s1 = _marked("user", 1), _marked("assistant", 1), _marked("user", 2), _marked("system", 1)
    three = render([u1, a1, u2], False)
    three_gen = render([u1, a1, u2], True)
    two = render([u1, a1], False)
    if three is None or three_gen is None or two is None or not three_gen.startswith(three):
        return None
    generation_prompt = three_gen[len(three) :]
    user_suffix = _between(three, u2["content"], None)
    assistant_suffix = _between(two, a1["content"], None)
    user_to_assistant = _between(three, u1["content"], a1["content"])
    assistant_to_user = _between(three, a1["content"], u2["content"])
    head = _between(three, None, u1["content"])
    if None in (user_suffix, assistant_suffix, user_to_assistant, assistant_to_user, head):
        return None
    if not (user_to_assistant.startswith(user_suffix) and assistant_to_user.startswith(assistant_suffix)):
        return None
    prefix = {
        "user": assistant_to_user[len(assistant_suffix) :],
        "assistant": user_to_assistant[len(user_suffix) :],
    }
    suffix = {"user": user_suffix, "assistant": assistant_suffix}
    if not head.endswith(prefix["user"]):
        return None
    before_first_user = head[: len(head) - len(prefix["user"])]

    bos = getattr(tokenizer, "bos_token", None) or ""
    with_system = render([s1, u1], False)
    if with_system is None or s1["content"] not in with_system:
        # The template refuses system messages (Gemma) or ignores them: so does the translation.
        chat = ChatFormat(before_first_user, prefix | {"system": ""}, suffix | {"system": ""}, generation_prompt, None, system=False)
        candidates = [chat]
    else:
        before_system = _between(with_system, None, s1["content"])
        system_to_user = _between(with_system, s1["content"], u1["content"])
        if system_to_user is None or not system_to_user.endswith(prefix["user"]):
            return None  # e.g. Mistral's, which folds the system message into a user turn
        suffix["system"] = system_to_user[: len(system_to_user) - len(prefix["user"])]
        # Where the start ends and the system prefix begins is not visible in this text. Try, in
        # order: the system prefix spelled like the user prefix (ChatML's <|im_start|>system\n),
        # the BOS token as the start, no start; keep the first that renders every probe.
        starts = []
        like_user = prefix["user"].replace("user", "system") if "user" in prefix["user"] else None
        if like_user and before_system.endswith(like_user):
            starts.append(before_system[: len(before_system) - len(like_user)])
        if bos and before_system.startswith(bos):
            starts.append(bos)
        starts.append("")
        candidates = []
        for start in dict.fromkeys(starts):
            if not before_system.startswith(start):
                continue
            system_prefix = before_system[len(start) :]
            default_system = None
            if before_first_user != start:
                block_start, block_end = start + system_prefix, suffix["system"]
                if not (before_first_user.startswith(block_start) and before_first_user.endswith(block_end)):
                    continue
                default_system = before_first_user[len(block_start) : len(before_first_user) - len(block_end)]
            candidates.append(ChatFormat(start, prefix | {"system": system_prefix}, dict(suffix), generation_prompt, default_system))
    chat = next((c for c in candidates if _renders_every_probe(c, render)), None)
    if chat is None:
        return None
    # Llama 3's template strips each message; Go templates cannot, so this is recorded, not matched.
    padded = [{"role": "user", "content": f"  {u1['content']} padded \n"}]
    if render(padded, True) != chat.render(padded, True):
        chat = dataclasses.replace(chat, trims=True)
        if render(padded, True) != chat.render(padded, True):
            return None
    return chat


def _go_string(text: str) -> str:
    """A Go template string constant. Quotes become \\u0022 so that the Modelfile's triple-quoted
    TEMPLATE never meets a run of quotes."""
    return json.dumps(text, ensure_ascii=False).replace('\\"', "\\u0022")


def _emit(text: str | None) -> str:
    return f"{{{{ {_go_string(text)} }}}}" if text else ""


def go_template(chat: ChatFormat, drop_start: bool) -> str:
    """The Go template for Ollama's chat API (``.Messages``), rendering what ``chat`` renders.

    A conversation that ends with an assistant message is continued (Ollama's prefill), so that
    message gets no end-of-turn text; otherwise the generation prompt follows the last message.
    All text is in string constants, so the line breaks between actions are layout and trimmed.
    ``drop_start`` leaves out the start text when it is the BOS token llama.cpp adds itself.
    """
    lines = ["{{- if .Messages }}"]
    if chat.start and not drop_start:
        lines.append(f"{{{{- {_go_string(chat.start)} }}}}")
    if chat.default_system is not None:
        block = chat.prefix["system"] + chat.default_system + chat.suffix["system"]
        lines.append(f'{{{{- if ne (index .Messages 0).Role "system" }}}}{_emit(block)}{{{{ end }}}}')
    lines.append("{{- range $i, $m := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    branch = "if"
    # Ollama may send a system message (SYSTEM in a Modelfile) to a template with no place for
    # one; like the Jinja template, the Go one then leaves it out.
    for role in ROLES if chat.system else ROLES[1:]:
        end = _emit(chat.suffix[role])
        if role == "assistant" and end:
            end = f"{{{{ if not $last }}}}{end}{{{{ end }}}}"
        lines.append(f'{{{{- {branch} eq .Role "{role}" }}}}{_emit(chat.prefix[role])}{{{{ .Content }}}}{end}')
        branch = "else if"
    lines.append("{{- end }}")
    if chat.generation_prompt:
        lines.append(f'{{{{- if and $last (ne .Role "assistant") }}}}{_emit(chat.generation_prompt)}{{{{ end }}}}')
    lines.append("{{- end }}")
    # Without .Messages (a bare prompt): one user turn.
    single = [_emit(None if drop_start else chat.start)]
    if chat.system:
        given = f"{{{{ if .System }}}}{_emit(chat.prefix['system'])}{{{{ .System }}}}{_emit(chat.suffix['system'])}"
        if chat.default_system is not None:
            given += f"{{{{ else }}}}{_emit(chat.prefix['system'] + chat.default_system + chat.suffix['system'])}"
        single.append(given + "{{ end }}")
    single.append(f"{_emit(chat.prefix['user'])}{{{{ .Prompt }}}}{_emit(chat.suffix['user'])}{_emit(chat.generation_prompt)}")
    lines.append("{{- else }}" + "".join(single))
    lines.append("{{- end }}")
    return "\n".join(lines)


@dataclass
class Modelfile:
    text: str
    #: Set when the chat template could not be translated: why, for the user.
    warning: str | None


def stop_tokens(chat: ChatFormat | None, tokenizer: Any) -> list[str]:
    """Special tokens that end the model's turn: the EOS token, those in the end-of-turn text, and
    those that open a user turn (a model that runs on would start one)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    stops: list[str] = []
    if tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    if chat is not None:
        for text in (chat.end_of_turn(), chat.prefix.get("user") or ""):
            stops += sorted((t for t in special if t and t in text), key=text.index)
    return list(dict.fromkeys(stops))


def build_modelfile(
    gguf_name: str, tokenizer: Any, chat: ChatFormat | None, adds_bos: bool, context_length: int, sampling: dict[str, float],
    adapter: str | None = None, base_written: bool = True,
) -> Modelfile:
    """The Modelfile text that ``ollama create NAME -f Modelfile`` reads, next to ``gguf_name``.

    With ``adapter`` (a LoRA GGUF next to it), ``gguf_name`` is the base model and the Modelfile adds
    ``ADAPTER``; when the base was not written (``base_written=False``) a comment says what FROM
    must name.
    """
    lines = ["# Written by lorafam export. Create the model with: ollama create NAME -f Modelfile"]
    if adapter is not None and not base_written:
        lines.append(
            f"# FROM must be the base model this adapter was trained on, as GGUF: {gguf_name} is the name `lorafam "
            "export RUN --format gguf-lora --base` gives it; point FROM at your copy (or an Ollama model of that base)."
        )
    lines.append(f"FROM ./{gguf_name}")
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter}")
    lines.append("")
    warning = None
    if chat is not None:
        bos = getattr(tokenizer, "bos_token", None)
        template = go_template(chat, drop_start=adds_bos and bool(bos) and chat.start == bos)
        lines.append("# Translated from the tokenizer's chat template (checked against it on probe conversations).")
        if chat.trims:
            lines.append("# The chat template strips whitespace around each message; Go templates cannot, so this one keeps it.")
        lines += [f'TEMPLATE """{template}"""', ""]
    elif getattr(tokenizer, "chat_template", None):
        warning = (
            "the chat template is not one lorafam can translate to Ollama's Go template syntax (it does more than "
            "wrap each message in fixed text per role); the Modelfile has no TEMPLATE, so Ollama picks one of its "
            "own from the chat template stored in the GGUF. Check it with `ollama show NAME --template`"
        )
        lines += [f"# No TEMPLATE: {warning}.", ""]
    else:
        warning = "the tokenizer has no chat template; the Modelfile has no TEMPLATE (plain completion)"
        lines += [f"# No TEMPLATE: {warning}.", ""]
    for stop in stop_tokens(chat, tokenizer):
        if '"' not in stop and "\n" not in stop:  # Modelfile values are quoted verbatim
            lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER num_ctx {context_length}")
    for key, value in sampling.items():
        lines.append(f"PARAMETER {key} {value:g}")
    return Modelfile(text="\n".join(lines) + "\n", warning=warning)
