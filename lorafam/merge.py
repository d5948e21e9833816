"""Fold a run's adapter into its base weights and write a plain transformers model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lorafam.errors import LorafamError
from lorafam.modeling import head_modules, load_model, load_tokenizer
from lorafam.run import LoadedRun, adapt, load_adapter_weights, open_run


def load_adapted(run: LoadedRun) -> tuple[torch.nn.Module, "object"]:
    """The run's base model with its trained adapter loaded (not merged)."""
    model = load_model(run.recipe.model, run.label_names)
    variant = adapt(model, run.recipe, head_modules(model, run.recipe.model.task), run.info.get("prepare"))
    load_adapter_weights(variant, run.folder)
    return model, variant


def merge_run(run_dir: str | Path, output: str | Path) -> Path:
    run = open_run(run_dir)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorafamError(f"--output {output} exists and is not empty; choose a new folder")
    model, variant = load_adapted(run)
    merged = variant.merge()
    for p in merged.parameters():
        p.requires_grad_(False)
    tokenizer = load_tokenizer(run.recipe.model)
    # Write next to the destination and rename, so a killed merge never leaves a half model folder.
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    return output
