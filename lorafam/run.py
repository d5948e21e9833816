"""The run folder: what `lorafam train` writes and what `merge`, `eval` and `inspect` read back.

    output_dir/
      adapter_model.safetensors   PEFT key layout, so peft.PeftModel.from_pretrained reads it
      adapter_config.json         PEFT's LoraConfig fields (plus extras for methods PEFT lacks)
      recipe.yaml                 the resolved recipe: merge/eval need nothing but this folder
      run.json                    label names, parameter counts, data report, final metrics
      metrics.jsonl               one JSON object per logged step / eval
      tokenizer files
      checkpoints/step-NNNNNN/    intermediate checkpoints (see lorafam.checkpoint)

Every file is written under a temporary name, fsynced and renamed into place, so a run killed
mid-write never leaves a truncated file under a real name.

``RunFolder`` owns a training run's folder: whether a run may start there (fresh, resumed or
overwritten), which checkpoint it resumes, and every write; off the main process its writes are
no-ops, so it is the one place that asks which process this is. ``RunInfo`` is run.json, typed;
``open_run`` reads a finished run for merge, eval, export, chat and analyze.
"""

from __future__ import annotations

import json
import os
import tempfile
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
import yaml
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafam.adapters import Variant, build_variant
from lorafam.errors import LorafamError
from lorafam.recipe import ModelConfig, Recipe, load_recipe

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
PREPARE_STATE = "prepare"  # what a variant's prepare phase saved to go on after a kill (GLoRA's search)


class RunInfo(BaseModel):
    """run.json: what a run decided and measured. Written only through ``RunFolder.write_info``;
    fields left unset are not written (a run that never resumed has no ``resumed_from``)."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    label_names: list[str] | None = None
    trainable_params: int = 0
    total_params: int = 0
    data_report: dict[str, int] = {}
    packing: dict[str, Any] | None = None
    processes: int = 1
    global_batch: int = 0
    precision: dict[str, Any] = {}
    # model.compute_dtype: auto as resolved on this machine (a 4-bit base dequantizes to it);
    # merge, export and eval of the run use it wherever they run (pin_compute_dtype).
    compute_dtype: str | None = None
    status: str = "training"  # training, complete, interrupted, diverged, stopped
    resumed_from: list[int] = []  # the checkpoint steps each resume started from
    prepare: dict[str, Any] | None = None  # what the variant's prepare phase decided (Variant.restore)
    stopped_at_step: int | None = None
    steps: int | None = None
    seconds: float | None = None
    eval_before: dict[str, Any] | None = None  # the task's metrics (lorafam.tasks)
    eval_after: dict[str, Any] | None = None
    final_train_loss: float | None = None
    sample_before: str | None = None
    sample_after: str | None = None
    artifacts: list[str] = []
    report: list[Any] = []  # the variant's closing report (Variant.report)
    skipped_steps: int = 0
    peak_memory: dict[str, int] = {}
    start_from: str | None = None  # model.start_from, resolved: the run folder this run's base came from

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


# --------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename tmp to ``path``: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power cut only once the folder is synced


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"}))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle); a truncated or corrupt file is a clear error."""
    if not path.is_file():
        raise LorafamError(f"{path} is missing; is this a finished lorafam run folder?")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LorafamError(f"{path} is corrupt or truncated ({e}); re-run training or use a checkpoint") from None


# --------------------------------------------------------------------------------------------------
# Saving


def save_adapter(folder: Path, variant: Variant, recipe: Recipe, writes: bool = True) -> None:
    """adapter_model.safetensors + adapter_config.json in PEFT's format.

    Under several processes every one calls this (sharded weights are gathered, a collective) and
    only the one with ``writes`` writes.
    """
    tensors = variant.adapter_state_dict()
    if not writes:
        return
    save_tensors(folder / ADAPTER_WEIGHTS, tensors)
    config = variant.peft_config(recipe.model.name, recipe.task.peft_task_type)
    write_json(folder / ADAPTER_CONFIG, config)


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and (path / RECIPE_FILE).is_file()


