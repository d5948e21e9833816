"""Raw rows from a packaged alias, a local data file or folder, or a hub dataset."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import datasets

from lorafam.data.packaged import PACKAGED_DATASETS
from lorafam.errors import LorafamError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def load_source(source: str, key: str = "data.train") -> datasets.Dataset:
    """The raw rows of a packaged alias, a local data file or folder, or a hub dataset (``name[:split]``).

    ``key`` names the recipe key in error messages.
    """
    if source in PACKAGED_DATASETS:
        return PACKAGED_DATASETS[source]()
    path = Path(os.path.expanduser(source))
    if path.exists() or looks_like_local_path(source):
        return _load_local(path, source, key)
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split: all the same to the user
        raise LorafamError(
            f"{key}: could not load hub dataset {name!r} (split {split or 'train'!r}): {_first_line(e)}; "
            f"packaged aliases that work offline: {', '.join(PACKAGED_DATASETS)}"
        ) from None


def _file_builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def looks_like_local_path(source: str) -> bool:
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
