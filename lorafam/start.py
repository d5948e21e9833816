"""``model.start_from``: a run that starts from another run's result (SFT, then DPO).

The base of such a run is the finished run's model with its adapter folded in, made in memory
wherever the recipe's model is loaded (training, and the merge, eval, chat and export of the new
run), so the new run's folder stays adapter-sized and needs only the run folder it names. The
recipe's ``model.name`` must be the base that run trained on (its tokenizer is the one used).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorafam.errors import LorafamError

if TYPE_CHECKING:
    from lorafam.recipe import ModelConfig


def start_model(cfg: "ModelConfig", label_names: list[str] | None = None) -> Any:
    """The finished run at ``cfg.start_from``, merged, in ``cfg.dtype`` and eval mode."""
    from lorafam.merge import merged_model
    from lorafam.run import open_run
    from lorafam.tasks import get_task

    run = open_run(Path(cfg.start_from))
    started = run.recipe.model
    if started.name != cfg.name:
        raise LorafamError(
            f"model.start_from: {cfg.start_from} trained on {started.name}, not on model.name {cfg.name}; "
            f"set model.name: {started.name}"
        )
    if get_task(started.task).auto_class_name != get_task(cfg.task).auto_class_name:
        raise LorafamError(
            f"model.start_from: {cfg.start_from} trained a {started.task} model, which model.task {cfg.task} cannot start from"
        )
    model = merged_model(run).to(getattr(torch, cfg.dtype))
    return model.eval()