def check_output_dir(recipe: Recipe, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to mix two different runs in one folder (the user would lose the old one).

    A resumed run must have the saved run's recipe exactly (``train.resume`` aside: it says how
    to start, not what to train).
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise LorafamError(f"output_dir {out} is a file; choose a folder path with --set output_dir=...")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        saved = out / RECIPE_FILE
        if not saved.is_file():
            raise LorafamError(
                f"output_dir {out} is not empty and holds no lorafam run; choose another with "
                "--set output_dir=... or pass --overwrite"
            )
        try:
            saved_raw = yaml.safe_load(saved.read_text())
        except yaml.YAMLError:
            saved_raw = None
        difference = _first_difference(_comparable(saved_raw), _comparable(recipe.model_dump(mode="json")))
        if difference is not None:
            fix = (
                "--resume needs the recipe the run started with; choose another output_dir with --set output_dir=..."
                if resume
                else "choose another with --set output_dir=... or pass --overwrite to replace it"
            )
            raise LorafamError(f"output_dir {out} holds a different run (its recipe.yaml differs at {difference}); {fix}")
    return out


def _comparable(raw: Any) -> Any:
    if isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = {**raw, "train": {k: v for k, v in raw["train"].items() if k != "resume"}}
    return raw


def _first_difference(saved: Any, current: Any, path: str = "") -> str | None:
    """The first key path where two recipes differ, with both values; None when equal."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            found = _first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    if saved == current:
        return None
    return f"{path or 'recipe'}: saved {saved!r}, now {current!r}"


# --------------------------------------------------------------------------------------------------
# A training run's folder


class RunFolder:
    """The output folder of one training run, and every write into it.

    ``open`` checks that the run may start there and finds what it resumes; nothing is written
    until ``start``. Every process holds one; only the one with ``writes`` (the main process)
    touches the disk.
    """

    def __init__(self, path: Path, writes: bool, previous: RunInfo | None = None, checkpoint: Any = None,
                 phases: dict[str, Any] | None = None):
        self.path = path
        self.writes = writes
        self.previous = previous  # run.json of the run being resumed (None: a fresh run)
        self.checkpoint = checkpoint  # lorafam.checkpoint.Checkpoint it resumes from, or None
        self.phases = phases or {}  # a preparatory pass's name -> the Checkpoint it goes on from

    @classmethod
    def open(cls, recipe: Recipe, overwrite: bool, resume: bool, writes: bool, warn: Callable[[str], None],
             processes: int = 1) -> "RunFolder":
        """The recipe's output_dir, checked (see ``check_output_dir``); under ``resume`` with the run
        it holds and its newest complete checkpoint, which must have been written on ``processes``
        processes (refused before anything is written)."""
        from lorafam.checkpoint import find_latest_checkpoint

        path = check_output_dir(recipe, overwrite, resume)
        if not resume:
            return cls(path, writes)
        previous = read_run_info(path)
        checkpoint = None if previous.status == "complete" and (path / ADAPTER_WEIGHTS).is_file() else find_latest_checkpoint(path, warn)
        # Killed before the main run's first checkpoint: the preparatory passes' own checkpoints.
        phases = {} if checkpoint is not None or not (path / PREPARE_STATE).is_dir() else {
            p.name: found for p in sorted((path / PREPARE_STATE).iterdir()) if p.is_dir() and (found := find_latest_checkpoint(p, warn))
        }
        for found in [checkpoint, *phases.values()]:
            if found is not None and (written := found.state.get("processes", 1)) != processes:
                raise LorafamError(
                    f"checkpoint {found.path} was written on {written} process(es); this run has {processes}: "
                    f"resume it on {written} (accelerate launch --num_processes {written}), or start over with --overwrite"
                )
        return cls(path, writes, previous, checkpoint, phases)

    def phase(self, name: str) -> "RunFolder":
        """Where the preparatory pass ``name`` keeps its checkpoints: prepare/<name>/ (only while the
        run has none of its own; a resumed run finds them in ``phases``)."""
        return RunFolder(self.path / PREPARE_STATE / name, self.writes)

    @property
    def finished(self) -> bool:
        """A resumed run that already completed."""
        return self.previous is not None and self.previous.status == "complete" and (self.path / ADAPTER_WEIGHTS).is_file()

    def start(self, recipe: Recipe, tokenizer: Any, info: RunInfo, overwrite: bool) -> None:
        """Clear what a fresh run replaces (or what a resumed one will redo), then write recipe.yaml,
        the tokenizer and run.json (a resumed run's with the checkpoint it resumed from)."""
        from lorafam.checkpoint import discard_after

        if self.checkpoint is not None:
            info.resumed_from = [*self.previous.resumed_from, self.checkpoint.step]
        if not self.writes:
            return
        if self.path.exists() and self.checkpoint is None:
            if overwrite:
                shutil.rmtree(self.path)
            elif self.previous is None:  # a fresh run of the same recipe: clear the old run's outputs
                for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, METRICS):
                    (self.path / name).unlink(missing_ok=True)
                for folder in (CHECKPOINTS, PREPARE_STATE):
                    shutil.rmtree(self.path / folder, ignore_errors=True)
            # Resumed before its first checkpoint: what the prepare phase saved, and its metrics rows,
            # stay for it to go on from (the passes drop the rows they log again).
        if self.checkpoint is not None:
            discard_after(self.path, self.checkpoint.step)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / RECIPE_FILE, recipe.to_yaml())
        self.write_info(info)
        tokenizer.save_pretrained(str(self.path))

    def write_info(self, info: RunInfo) -> None:
        if self.writes:
            write_json(self.path / RUN_INFO, info.as_json())

    def save_adapter(self, variant: Variant, recipe: Recipe) -> None:
        """Every process calls this (sharded weights are gathered, a collective); one writes."""
        save_adapter(self.path, variant, recipe, writes=self.writes)

    def write_artifacts(self, variant: Variant) -> list[Path]:
        return variant.write_artifacts(self.path) if self.writes else []

    def write_card(self, recipe: Recipe, info: RunInfo) -> None:
        """README.md model card, from the final run.json."""
        from lorafam.card import write_run_card

        if self.writes:
            write_run_card(self.path, recipe, info)

    def save_checkpoint(self, step: int, variant: Variant, optimizer: Any, scheduler: Any, state: dict[str, Any],
                        keep_last: int | None, model: torch.nn.Module) -> Path:
        """Every process calls this (sharded state is gathered, a collective); one writes."""
        from lorafam.checkpoint import save_checkpoint

        return save_checkpoint(self.path, step, variant, optimizer, scheduler, state, keep_last, model=model, writes=self.writes)

    def save_state(self, name: str, state: dict[str, Any]) -> None:
        """A prepare phase's progress (JSON) under prepare/, read back by ``load_state`` on resume."""
        if self.writes:
            write_json(self.path / PREPARE_STATE / f"{name}.json", state)

    def load_state(self, name: str) -> dict[str, Any] | None:
        path = self.path / PREPARE_STATE / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_prepared_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.writes:
            save_tensors(self.path / PREPARE_STATE / f"{name}.safetensors", tensors)

    def load_prepared_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.path / PREPARE_STATE / f"{name}.safetensors"
        return load_tensors(path) if path.is_file() else None

    @contextmanager
    def metrics(self, on_row: Callable[[dict[str, Any]], None] | None = None,
                kept: Callable[[dict[str, Any]], bool] | None = None) -> Iterator["MetricsLog"]:
        """metrics.jsonl opened for appending (closed on every path out); every row also goes to
        ``on_row``. ``kept``: which rows already there stay (a resumed pass drops those it logs again)."""
        if not self.writes:
            yield MetricsLog(None, on_row)
            return
        if kept is not None:
            filter_metrics(self.path / METRICS, kept)
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / METRICS).open("a") as handle:
            yield MetricsLog(handle, on_row)


