"""Intermediate checkpoints (``checkpoints/step-NNNNNN/`` in the run folder) and resuming from them.

    step-000040/
      adapter_model.safetensors   the adapter at that step, in the final adapter's layout
      variant_state.safetensors   variant state beyond the weights (AdaLoRA's scores), when any
      rng_state.safetensors       torch's CPU (and CUDA) generator states
      optimizer.pt                optimizer + scheduler state dicts: tensors in plain containers,
                                  read back with torch.load(weights_only=True), never full pickle
      trainer_state.json          step, data position, Python/NumPy RNG, what the summary needs
      complete.json               written last: size and sha256 of every file above

A checkpoint is written into a hidden ``.step-NNNNNN.tmp`` folder, each file fsynced, then renamed
into place as a whole. A folder whose complete.json is missing or does not match its files is an
interrupted or damaged write: resuming warns, skips it and takes the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lorafam.adapters import Variant
from lorafam.distributed import is_sharded
from lorafam.errors import LorafamError
from lorafam.run import ADAPTER_WEIGHTS, CHECKPOINTS, fsync_dir, load_tensors, save_tensors

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
VARIANT_STATE = "variant_state.safetensors"
RNG_STATE = "rng_state.safetensors"
MANIFEST = "complete.json"

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Checkpoint:
    """A verified checkpoint folder and its trainer_state.json."""

    path: Path
    step: int
    state: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    run_dir: Path,
    step: int,
    variant: Variant,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last: int | None = None,
    model: torch.nn.Module | None = None,
    writes: bool = True,
) -> Path:
    """Write the full training state after ``step``; keep the newest ``keep_last`` checkpoints.

    Under several processes every one of them calls this (sharded parameters and optimizer state
    are gathered whole, a collective; ``model`` is the module the optimizer's parameters belong
    to); only the one with ``writes`` writes the folder.
    """
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    adapter = variant.adapter_state_dict()
    variant_state = variant.train_state()
    optimizer_state = _optimizer_state(optimizer, model)
    if not writes:
        return final
    tmp = root / f".{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing this same step
    tmp.mkdir(parents=True)
    save_tensors(tmp / ADAPTER_WEIGHTS, adapter)
    if variant_state:
        save_tensors(tmp / VARIANT_STATE, variant_state)
    save_tensors(tmp / RNG_STATE, _torch_rng_state())
    # LambdaLR's state holds only numbers and lists (its lambda is not saved), so both state dicts
    # load under weights_only=True (tests/test_resume.py checks it for AdamW + every schedule).
    _write_fsynced(tmp / OPTIMIZER_STATE, lambda f: torch.save(
        {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, f
    ))
    trainer_state = {"step": step, **state, "rng": _python_rng_state()}
    _write_fsynced(tmp / TRAINER_STATE, lambda f: f.write(json.dumps(trainer_state, indent=2).encode()))
    # The manifest is written last: its presence (and matching hashes) is what "complete" means.
    manifest = {"step": step, "files": {p.name: _describe(p) for p in sorted(tmp.iterdir())}}
    _write_fsynced(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)  # a damaged one from an earlier attempt at this step
    os.replace(tmp, final)
    fsync_dir(root)
    if keep_last is not None:
        prune(root, step, keep_last)
    return final


def prune(root: Path, newest: int, keep_last: int) -> None:
    """Remove all but the ``keep_last`` newest checkpoints up to step ``newest``, and stale temp folders.

    Folders past ``newest`` (damaged ones a resumed run skipped) are left: the run rewrites them
    when it gets there, and never trusts them before.
    """
    steps = sorted((s for s in _checkpoint_steps(root) if s <= newest), reverse=True)
    for step in steps[keep_last:]:
        shutil.rmtree(root / checkpoint_name(step), ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def _write_fsynced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Finding one to resume from


def _checkpoint_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]


def find_latest_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are reported through ``warn`` and skipped.

    Hidden ``.step-*.tmp`` folders (writes that never finished) are never considered.
    """
    root = run_dir / CHECKPOINTS
    for step in sorted(_checkpoint_steps(root), reverse=True):
        path = root / checkpoint_name(step)
        try:
            return Checkpoint(path=path, step=step, state=verify_checkpoint(path))
        except LorafamError as e:
            warn(f"warning: skipping checkpoint {path}: {e}")
    return None


def discard_after(run_dir: Path, step: int) -> list[Path]:
    """Remove checkpoint folders past ``step`` (the damaged ones a resume skipped) and temp folders.

    The resumed run takes those steps again and writes them anew.
    """
    root = run_dir / CHECKPOINTS
    gone = [root / checkpoint_name(s) for s in sorted(_checkpoint_steps(root)) if s > step]
    gone += sorted(root.glob(".step-*.tmp"))
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest against every file and the safetensors headers; return trainer_state."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise LorafamError(f"no {MANIFEST} (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LorafamError(f"{MANIFEST} is unreadable") from None
    for required in (ADAPTER_WEIGHTS, OPTIMIZER_STATE, TRAINER_STATE, RNG_STATE):
        if required not in files:
            raise LorafamError(f"{MANIFEST} lists no {required}")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise LorafamError(f"{name} is missing")
        if file.stat().st_size != expected.get("bytes") or _sha256(file) != expected.get("sha256"):
            raise LorafamError(f"{name} does not match its checksum in {MANIFEST} (truncated or corrupt)")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors raises several types for a bad header
                raise LorafamError(f"{name} is not a valid safetensors file ({e})") from None
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except json.JSONDecodeError:
        raise LorafamError(f"{TRAINER_STATE} is unreadable") from None
    if state.get("step") != manifest.get("step"):
        raise LorafamError(f"{TRAINER_STATE} and {MANIFEST} disagree on the step")
    return state


# --------------------------------------------------------------------------------------------------
# Loading


def _sharded(optimizer: Any) -> bool:
    return any(is_sharded(p) for group in optimizer.param_groups for p in group["params"])


def _optimizer_state(optimizer: Any, model: torch.nn.Module | None) -> dict[str, Any]:
    """The optimizer's state dict; with sharded (FSDP2) parameters, gathered whole (keyed by
    parameter name, as torch.distributed.checkpoint writes it)."""
    if not _sharded(optimizer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def _load_optimizer_state(optimizer: Any, model: torch.nn.Module | None, state: dict[str, Any]) -> None:
    if not _sharded(optimizer):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)  # every process read the same whole file
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=options)


def load_checkpoint(
    checkpoint: Checkpoint, variant: Variant, optimizer: Any, scheduler: Any, model: torch.nn.Module | None = None
) -> None:
    """Put the adapter, the variant's state, the optimizer and the scheduler back as they were."""
    path = checkpoint.path
    variant.load_adapter_state_dict(load_tensors(path / ADAPTER_WEIGHTS))
    variant_state = path / VARIANT_STATE
    variant.load_train_state(load_tensors(variant_state) if variant_state.is_file() else {})
    try:
        saved = torch.load(path / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LorafamError(
            f"{path / OPTIMIZER_STATE} holds objects other than tensors and plain containers; refusing "
            "to unpickle it (delete this checkpoint to resume from the one before)"
        ) from None
    try:
        _load_optimizer_state(optimizer, model, saved["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise LorafamError(f"{path / OPTIMIZER_STATE} does not fit this run's optimizer ({e})") from None
    scheduler.load_state_dict(saved["scheduler"])


def restore_rng(checkpoint: Checkpoint) -> None:
    """Every generator training draws from (dropout, shuffles) as it was after the checkpoint's step."""
    tensors = load_tensors(checkpoint.path / RNG_STATE)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    rng = checkpoint.state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _torch_rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
