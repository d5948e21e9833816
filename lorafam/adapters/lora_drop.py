"""LoRA-drop (Zhou et al., 2024, arXiv:2402.07721): keep LoRA where its output matters, share it elsewhere.

Before the main run (``prepare``):

1. Sample a fraction ``sample_ratio`` of the training data (stratified by class for classification,
   as in the paper), seeded, and train plain LoRA on every target layer on it for ``sample_steps``.
2. Importance of layer i: g_i = sum over the sample's real tokens of ||s B_i A_i x_i||^2, the squared
   norm of the adapter path's output, from real forward passes (eval mode, no grad) with hooks on
   each B; normalised so the g_i sum to 1.
3. Keep layers in descending importance until the kept g_i add up to ``threshold``. Every other
   layer uses one LoRA pair shared by all dropped layers of its (out, in) shape: the same
   ``nn.Linear`` objects, so one tensor, one gradient, one optimizer state.
4. Main run: all pairs start fresh (A as in LoRA, B zero), so the model again starts as the base. The
   sample run only measures importance; the paper then fine-tunes the pruned structure on the full
   data.

Kept layers save under PEFT's per-layer keys; each shared pair once, under
``base_model.model.lora_drop_shared.<out>x<in>.lora_{A,B}.weight``. ``restore`` rebuilds the
sharing from run.json before the weights load. Merging is LoRA's: W + s B A with each layer's own or
shared pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from lorafam.adapters.base import grid_positions
from lorafam.adapters.lora import LoRA, LoRAConfig, LoRALayer
from lorafam.distributed import all_reduce_sum, rank, world_size
from lorafam.errors import LorafamError

# Where the shared pairs live in the adapted model (Variant.set_shared_module).
SHARED_ATTR = "lora_drop_shared"
SAMPLE_PHASE = "lora-drop-sample"
IMPORTANCE_BATCH = 8


class LoRADropConfig(LoRAConfig):
    variant: Literal["lora_drop"] = "lora_drop"
    # In the schema, so the generated recipe reference lists only what loads.
    init: Literal["default", "gaussian"] = Field(
        "default",
        description="default: A Kaiming-uniform, B zero (the paper's reference code); gaussian: A normal with "
        "std 1/r, B zero. No pissa: it rewrites W from each layer's own SVD, which a pair shared across layers cannot hold.",
    )
    sample_ratio: float = Field(
        0.1, description="Fraction of the training data the importance is measured on (paper: 0.1)."
    )
    threshold: float = Field(
        0.9, description="Kept layers cover this share of the total importance; the rest share (paper: 0.9)."
    )
    sample_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps of the plain-LoRA run on the sample. Default: one pass over the "
        "sample in the recipe's global batches (batch_size x grad_accum x processes; the last one partial).",
    )

    @field_validator("sample_ratio", "threshold")
    @classmethod
    def _in_unit_interval(cls, value: float, info: Any) -> float:
        if not 0 < value <= 1:
            meaning, paper = {
                "sample_ratio": ("the fraction of the training data sampled", 0.1),
                "threshold": ("the share of total importance the kept layers cover", 0.9),
            }[info.field_name]
            raise ValueError(f"must be in (0, 1]: it is {meaning} (paper: {paper})")
        return value


class SharedLoRA(nn.Module):
    """One A, B pair used by every dropped layer of one (out, in) shape."""

    def __init__(self, in_features: int, out_features: int, r: int, device: torch.device):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)


class LoRADropLayer(LoRALayer):
    """A LoRA layer whose pair is its own or a shared one (then it owns no adapter tensor)."""

    # A plain attribute, not a submodule: the pair is registered once, on the model root.
    shared: tuple[SharedLoRA, ...] = ()

    def pair(self) -> tuple[nn.Linear, nn.Linear]:
        owner = self.shared[0] if self.shared else self
        return owner.lora_A, owner.lora_B

    def use_shared(self, shared: SharedLoRA) -> None:
        del self.lora_A, self.lora_B
        self.shared = (shared,)


def shape_key(layer: nn.Module) -> str:
    return f"{layer.out_features}x{layer.in_features}"


def select_layers(importance: dict[str, float], threshold: float) -> list[str]:
    """The most important layers, in descending order, until their importance adds up to ``threshold``."""
    kept, covered = [], 0.0
    for path in sorted(importance, key=lambda p: -importance[p]):
        if covered >= threshold - 1e-9:  # tolerance: importances summing to 1 in floats may give 0.9999...
            break
        kept.append(path)
        covered += importance[path]
    return kept


def sample_indices(train_data: Any, ratio: float, seed: int) -> list[int]:
    """Seeded sample of ``ratio`` of the rows; per class when rows carry one class label (the paper's
    stratified sampling), uniform otherwise (causal LM)."""
    generator = torch.Generator().manual_seed(seed)
    features = getattr(train_data, "features", None) or {}
    label_feature = features.get("labels")
    if label_feature is not None and getattr(label_feature, "dtype", None) == "int64":
        groups: dict[int, list[int]] = {}
        for i, label in enumerate(train_data["labels"]):
            groups.setdefault(int(label), []).append(i)
    else:
        groups = {0: list(range(len(train_data)))}
    chosen: list[int] = []
    for members in groups.values():
        n = max(1, math.ceil(ratio * len(members)))
        order = torch.randperm(len(members), generator=generator)[:n].tolist()
        chosen.extend(members[j] for j in order)
    return sorted(chosen)


class LoRADrop(LoRA):
    name = "lora_drop"
    Config = LoRADropConfig
    paper = "Zhou et al., LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation (arXiv:2402.07721)"
    # The shared pairs are not PEFT's layout (PEFT stores one pair per layer).
    peft_type = None
    supports_sharding = False
    sharding_reason = "it replaces its adapter pairs after the probe run, once the model would already be sharded"
    supports_expert_parameters = False
    expert_parameters_reason = "its probe scores and shared pairs are defined per linear layer"
    draws_artifacts = True
    shared_attr = SHARED_ATTR
    layer_class = LoRADropLayer

    def __init__(self, config: LoRADropConfig):
        super().__init__(config)
        self.record: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------
    # Before training
    def prepare(self, fit: Callable[[Any, int, str], Any], train_data: Any, seed: int) -> dict[str, Any]:
        cfg = self.config
        sample = train_data.select(sample_indices(train_data, cfg.sample_ratio, seed))
        result = fit(sample, cfg.sample_steps, SAMPLE_PHASE)  # None: one pass over the sample
        steps = result.steps
        importance = self.importance(sample)
        kept = select_layers(importance, cfg.threshold)
        before = self.adapter_parameter_count()
        self.restructure(kept, seed)
        self.record = {
            "importance": {p: importance[p] for p in sorted(importance, key=lambda p: -importance[p])},
            "kept": kept,
            "shared": self.shared_groups(),
            "threshold": cfg.threshold,
            "sample_ratio": cfg.sample_ratio,
            "sample_size": len(sample),
            "sample_steps": steps,
            "seed": seed,
            "params_before": before,
            "params_after": self.adapter_parameter_count(),
        }
        return self.record

    @torch.no_grad()
    def importance(self, sample: Any) -> dict[str, float]:
        """Normalised g_i = sum over the sample's real tokens of ||s B_i A_i x_i||^2 (real forward passes).

        Under several processes each takes every N-th batch of the sample and the sums are added
        across processes before normalising, so every process keeps the same layers. Every process
        runs the same number of forward passes (sharded models need that): one short of batches
        repeats one whose tokens are masked out.
        """
        model = self.model
        device = next(p.device for p in model.parameters())
        sums = {path: torch.zeros((), dtype=torch.float64, device=device) for path in self.layers}
        mask: list[torch.Tensor] = []  # the current batch's attention mask, read by the hooks

        def hook(path: str, scaling: float) -> Callable[..., None]:
            def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                per_token = (output.double() * scaling).pow(2).sum(-1)  # (batch, seq) for transformers
                sums[path] += (per_token.reshape(-1) * mask[0].reshape(-1).to(per_token.dtype)).sum()

            return record

        handles = [
            layer.pair()[1].register_forward_hook(hook(path, layer.scaling)) for path, layer in self.layers.items()
        ]
        was_training = model.training
        model.eval()  # no dropout on the adapter input: the importance of what the layer computes
        try:
            starts = list(range(0, len(sample), IMPORTANCE_BATCH))
            mine = starts[rank()::world_size()]
            for i in range(math.ceil(len(starts) / world_size())):
                start = mine[i] if i < len(mine) else starts[0]
                rows = [sample[j] for j in range(start, min(start + IMPORTANCE_BATCH, len(sample)))]
                input_ids, attention_mask = right_padded(rows, device)
                mask[:] = [attention_mask if i < len(mine) else torch.zeros_like(attention_mask)]
                model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        totals = all_reduce_sum(torch.stack([sums[path] for path in self.layers]))
        sums = dict(zip(self.layers, totals))
        total = sum(float(s) for s in sums.values())
        if not total > 0:
            raise LorafamError(
                "lora_drop: every adapter output on the sample is zero, so no layer is more important than "
                "another; raise adapter.sample_steps (or train.lr) so the sample run moves B off zero"
            )
        return {path: float(s) / total for path, s in sums.items()}

    def restructure(self, kept: list[str], seed: int) -> None:
        """Fresh pairs: own ones on ``kept`` layers, one shared per (out, in) shape on the others."""
        generator = torch.Generator().manual_seed(seed)
        shared = nn.ModuleDict()
        for path, layer in self.layers.items():
            if path in kept:
                self.init_pair(layer.lora_A, layer.lora_B, generator)
                continue
            key = shape_key(layer)
            if key not in shared:
                pair = SharedLoRA(layer.in_features, layer.out_features, self.config.r, layer.lora_A.weight.device)
                self.init_pair(pair.lora_A, pair.lora_B, generator)
                shared[key] = pair
            layer.use_shared(shared[key])
        self.set_shared_module(shared)

    def restore(self, prepared: dict[str, Any]) -> None:
        recorded = set(prepared.get("importance", {}))
        if recorded != set(self.layers):
            differ = sorted(recorded ^ set(self.layers))
            raise LorafamError(
                f"run.json's lora_drop record names other layers than this recipe adapts ({differ[:3]}); "
                "was adapter.target_modules changed after training?"
            )
        self.restructure(list(prepared["kept"]), int(prepared.get("seed", 0)))
        self.record = dict(prepared)

    # ----------------------------------------------------------------------------------------------
    # Saving, merging, reporting
    def shared_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for path, layer in self.layers.items():
            if layer.shared:
                groups.setdefault(shape_key(layer), []).append(path)
        return groups

    def adapter_parameter_count(self) -> int:
        seen = {id(p): p for layer in self.layers.values() for p in layer.pair()[0].parameters()}
        seen |= {id(p): p for layer in self.layers.values() for p in layer.pair()[1].parameters()}
        return sum(p.numel() for p in seen.values())

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        rec = self.record
        return super().peft_config(base_model_name, task_type) | {
            "lora_drop_kept": rec.get("kept"),
            "lora_drop_shared": rec.get("shared"),
        }

    def write_artifacts(self, folder: Path) -> list[Path]:
        """lora_drop_importance.png: each layer's share of the importance, kept layers framed."""
        rec = self.record
        if not rec:
            return []  # no probe run yet: nothing decided
        from lorafam.plots import grid_heatmap, new_figure, save_png

        where = grid_positions(list(self.layers))  # model order
        cells = {where[p]: g for p, g in rec["importance"].items()}
        rows = list(dict.fromkeys(layer for layer, _ in where.values()))
        columns = list(dict.fromkeys(module for _, module in where.values()))
        fig = new_figure(max(5.0, 1.6 + 0.9 * len(columns)), max(3.0, 1.4 + 0.3 * len(rows)))
        ax = fig.add_subplot()
        image = grid_heatmap(
            ax, rows, columns, cells, fmt="{:.3f}", marked={where[p] for p in rec["kept"]}, cmap="viridis", vmin=0
        )
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(
            f"LoRA-drop importance (framed: {len(rec['kept'])} kept, covering {rec['threshold']:g})", fontsize=9
        )
        fig.colorbar(image, ax=ax, label="importance (share)")
        return [save_png(fig, Path(folder) / "lora_drop_importance.png")]

    def report(self) -> list[str]:
        cfg = self.config
        rec = self.record
        if not rec:
            return [
                f"LoRA-drop: at train time, plain LoRA on a {cfg.sample_ratio:g} sample of the training data, "
                f"then keep the layers covering {cfg.threshold:g} of the output importance; the others share "
                "one LoRA per shape"
            ]
        before, after = rec["params_before"], rec["params_after"]
        lines = [
            f"LoRA-drop: importance from {rec['sample_size']} sampled examples after {rec['sample_steps']} steps; "
            f"threshold {rec['threshold']:g}",
            f"kept {len(rec['kept'])} of {len(rec['importance'])} layers with their own LoRA; "
            + ", ".join(f"{len(paths)} share one {key} pair" for key, paths in rec["shared"].items()),
            f"adapter params: {before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer)",
            "importance (descending, * = kept):",
        ]
        kept = set(rec["kept"])
        lines += [f"  {'*' if p in kept else ' '} {g:.4f}  {p}" for p, g in rec["importance"].items()]
        return lines


def right_padded(rows: list[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the right (pads are masked out of the importance)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        mask[i, :n] = torch.as_tensor(list(r["attention_mask"]), dtype=torch.long)
    return ids.to(device), mask.to(device)
