"""Intermediate checkpoints: ``checkpoints/step-NNNNNN/`` inside the run folder.

A checkpoint is written into a hidden temporary folder and renamed into place as a whole, so a run
killed during a save leaves either the previous checkpoints or a complete new one, never half.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lorafam.adapters import Variant
from lorafam.run import ADAPTER_WEIGHTS, CHECKPOINTS, save_tensors

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
VARIANT_STATE = "variant_state.safetensors"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    variant: Variant,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / ADAPTER_WEIGHTS, variant.adapter_state_dict())
    variant_state = variant.train_state()
    if variant_state:
        save_tensors(tmp / VARIANT_STATE, variant_state)
    # Optimizer state is nested dicts of tensors: torch.save it, and read it back only with
    # weights_only=True (no arbitrary pickle).
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final
