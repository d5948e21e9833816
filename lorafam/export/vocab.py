"""A transformers tokenizer as llama.cpp reads it: the ``tokenizer.*`` keys of a GGUF file.

llama.cpp does not run the tokenizer.json pipeline; it re-implements a few tokenizer families and
picks one from two keys, ``tokenizer.ggml.model`` and, for byte-level BPE, ``tokenizer.ggml.pre``
(the regex that splits text before the merges). Writing the wrong ``pre`` gives a model that loads
and tokenizes some text differently from how it was trained, so the family is read off the
tokenizer's own structure (its pre-tokenizer steps and their regex), and anything not recognised
is refused rather than guessed:

* ``gpt2``: byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen2): tokens in the byte alphabet, merges;
* ``llama``: sentencepiece-style BPE with byte fallback (Llama 2, Mistral 7B, TinyLlama): tokens
  with the "▁" space marker, ``<0xNN>`` byte tokens, scores that order the merges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import gguf

from lorafam.errors import LorafamError

# The splitting regexes of the byte-level BPE families llama.cpp implements, as tokenizer.json
# files spell them (Split pre-tokenizer, "Isolated" behaviour, followed by ByteLevel without regex).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: pre-tokenizer steps (as normalised by ``_step``) -> llama.cpp's ``tokenizer.ggml.pre`` name.
BYTE_LEVEL_FAMILIES: dict[tuple[tuple[Any, ...], ...], str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
SUPPORTED_TOKENIZERS = (
    "byte-level BPE with the GPT-2, SmolLM, Llama 3 or Qwen2 pre-tokenizer, "
    "or sentencepiece-style BPE with byte fallback (Llama 2, Mistral)"
)

SPACE_MARK = "\u2581"  # sentencepiece's visible space, "▁"


@dataclass
class Vocab:
    """Everything llama.cpp needs to tokenize exactly as the transformers tokenizer does."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None = None  # sentencepiece-style only: higher merges first
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None

    def write(self, writer: gguf.GGUFWriter, eot_id: int | None = None) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        if eot_id is not None:
            writer.add_eot_token_id(eot_id)
        # llama.cpp's defaults differ per tokenizer family: always state both.
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def read_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` for a model with ``vocab_size`` embedding rows.

    Ids the tokenizer does not use (models pad their embedding, e.g. Qwen2) become unused
    ``[PADn]`` tokens, as llama.cpp's own converter writes them: its vocabulary must have one entry
    per embedding row.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorafamError(
            f"tokenizer: {type(tokenizer).__name__} has no tokenizer.json (a 'fast' tokenizer); GGUF export "
            "reads the vocabulary from it; save the model with a fast tokenizer"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LorafamError(
            f"tokenizer: a {model.get('type')} tokenizer cannot be exported to GGUF by lorafam; supported: {SUPPORTED_TOKENIZERS}"
        )
    pre_steps = _steps(spec.get("pre_tokenizer"))
    byte_level = any(step.get("type") == "ByteLevel" for step in pre_steps)
    if byte_level:
        kind, pre = "gpt2", _byte_level_pre(spec, pre_steps)
    elif model.get("byte_fallback") and _marks_spaces(spec):
        kind, pre = "llama", None
    else:
        raise LorafamError(f"tokenizer: this BPE tokenizer's pre-processing is not one llama.cpp implements; supported: {SUPPORTED_TOKENIZERS}")

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise LorafamError(
            f"tokenizer: it has token id {max(by_id)} but the model's embedding has only {vocab_size} rows; "
            "export the tokenizer the model was trained with"
        )
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    unk_id = tokenizer.unk_token_id
    # The tokenizer's own special tokens are control tokens even where a vocabulary lists them as
    # ordinary entries (GPT-2's <|endoftext|> in some files): llama.cpp must never print them.
    special = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")} - {None}
    # tokenizer.json spells a merge "a b" (older files) or ["a", "b"]; GGUF files spell it "a b".
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    merges = [" ".join(pair) for pair in pairs]

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif kind == "llama" and i == unk_id:  # sentencepiece's <unk> has a type of its own
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added or i in special:
            tokens.append(token)
            # Whole-match tokens: CONTROL ones are rendered only on request, USER_DEFINED always.
            types.append(gguf.TokenType.CONTROL if i in special or added[i].special else gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and _is_byte_token(token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)

    vocab = Vocab(model=kind, pre=pre, tokens=tokens, token_types=[int(t) for t in types], merges=merges)
    if kind == "llama":
        vocab.scores = _merge_scores(tokens, types, pairs)
        vocab.add_space_prefix = True  # _marks_spaces checked that the tokenizer prepends "▁"
    for kind_name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind_name}_token_id", None)
        if token_id is not None:
            vocab.special_ids[kind_name] = int(token_id)
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        vocab.chat_template = [{"name": name, "template": text} for name, text in template.items()]
    elif template:
        vocab.chat_template = template
    return vocab


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers", node.get("normalizers", [])) for s in _steps(child)]
    return [node]


def _step(step: dict[str, Any]) -> tuple[Any, ...]:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return ("ByteLevel+prefix-space",)  # llama.cpp never adds a prefix space to BPE text
        return ("ByteLevel", bool(step.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(step.get("individual_digits")))
    if kind == "Split":
        pattern = step.get("pattern") or {}
        if step.get("behavior") != "Isolated" or step.get("invert"):
            return ("Split", None)
        return ("Split", pattern.get("Regex"))
    return (kind,)


def _byte_level_pre(spec: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    normalizers = [n.get("type") for n in _steps(spec.get("normalizer"))]
    # Qwen2 normalises to NFC; llama.cpp does not, which only matters for text that is not NFC already.
    if any(kind != "NFC" for kind in normalizers):
        raise LorafamError(
            f"tokenizer: its normalizer ({', '.join(normalizers)}) has no llama.cpp equivalent; supported: {SUPPORTED_TOKENIZERS}"
        )
    signature = tuple(_step(s) for s in steps)
    pre = BYTE_LEVEL_FAMILIES.get(signature)
    if pre is None:
        described = " + ".join(str(s[0]) for s in signature)
        raise LorafamError(
            f"tokenizer: its byte-level BPE pre-tokenizer ({described}) is not one llama.cpp implements; "
            f"supported: {SUPPORTED_TOKENIZERS}"
        )
    return pre


def _marks_spaces(spec: dict[str, Any]) -> bool:
    """True for sentencepiece-style BPE: spaces become "▁" and text starts with one."""
    pre = _steps(spec.get("pre_tokenizer"))
    if len(pre) == 1 and pre[0].get("type") == "Metaspace":
        step = pre[0]
        return step.get("replacement") == SPACE_MARK and step.get("prepend_scheme", "always") in ("first", "always")
    normalizers = _steps(spec.get("normalizer"))
    prepends = any(n.get("type") == "Prepend" and n.get("prepend") == SPACE_MARK for n in normalizers)
    replaces = any(
        n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " and n.get("content") == SPACE_MARK
        for n in normalizers
    )
    return not pre and prepends and replaces


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _merge_scores(tokens: list[str], types: list[int], merges: list[tuple[str, ...]]) -> list[float]:
    """Scores that make llama.cpp's sentencepiece merger follow the tokenizer's merge order.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token; the
    tokenizer merges the pair that comes first in its merge list. Scoring each token by minus the
    rank of the first merge that produces it makes both pick the same pair. Tokens no merge
    produces get the lowest score, so llama.cpp builds them last (the tokenizer never does).
    """
    rank: dict[str, int] = {}
    for i, pair in enumerate(merges):
        rank.setdefault("".join(pair), i)
    lowest = -float(len(merges) + 1)
    scores = []
    for token, kind in zip(tokens, types):
        if kind != gguf.TokenType.NORMAL:
            scores.append(0.0)
        else:
            scores.append(-float(rank[token]) if token in rank else lowest)
    return scores


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds BOS / EOS, measured on the tokenizer itself (no config flag is
    reliable across tokenizer classes)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) - len(plain)
    if extra <= 0:
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and with_special[0] == bos and with_special[: len(plain) + 1][1:] == plain
    add_eos = eos is not None and with_special[-1] == eos and (add_bos or with_special[: len(plain)] == plain)
    return add_bos, add_eos
