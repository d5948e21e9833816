"""AdaLoRA (Zhang et al., 2023, arXiv:2303.10512): LoRA that moves its rank budget to where it matters.

Each adapted W gets an SVD-shaped update Delta = P diag(Lambda) Q (P: out x r, Lambda: r, Q: r x in),
scaled by alpha / init_r (PEFT's ``ranknum``, which stays init_r). After every optimizer step each
triplet (P[:, i], Lambda[i], Q[i]) is scored by its smoothed sensitivity |theta * grad| times the
uncertainty of that sensitivity; on allocation steps the lowest-scoring triplets across *all* matrices
get Lambda[i] = 0 until only the budget is left. The budget stays at init_r per matrix for ``tinit``
steps, falls cubically to target_r per matrix ``tfinal`` steps before the end, then stays. P and Q
keep their vectors, so a masked triplet can come back while the budget is still moving. A penalty
keeps P and Q near-orthonormal, so Lambda acts like singular values and zeroing one is a clean rank cut.

Saved files follow PEFT's AdaLoRA: lora_A = Q, lora_B = P, lora_E = Lambda. A finished adapter holds
only the live triplets and adapter_config.json's ``rank_pattern`` says which, as PEFT writes it and
``peft.PeftModel.from_pretrained`` reads it. Mid-training checkpoints keep every triplet (masked ones
with Lambda = 0) so a resumed run continues exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from lorafam.adapters.base import PEFT_PREFIX, AdapterConfig, AdapterLayer, Variant, dropout_module, grid_positions
from lorafam.errors import LorafamError

TRIPLET = ("lora_A", "lora_B", "lora_E")  # Q, P, Lambda in PEFT's names


class AdaLoRAConfig(AdapterConfig):
    variant: Literal["adalora"] = "adalora"
    r: int = Field(12, ge=1, description="Another name for init_r; give either (equal if both).")
    init_r: int = Field(12, ge=1, description="Rank every matrix starts with.")
    target_r: int | None = Field(
        None, ge=1, description="Average rank per matrix at the end. Default: 2/3 of init_r (PEFT's 12 -> 8)."
    )
    tinit: int = Field(0, ge=0, description="Steps at the full budget before pruning starts (importance warms up).")
    tfinal: int = Field(0, ge=0, description="Last steps trained at the final, fixed ranks.")
    delta_t: int = Field(1, ge=1, description="Reallocate the budget every delta_t steps (PEFT's deltaT).")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity |theta * grad|.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality penalty on P and Q.")

    @model_validator(mode="after")
    def _resolve_ranks(self) -> "AdaLoRAConfig":
        given = self.model_fields_set
        if "r" in given and "init_r" in given and self.r != self.init_r:
            raise ValueError(
                f"adapter.r ({self.r}) and adapter.init_r ({self.init_r}) disagree; for adalora r is "
                "another name for init_r, the starting rank: set only init_r"
            )
        if "r" in given and "init_r" not in given:
            self.init_r = self.r
        self.r = self.init_r
        if self.target_r is None:
            self.target_r = max(1, round(self.init_r * 2 / 3))
        if self.target_r > self.init_r:
            raise ValueError(
                f"adapter.target_r ({self.target_r}) must not exceed adapter.init_r ({self.init_r}): "
                "AdaLoRA only removes rank"
            )
        return self

    def check_recipe(self, recipe: Any) -> None:
        """The schedule must leave steps to shrink the budget in. Epoch-only recipes are checked at
        their first step instead, since their step count depends on the data's size."""
        if recipe.train.max_steps is not None:
            check_schedule(self, recipe.train.max_steps, f"train.max_steps ({recipe.train.max_steps})")


def check_schedule(cfg: AdaLoRAConfig, total_steps: int, what: str) -> None:
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise ValueError(
            f"adapter.tinit ({cfg.tinit}) + adapter.tfinal ({cfg.tfinal}) must be less than {what}: "
            "the rank budget needs steps in between to shrink"
        )


class AdaLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__(base_layer)
        f32 = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **f32))  # Q: right singular vectors
        self.lora_E = nn.Parameter(torch.empty(r, 1, **f32))  # Lambda: singular values
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **f32))  # P: left singular vectors
        # PEFT divides by ranknum = init_r (+1e-5) and never changes it; a buffer, so it is not trained.
        self.register_buffer("ranknum", torch.full((1,), float(r), **f32), persistent=False)
        self.alpha = alpha
        self.lora_dropout = dropout_module(dropout)
        # Triplets alive after the latest allocation. Kept on the CPU whatever the model's device:
        # it is tiny, and report() can read it even on a meta-device model.
        self.rank_mask = torch.ones(r, dtype=torch.bool, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        x = self.lora_dropout(x.to(self.lora_A.dtype))
        update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.alpha / (self.ranknum + 1e-5)
        return out + update.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        # Masked triplets hold Lambda = 0 once allocated, so only live ones contribute.
        return self.lora_B @ (self.lora_A * self.lora_E) * self.alpha / (self.ranknum + 1e-5)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Lambda Q) over the live triplets: their product is the update up to the scale."""
        live = self.rank_mask.to(self.lora_A.device)
        return self.lora_B[:, live], (self.lora_E * self.lora_A)[live]

    def adapter_named_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TRIPLET}  # ranknum is not saved (as PEFT)

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.to(self.lora_E.device).view(-1, 1), 0.0)


class AdaLoRA(Variant):
    name = "adalora"
    Config = AdaLoRAConfig
    paper = "Zhang et al., Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (arXiv:2303.10512)"
    peft_type = "ADALORA"
    has_low_rank_factors = True
    draws_artifacts = True
    supports_sharding = False
    sharding_reason = (
        "its budget ranks every triplet of every layer by sensitivity after each step, which needs each "
        "process to hold whole parameters and gradients"
    )

    def __init__(self, config: AdaLoRAConfig):
        super().__init__(config)
        # EMAs of sensitivity and of its uncertainty, per parameter: f"{path}.lora_A" -> tensor.
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}
        self.total_steps: int | None = None
        # True once the last step's allocation is done: then saves hold only the live triplets.
        self.finished = False

    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.init_r

    def make_layer(self, base_layer: nn.Linear, path: str) -> AdaLoRALayer:
        layer = AdaLoRALayer(base_layer, self.config.init_r, self.config.alpha, self.config.dropout)
        with torch.no_grad():  # PEFT's init: the update starts at zero through Lambda alone
            nn.init.zeros_(layer.lora_E)
            nn.init.normal_(layer.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(layer.lora_B, mean=0.0, std=0.02)
        return layer

    # ----------------------------------------------------------------------------------------------
    # Training hooks
    def extra_losses(self) -> dict[str, torch.Tensor]:
        if self.config.orth_reg_weight == 0:
            return {}
        return {"orth_reg": self.config.orth_reg_weight * self.orthogonality()}

    def orthogonality(self) -> torch.Tensor:
        """The paper's R: ||P^T P - I||_F^2 and ||Q Q^T - I||_F^2, averaged over every P and Q (as PEFT)."""
        terms = []
        for layer in self.layers.values():
            # In fp32 even under autocast: I - P^T P is a small difference of large terms.
            with torch.autocast(layer.lora_A.device.type, enabled=False):
                for gram in (layer.lora_B.T @ layer.lora_B, layer.lora_A @ layer.lora_A.T):
                    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                    terms.append((gram - eye).pow(2).sum())
        device = terms[0].device
        return sum(t.to(device) for t in terms) / len(terms)

    def budget(self, step: int) -> int:
        """Total live triplets the schedule allows after ``step`` (the paper's cubic b(t))."""
        cfg, n = self.config, len(self.layers)
        start, end = cfg.tinit, self.total_steps - cfg.tfinal
        if step <= start:
            return cfg.init_r * n
        if step >= end:
            return cfg.target_r * n
        left = 1 - (step - start) / (end - start)
        return int((cfg.init_r - cfg.target_r) * n * left**3 + cfg.target_r * n)

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        if self.total_steps != total_steps:
            try:
                check_schedule(self.config, total_steps, f"the run's {total_steps} steps")
            except ValueError as e:
                raise LorafamError(str(e)) from None
            self.total_steps = total_steps
        cfg, end = self.config, total_steps - self.config.tfinal
        if step < end:  # as PEFT: the final allocation uses the scores up to the step before
            self._update_importance()
        if (cfg.tinit < step < end and step % cfg.delta_t == 0) or step == end:
            self._mask_to_budget(self.budget(step))
        if step == end:  # the ranks are final: the scores are no longer needed
            self.sensitivity, self.uncertainty = {}, {}
        if step > end:  # the optimizer revives masked Lambdas; the final ranks are kept fixed
            for layer in self.layers.values():
                layer.apply_mask()
        self.finished = step >= total_steps
        return {"rank_budget": float(self.budget(step)), "rank": float(sum(self.ranks().values()))}

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for name in TRIPLET:
                p, key = getattr(layer, name), f"{path}.{name}"
                sens = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                avg = b1 * self.sensitivity.get(key, torch.zeros_like(p)) + (1 - b1) * sens
                unc = b2 * self.uncertainty.get(key, torch.zeros_like(p)) + (1 - b2) * (sens - avg).abs()
                self.sensitivity[key], self.uncertainty[key] = avg, unc

    def triplet_scores(self, path: str) -> torch.Tensor:
        """Score of each triplet: Lambda_i's, plus the mean over P's column and Q's row."""
        layer = self.layers[path]

        def score(name: str) -> torch.Tensor:
            key = f"{path}.{name}"
            if key not in self.sensitivity:
                return torch.zeros_like(getattr(layer, name))
            return self.sensitivity[key] * self.uncertainty[key]

        return score("lora_E").view(-1) + score("lora_A").mean(dim=1) + score("lora_B").mean(dim=0)

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> None:
        paths = list(self.layers)
        scores = torch.cat([self.triplet_scores(p).float().cpu() for p in paths])
        # Exactly `budget` survivors (PEFT's kthvalue threshold can drop more on ties).
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.argsort(scores, descending=True, stable=True)[:budget]] = True
        r = self.config.init_r
        for i, path in enumerate(paths):
            layer = self.layers[path]
            layer.rank_mask = keep[i * r : (i + 1) * r].clone()
            layer.apply_mask()

    def ranks(self) -> dict[str, int]:
        return {path: int(layer.rank_mask.sum()) for path, layer in self.layers.items()}

    def train_state(self) -> dict[str, torch.Tensor]:
        out = {f"{path}.rank_mask": layer.rank_mask for path, layer in self.layers.items()}
        out |= {f"{k}.sensitivity": v for k, v in self.sensitivity.items()}
        out |= {f"{k}.uncertainty": v for k, v in self.uncertainty.items()}
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore masks and importance EMAs. Call after load_adapter_state_dict."""
        expected = {f"{path}.rank_mask" for path in self.layers}
        params = {f"{path}.{name}" for path in self.layers for name in TRIPLET}
        stats = {k for k in state if k not in expected}
        bad = [k for k in stats if k.rpartition(".")[0] not in params
               or k.rpartition(".")[2] not in ("sensitivity", "uncertainty")]
        if not expected <= set(state) or bad:
            raise LorafamError("checkpoint's AdaLoRA state does not match this recipe's adapted layers")
        for path, layer in self.layers.items():
            layer.rank_mask = state[f"{path}.rank_mask"].to("cpu", torch.bool).clone()
        device = {f"{p}.{n}": getattr(self.layers[p], n).device for p in self.layers for n in TRIPLET}
        self.sensitivity, self.uncertainty = {}, {}
        for key in stats:
            param, _, kind = key.rpartition(".")
            target = self.sensitivity if kind == "sensitivity" else self.uncertainty
            target[param] = state[key].to(device[param])

    # ----------------------------------------------------------------------------------------------
    # Saving and loading
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().adapter_state_dict()
        if self.finished:  # PEFT's layout: only the triplets rank_pattern marks as live
            for path, layer in self.layers.items():
                keys = {n: f"{PEFT_PREFIX}{path}.{n}" for n in TRIPLET}
                mask = layer.rank_mask.to(state[keys["lora_E"]].device)
                state[keys["lora_A"]] = state[keys["lora_A"]][mask].contiguous()
                state[keys["lora_B"]] = state[keys["lora_B"]][:, mask].contiguous()
                state[keys["lora_E"]] = state[keys["lora_E"]][mask].contiguous()
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads both layouts: every triplet (masked ones have Lambda = 0), or only the live ones
        (a finished adapter, as PEFT saves it), which go to the first slots with the rest masked."""
        state, masks, finished = dict(state), {}, False
        for path, layer in self.layers.items():
            keys = {n: f"{PEFT_PREFIX}{path}.{n}" for n in TRIPLET}
            if not all(k in state for k in keys.values()):
                continue  # the base class names what is missing
            live, r = state[keys["lora_E"]].shape[0], self.config.init_r
            if live < r:
                finished = True
                for name, dim in (("lora_A", 0), ("lora_B", 1), ("lora_E", 0)):
                    value = state[keys[name]]
                    shape = list(value.shape)
                    shape[dim] = r
                    full = value.new_zeros(shape)
                    full.narrow(dim, 0, live).copy_(value)
                    state[keys[name]] = full
                masks[path] = torch.arange(r) < live
            else:  # a triplet with Lambda exactly 0 contributes nothing: it counts as masked
                masks[path] = state[keys["lora_E"]].detach().view(-1).cpu() != 0
        super().load_adapter_state_dict(state)
        for path, mask in masks.items():
            self.layers[path].rank_mask = mask
        self.finished = finished

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        cfg = self.config
        rank_pattern = None
        if self.finished:
            rank_pattern = {f"{path}.lora_E": layer.rank_mask.tolist() for path, layer in self.layers.items()}
        return super().peft_config(base_model_name, task_type) | {
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.delta_t,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_reg_weight,
            # PEFT refuses a config without a schedule; an untrained adapter gets the shortest valid one.
            "total_step": self.total_steps or cfg.tinit + cfg.tfinal + 1,
            "rank_pattern": rank_pattern,
        }

    # ----------------------------------------------------------------------------------------------
    # Reporting
    def rank_table(self) -> tuple[list[str], list[str], dict[tuple[str, str], int]]:
        """(layers, modules, rank by (layer, module)) from the module paths."""
        where = grid_positions(list(self.layers))
        ranks = self.ranks()
        cells = {where[path]: ranks[path] for path in self.layers}
        layers = list(dict.fromkeys(layer for layer, _ in cells))
        modules = list(dict.fromkeys(module for _, module in cells))
        return layers, modules, cells

    def report(self) -> list[str]:
        cfg, n = self.config, len(self.layers)
        ranks = self.ranks()
        lines = [
            f"AdaLoRA budget: {cfg.init_r} x {n} matrices = {cfg.init_r * n} triplets, held {cfg.tinit} steps, "
            f"then cubic down to {cfg.target_r} x {n} = {cfg.target_r * n} by {cfg.tfinal} steps before the end "
            f"(reallocated every {cfg.delta_t} steps)"
        ]
        if not self.finished and all(r == cfg.init_r for r in ranks.values()):
            return lines  # nothing allocated yet: no table to show
        layers, modules, cells = self.rank_table()
        lines.append(f"final rank per layer and module ({sum(ranks.values())} live of {cfg.init_r * n}):")
        width = max(len(m) for m in modules + ["layer"]) + 2
        lines.append("layer".ljust(8) + "".join(m.rjust(width) for m in modules))
        for layer in layers:
            row = [str(cells[(layer, m)]) if (layer, m) in cells else "-" for m in modules]
            lines.append(layer.ljust(8) + "".join(v.rjust(width) for v in row))
        return lines

    def write_artifacts(self, folder: Path) -> list[Path]:
        """adalora_ranks.png: a heatmap of the final rank per layer (rows) and module (columns)."""
        # The object API with an explicit Agg canvas: no pyplot, no global backend switch.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        layers, modules, cells = self.rank_table()
        grid = [[cells.get((layer, m), float("nan")) for m in modules] for layer in layers]
        fig = Figure(figsize=(1.2 + 0.9 * len(modules), 1.2 + 0.3 * len(layers)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=self.config.init_r)
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(f"AdaLoRA final rank (init_r {self.config.init_r}, target_r {self.config.target_r})")
        if len(layers) * len(modules) <= 400:
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    if value == value:  # not NaN
                        ax.text(j, i, str(value), ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(image, ax=ax, label="rank")
        fig.tight_layout()
        folder = Path(folder)
        path, tmp = folder / "adalora_ranks.png", folder / ".adalora_ranks.png.tmp"
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
        return [path]