class MetricsLog:
    def __init__(self, handle: Any, on_row: Callable[[dict[str, Any]], None] | None):
        self.handle = handle
        self.on_row = on_row

    def write(self, row: dict[str, Any]) -> None:
        if self.handle is not None:
            write_metrics(self.handle, row)
        if self.on_row is not None:
            self.on_row(row)


def write_metrics(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def filter_metrics(path: Path, kept: Callable[[dict[str, Any]], bool]) -> None:
    """Keep the rows ``kept`` says to (and drop a half-written last line)."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a kill mid-write
        if kept(row):
            lines.append(line + "\n")
    write_text(path, "".join(lines))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows (a half-written last line skipped)."""
    path = folder / METRICS
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


# --------------------------------------------------------------------------------------------------
# Loading a finished run


@dataclass
class LoadedRun:
    recipe: Recipe
    info: RunInfo
    folder: Path

    @property
    def label_names(self) -> list[str] | None:
        return self.info.label_names


def open_run(folder: str | Path) -> LoadedRun:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafamError(f"run folder {folder} does not exist; pass the output_dir of a lorafam train run")
    if not (folder / RECIPE_FILE).is_file():
        raise LorafamError(f"{folder} is not a lorafam run folder (no {RECIPE_FILE}); pass a train output_dir")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise LorafamError(
            f"{folder} has no {ADAPTER_WEIGHTS}: the run did not finish; resume it with "
            f"`lorafam train {folder / RECIPE_FILE} --resume`"
        )
    recipe = load_recipe(folder / RECIPE_FILE)
    info_path = folder / RUN_INFO
    try:
        info = RunInfo.model_validate_json(info_path.read_text()) if info_path.is_file() else RunInfo()
    except ValueError:
        raise LorafamError(f"{info_path} is corrupt; re-run training") from None
    return LoadedRun(recipe=pin_compute_dtype(recipe, info), info=info, folder=folder)


def pin_compute_dtype(recipe: Recipe, info: RunInfo | None) -> Recipe:
    """The recipe with ``model.compute_dtype: auto`` replaced by the dtype training resolved it to.

    ``auto`` depends on the machine (bf16 where it is native). A run trained in bf16 compute and
    merged, exported or evaluated on a machine without native bf16 must still dequantize its 4-bit
    base the way it was trained, and its cards must say so: run.json records the resolved dtype.
    """
    resolved = info.compute_dtype if info is not None else None
    if recipe.model.compute_dtype != "auto" or resolved not in get_args(ModelConfig.model_fields["compute_dtype"].annotation):
        return recipe
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"compute_dtype": resolved})})


def adapt(model: torch.nn.Module, recipe: Recipe, heads: list[str], prepared: dict[str, Any] | None = None) -> Variant:
    """Inject the recipe's adapter into ``model`` (in place) and return the bound variant.

    ``prepared`` is what the variant's ``prepare`` recorded in a finished run's run.json; a loaded
    run passes it so variants that restructure themselves before training come back the same.
    """
    variant = build_variant(recipe.adapter).apply(model, heads)
    if prepared:
        variant.restore(prepared)
    return variant


def load_adapter_weights(variant: Variant, folder: Path) -> None:
    variant.load_adapter_state_dict(load_tensors(folder / ADAPTER_WEIGHTS))


def read_run_info(folder: Path) -> RunInfo:
    """run.json of a (possibly unfinished) run folder; empty when absent or unreadable."""
    try:
        return RunInfo.model_validate_json((folder / RUN_INFO).read_text())
    except (OSError, ValueError):
        return RunInfo()
