"""build(recipe) -> Built: everything a run trains, made from the recipe, with nothing written.

The tokenizer, the prepared data, the model with the recipe's adapter injected, the precision and
the batch layout. ``Built.announce`` prints what a user sees before the first step;
``Built.run_info`` is run.json as the run starts.
"""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console

from lorafam.adapters import Variant
from lorafam.data import PreparedData, prepare_data
from lorafam.hardware import Precision, choose_precision
from lorafam.modeling import head_modules, load_model, load_tokenizer
from lorafam.quant import FOUR_BIT, check_sharded_storage, compute_dtype
from lorafam.recipe import ModelConfig, Recipe
from lorafam.run import RunInfo, adapt, pin_compute_dtype
from lorafam.tracking import check_installed
from lorafam.trainer import BatchLayout, layout_of


@dataclass
class Built:
    recipe: Recipe
    model_config: ModelConfig  # the recipe's, with a 4-bit compute dtype pinned on resume
    tokenizer: Any
    data: PreparedData
    model: torch.nn.Module
    variant: Variant
    precision: Precision
    layout: BatchLayout

    def announce(self, console: Console, device: str) -> None:
        """What the run is, before it starts: model, adapter, parameters, data, layout, precision."""
        spec, data, layout, variant = self.recipe, self.data, self.layout, self.variant
        trainable, total = variant.parameter_counts()
        experts = f" + {len(variant.expert_layers)} fused expert weights" if variant.expert_layers else ""
        console.print(f"model {spec.model.name} ({type(self.model).__name__}) · adapter {variant.name} · {len(variant.layers)} layers{experts} adapted")
        console.print(param_line(trainable, total))
        for line in expert_lines(variant) + variant.target_notes() + variant.notes():
            console.print(line, markup=False, soft_wrap=True)
        console.print(
            f"data: {data.format}, {len(data.train) if data.packing is None else data.packing.examples} train / "
            f"{len(data.eval) if data.eval is not None else 0} eval examples"
            + (f" ({report_line(data.report)})" if report_line(data.report) else "")
        )
        if data.packing is not None:
            console.print(data.packing.summary(spec.train.batch_size), soft_wrap=True)
        plural = "es" if layout.processes > 1 else ""
        console.print(
            f"{layout.processes} process{plural} on {device} · global batch {layout.global_batch} = batch_size "
            f"{layout.batch_size} x grad_accum {layout.grad_accum} x {layout.processes} process{plural} · lr "
            f"{spec.train.lr:g} (not rescaled)",
            soft_wrap=True,
        )
        mixed = self.precision.mixed_precision
        console.print(f"precision: {'fp32' if mixed == 'no' else mixed} ({self.precision.reason})", soft_wrap=True)

    def run_info(self) -> RunInfo:
        """run.json as the run starts."""
        trainable, total = self.variant.parameter_counts()
        data, cfg = self.data, self.model_config
        return RunInfo(
            label_names=data.label_names,
            trainable_params=trainable,
            total_params=total,
            data_report=data.report,
            packing=data.packing.as_dict(self.recipe.train.batch_size) if data.packing is not None else None,
            processes=self.layout.processes,
            global_batch=self.layout.global_batch,
            precision=self.precision.as_dict(),
            compute_dtype=compute_dtype(cfg) if cfg.quantization in FOUR_BIT else None,
            status="training",
            **({"start_from": str(Path(cfg.start_from).resolve())} if cfg.start_from is not None else {}),
        )


def build(recipe: Recipe, previous: RunInfo | None, processes: int, say: Callable[[str], None] = lambda line: None) -> Built:
    """Load and adapt what ``recipe`` names for a run on ``processes`` processes; ``previous`` is
    run.json of the run being resumed (a 4-bit base dequantizes as it did before the interruption,
    on whichever machine it resumes)."""
    check_installed(recipe.train.report_to)
    precision = choose_precision(recipe.train.mixed_precision)
    model_config = pin_compute_dtype(recipe, previous).model
    check_sharded_storage(model_config, precision.mixed_precision)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, recipe.model.task, recipe.train.seed)
    # Seeded before anything random (a fresh classification head, the adapter's init), so a run
    # is a function of its recipe, also when several run in one process.
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    model = load_model(model_config, data.label_names)
    variant = adapt(model, recipe, head_modules(model, recipe.model.task))
    # What the task needs from the model the run starts from (a preference objective's reference
    # log-probs), taken now: before the variant's prepare pass or any step changes the model.
    data = recipe.task.add_reference(data, variant.disabled, tokenizer, recipe.train.eval_batch_size or recipe.train.batch_size, say)
    return Built(recipe, model_config, tokenizer, data, model, variant, precision, layout_of(recipe, processes))


def expert_lines(variant: Variant) -> list[str]:
    """One line per adapted fused expert parameter name: how many, experts x out x in, parameters."""
    groups: dict[str, list[Any]] = {}
    for layer in variant.expert_layers.values():
        groups.setdefault(layer.parameter_name, []).append(layer)
    lines = []
    for name, layers in groups.items():
        first = layers[0]
        params = sum(p.numel() for layer in layers for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer."))
        lines.append(
            f"adapted experts: {name} in {len(layers)} layers ({first.num_experts} experts x {first.out_features} x "
            f"{first.in_features}, rank {first.r} per expert), {params:,} trainable params"
        )
    return lines


def param_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.4f}%)"


def report_line(report: dict[str, int]) -> str:
    """The data rows left out or cut, e.g. 'dropped empty 2, truncated 3'; empty when none."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items() if k not in ("read", "kept") and v)
