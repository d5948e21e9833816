"""GLoRA, Generalized LoRA (Chavan et al., 2023, arXiv:2306.07967).

f(x) = (W0 + W0 * A + B) x + W0 C + D * b0 + E + b0, with * elementwise and five support tensors,
each in a form chosen per layer (the paper's reference code, ViT-Slim/GLoRA/layer.py):

  A, B  (out x in)  lora: Xd @ Xu, (out x r)(r x in) | vector: (out x 1), one value per output row
                    | constant: one scalar | none
  C     (in x 1)    lora: Xd @ Xu, (in x r)(r x 1) | vector: (in x 1) | none
  D, E  (out)       vector | constant | none

Xd starts at zero (Xu Xavier-uniform, as in the reference code) and the other forms at zero, so the
model starts as the base. Merging is the paper's structural re-parameterization: one weight
W0 + W0 * A + B and one bias b0 + D * b0 + E + W0 C, a bias the base may not have had.

A merged model is only useful if transformers can load that new bias. On a layer built without a
bias, C and E are therefore kept only where a config flag of the architecture gives the layer one
(Llama's ``attention_bias``/``mlp_bias``: merge switches it on); where none does (Qwen2's o_proj and
MLP), they are left out when the adapter is built, and ``notes()`` says so at train and inspect time.

The recipe states the forms (``forms`` for every layer, ``layer_forms`` per module-name suffix), or,
with a ``search:`` block, the paper's structure search decides each layer's forms before training:
a supernet of every form, then an evolutionary search under a parameter budget (glora_search.py).
The chosen forms are recorded in run.json and the run continues as an ordinary GLoRA adapter.
Tensor names and shapes are PEFT's (``peft.tuners.glora``), and the adapter is written in PEFT's
format whenever PEFT computes the same function (see ``GLoRA.peft_compatible``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from lorafam.adapters.base import AdapterConfig, AdapterLayer, Variant, _parent_of, grid_positions
from lorafam.adapters.glora_search import TENSORS, GLoRASearch, GLoRASuperLayer, draw, evolve, set_active
from lorafam.errors import LorafamError

FormAB = Literal["lora", "vector", "constant", "none"]
FormC = Literal["lora", "vector", "none"]
FormDE = Literal["vector", "constant", "none"]


class GLoRAForms(BaseModel):
    """The form of each support tensor. Defaults are PEFT's (the paper has none: it searches them)."""

    model_config = ConfigDict(extra="forbid")

    A: FormAB = Field("lora", description="Scales W0 elementwise: W0 + W0 * A.")
    B: FormAB = Field("lora", description="Added to the weight.")
    C: FormC = Field("lora", description="Adds W0 C to the bias.")
    D: FormDE = Field("constant", description="Scales the base bias: b0 + D * b0 (no effect without one).")
    E: FormDE = Field("constant", description="Added to the bias.")


class GLoRAConfig(AdapterConfig):
    variant: Literal["glora"] = "glora"
    alpha: float = Field(16.0, gt=0, description="Unused: GLoRA's support tensors are not scaled.")
    forms: GLoRAForms = Field(default_factory=GLoRAForms, description="Forms of A..E for every adapted layer.")
    layer_forms: dict[str, GLoRAForms] = Field(
        default_factory=dict,
        description="Per-layer overrides: module-name suffix (e.g. 'down_proj' or 'layers.0.mlp.up_proj') -> "
        "forms; unspecified tensors take `forms`. The longest matching suffix wins.",
    )
    search: GLoRASearch | None = Field(
        None, description="Search each layer's forms before training (the paper's supernet + evolution); "
        "overrides forms and layer_forms. null: the forms as stated.",
    )

    @model_validator(mode="before")
    @classmethod
    def _complete_layer_forms(cls, data: Any) -> Any:
        # An override names only what changes; fill in the rest from `forms` so that the saved
        # recipe spells out every layer's forms.
        if not isinstance(data, dict) or not isinstance(data.get("layer_forms"), dict):
            return data
        default = data.get("forms") or {}
        if isinstance(default, BaseModel):
            default = default.model_dump()
        if not isinstance(default, dict):
            return data
        layer_forms = {
            key: {**default, **value} if isinstance(value, dict) else value for key, value in data["layer_forms"].items()
        }
        return {**data, "layer_forms": layer_forms}

    @field_validator("dropout")
    @classmethod
    def _no_dropout(cls, value: float) -> float:
        if value > 0:
            raise ValueError("glora has no dropout (the input meets one merged weight); set adapter.dropout: 0")
        return value


class SupportTensor(nn.Module):
    """One of A..E in its form: ``lora`` (Xd @ Xu), ``vector`` or ``constant`` (X)."""

    def __init__(self, form: str, shape: tuple[int, ...], r: int, device: torch.device):
        super().__init__()
        self.form = form
        kw = {"device": device, "dtype": torch.float32}  # fp32 whatever the base dtype, as LoRA's factors
        if form == "lora":
            self.Xd = nn.Parameter(torch.zeros(shape[0], r, **kw))
            self.Xu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, shape[1], **kw)))
        elif form == "vector":
            # A/B/C: a column, broadcast across the input dimension; D/E: a bias-shaped vector.
            self.X = nn.Parameter(torch.zeros((shape[0], 1) if len(shape) == 2 else shape, **kw))
        elif form == "constant":
            self.X = nn.Parameter(torch.zeros(1, **kw))
        else:
            raise ValueError(f"unknown GLoRA form {form!r}")

    def forward(self) -> torch.Tensor:
        if self.form == "lora":
            return self.Xd @ self.Xu
        return self.X if self.form == "vector" else self.X[0]


class GLoRALayer(AdapterLayer):
    """``can_add_bias``: whether a merged model can hold a bias here that ``base_layer`` lacks; when
    False, C and E (whose only effect is such a bias) get no parameters."""

    reads_base_weight = True  # W0 + W0 * A + B, composed in fp32

    def __init__(self, base_layer: nn.Linear, forms: GLoRAForms, r: int, can_add_bias: bool = True):
        super().__init__(base_layer)
        self.forms = forms
        out_f, in_f, device = self.out_features, self.in_features, base_layer.weight.device
        has_bias = base_layer.bias is not None
        bias_terms_on = has_bias or can_add_bias

        def part(form: str, shape: tuple[int, ...]) -> SupportTensor | None:
            return None if form == "none" else SupportTensor(form, shape, r, device)

        self.glora_A = part(forms.A, (out_f, in_f))
        self.glora_B = part(forms.B, (out_f, in_f))
        self.glora_C = part(forms.C, (in_f, 1)) if bias_terms_on else None
        # D multiplies b0: without a base bias it has nothing to act on, so it gets no parameters.
        self.glora_D = part(forms.D, (out_f,)) if has_bias else None
        self.glora_E = part(forms.E, (out_f,)) if bias_terms_on else None

    @property
    def makes_bias(self) -> bool:
        return self.base_layer.bias is not None or self.glora_C is not None or self.glora_E is not None

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W0 + W0 * A + B, b0 + D * b0 + E + W0 C), in fp32; the bias is None when all of it is absent."""
        values = {t: None if (part := getattr(self, f"glora_{t}")) is None else part() for t in TENSORS}
        # W0 is dequantized on the fly on a 4-bit base.
        return compose(self.base_weight().float(), self.base_layer.bias, values, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective_weight_and_bias()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        weight, _ = self.effective_weight_and_bias()
        w0 = self.base_weight()
        return (weight - w0.float()).to(w0.dtype)

    def merged(self) -> nn.Linear:
        weight, bias = self.effective_weight_and_bias()
        base = self.base_weight()  # float on a quantized base too: the dtype it was quantized from
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        linear.to(device=base.device, dtype=base.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear


def compose(w0: torch.Tensor, b0: torch.Tensor | None, values: dict[str, torch.Tensor | None], out_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLoRA's weight and bias from W0, b0 and the support tensors' values (None: absent)."""
    A, B, C, D, E = (values[t] for t in TENSORS)
    weight = w0
    if A is not None:
        weight = weight + w0 * A
    if B is not None:
        weight = weight + B
    if b0 is None and C is None and E is None:
        return weight, None
    bias = torch.zeros(out_features, device=w0.device) if b0 is None else b0.float()
    if D is not None and b0 is not None:
        bias = bias + b0.float() * D
    if E is not None:
        bias = bias + E
    if C is not None:
        bias = bias + (w0 @ C).squeeze(-1)
    return weight, bias


SUPERNET, SEARCH_STATE = "glora_supernet", "glora_search"  # the supernet pass's name, and prepare/ files


class GLoRA(Variant):
    name = "glora"
    Config = GLoRAConfig
    paper = "Chavan et al., One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning (arXiv:2306.07967)"
    peft_type = "GLORA"
    # W0 * A and W0 C read W0, dequantized on the fly from a 4-bit base (W0 itself is never written).
    supports_quantized_base = True
    draws_artifacts = True  # the searched forms (with adapter.search)
    #: Layer path -> config flag that gives it a bias (modeling.bias_switches); None: any layer may.
    bias_switches: dict[str, str] | None = None
    #: Set while the supernet trains: the draws' seed (after_step draws the next step's forms).
    supernet_seed: int | None = None
    supernet_step = 0  # whose draw is active
    #: What the search decided (run.json's ``prepare``); empty without a search.
    searched: dict[str, Any] = {}

    @property
    def supports_sharding(self) -> bool:  # type: ignore[override]
        return self.config.search is None

    sharding_reason = "its structure search replaces every adapter layer between the supernet and the run"

    @property
    def leaves_parameters_unused(self) -> bool:  # type: ignore[override]
        return self.supernet_seed is not None

    def forms_for(self, path: str) -> GLoRAForms:
        matches = [k for k in self.config.layer_forms if path == k or path.endswith("." + k)]
        return self.config.layer_forms[max(matches, key=len)] if matches else self.config.forms

    def apply(self, model: nn.Module, head_modules: list[str] = ()) -> "GLoRA":
        from lorafam.modeling import bias_switches

        # Decided once, from the model as its class builds it, before any layer is wrapped: the
        # same answer on a real, a quantized or a meta model, so train, inspect, eval and merge agree
        # on which tensors the adapter has.
        self.bias_switches = bias_switches(model)
        return super().apply(model, head_modules)

    def make_layer(self, base_layer: nn.Linear, path: str) -> GLoRALayer:
        return GLoRALayer(base_layer, self.forms_for(path), self.config.r, self._can_add_bias(path))

    # ----------------------------------------------------------------------------------------------
    # The structure search (adapter.search): supernet, evolution, the chosen subnet
    def prepare(self, fit: Callable[..., Any], train_data: Any, seed: int) -> dict[str, Any]:
        """Train the supernet for ``search.supernet_steps``, search, and rebuild every layer in the
        forms found (from the supernet's weights unless ``search.inherit`` is false)."""
        search = self.config.search
        if search is None:
            return {}
        supernet = {path: GLoRASuperLayer(layer.base_layer, self.config.r, self._can_add_bias(path)) for path, layer in self.layers.items()}
        for path, layer in supernet.items():
            self._swap(path, layer)
        layers = list(supernet.values())
        trained = fit.load_tensors(SUPERNET)  # a resumed run: the supernet finished before the kill
        if trained is None:
            self.supernet_seed = seed
            self._draw(1)  # a resumed pass replaces it with its checkpoint's
            fit(train_data, search.supernet_steps, SUPERNET)
            self.supernet_seed = None
            fit.save_tensors(SUPERNET, {f"{p}.{k}": v for p, layer in supernet.items() for k, v in layer.support.state_dict().items()})
        else:
            for path, layer in supernet.items():
                layer.support.load_state_dict({k.removeprefix(f"{path}."): v for k, v in trained.items() if k.startswith(f"{path}.")})

        def fitness(candidate: tuple) -> float:
            set_active(layers, candidate)
            return fit.fitness(search.eval_examples)

        best, history = evolve(layers, search, seed, fitness, fit.report_generation, fit.load_state(SEARCH_STATE),
                               lambda state: fit.save_state(SEARCH_STATE, state))
        forms = {path: dict(zip(TENSORS, f)) for path, f in zip(supernet, best)}
        self._build_subnet(forms, supernet if search.inherit else None)
        self.searched = {"forms": forms, "fitness": history[-1]["best_fitness"], "params": history[-1]["best_params"],
                         "generations": history, "supernet_steps": search.supernet_steps, "seed": seed}
        return self.searched

    def restore(self, prepared: dict[str, Any]) -> None:
        if "forms" in prepared:
            self._build_subnet(prepared["forms"], None)
            self.searched = dict(prepared)

    def report(self) -> list[str]:
        if not self.searched:
            return []
        rec = self.searched
        lines = [f"GLoRA search: {len(rec['generations'])} generations after {rec['supernet_steps']} supernet steps; "
                 f"best fitness {rec['fitness']:.4f} with {rec['params']:,} adapter params", "forms (A B C D E) per layer:"]
        return lines + [f"  {' '.join(f'{forms[t]:<8}' for t in TENSORS)} {path}" for path, forms in rec["forms"].items()]

    def write_artifacts(self, folder: Path) -> list[Path]:
        """glora_structure.png: each layer's searched form of A..E, and the best fitness per generation."""
        if not self.searched:
            return []
        from lorafam.plots import grid_heatmap, new_figure, save_png

        rec, order = self.searched, ("none", "constant", "vector", "lora")
        where = grid_positions(list(rec["forms"]))
        rows = [f"{layer} {module}" for layer, module in where.values()]
        cells = {(f"{where[p][0]} {where[p][1]}", t): float(order.index(f[t])) for p, f in rec["forms"].items() for t in TENSORS}
        fig = new_figure(7.5, max(3.0, 1.4 + 0.25 * len(rows)))
        ax, curve = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        grid_heatmap(ax, rows, list(TENSORS), cells, fmt="", cmap="viridis", vmin=0, vmax=len(order) - 1)
        for i, row in enumerate(rows):
            for j, t in enumerate(TENSORS):
                code = int(cells[(row, t)])  # dark text on the light end of the colour map
                ax.text(j, i, order[code], ha="center", va="center", color="k" if code == len(order) - 1 else "w", fontsize=6)
        ax.set_title(f"searched forms ({rec['params']:,} params)", fontsize=9)
        generations = [g["generation"] for g in rec["generations"]]
        curve.plot(generations, [g["best_fitness"] for g in rec["generations"]], marker="o")
        curve.set_xlabel("generation")
        curve.xaxis.get_major_locator().set_params(integer=True)
        curve.set_ylabel("best fitness")
        return [save_png(fig, Path(folder) / "glora_structure.png")]

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        if self.supernet_seed is not None:  # the next supernet step's forms
            self._draw(step + 1)
        return {}

    def train_state(self) -> dict[str, torch.Tensor]:
        # A supernet checkpoint records which step's draw is active, so a resumed supernet pass
        # trains the draws the uninterrupted one would.
        return {"glora_supernet.next_step": torch.tensor(self.supernet_step)} if self.supernet_seed is not None else {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.supernet_seed is not None and "glora_supernet.next_step" in state:
            self._draw(int(state.pop("glora_supernet.next_step")))
        super().load_train_state(state)

    def _draw(self, step: int) -> None:
        layers = list(self.layers.values())
        set_active(layers, draw(layers, self.supernet_seed, step))
        self.supernet_step = step

    def _build_subnet(self, forms: dict[str, dict[str, str]], supernet: dict[str, GLoRASuperLayer] | None) -> None:
        """Every layer as a plain GLoRA layer in its searched forms (``layer_forms`` by full path, so
        the adapter config says so), from the supernet's weights when given."""
        if set(forms) != set(self.layers):
            differ = sorted(set(forms) ^ set(self.layers))
            raise LorafamError(f"run.json's glora search names other layers than this recipe adapts ({differ[:3]})")
        self.config = self.config.model_copy(update={"layer_forms": {p: GLoRAForms(**f) for p, f in forms.items()}})
        for path, old in list(self.layers.items()):
            layer = GLoRALayer(old.base_layer, self.config.layer_forms[path], self.config.r, self._can_add_bias(path))
            if supernet is not None:
                with torch.no_grad():
                    for t in TENSORS:
                        part = getattr(layer, f"glora_{t}")
                        if part is not None:
                            for name, value in supernet[path].support[t].subnet_state(getattr(layer.forms, t)).items():
                                getattr(part, name).copy_(value)
            self._swap(path, layer)

    def _swap(self, path: str, layer: AdapterLayer) -> None:
        parent, attr = _parent_of(self.model, path)
        layer.train(self.layers[path].training)
        setattr(parent, attr, layer)
        self.layers[path] = layer

    def _can_add_bias(self, path: str) -> bool:
        # None: no transformers config will be read back, so any layer may take a new bias.
        return self.bias_switches is None or path in self.bias_switches

    def notes(self) -> list[str]:
        """Where the bias terms C, E are off (no config flag can give the layer a bias), and which
        config flags merge switches on so the new biases load."""
        off: dict[str, list[str]] = {}  # layer path -> the terms left out there
        flags: dict[str, str] = {}  # layer path with a new bias -> the flag that lets it load
        for path, layer in self.layers.items():
            if layer.base_layer.bias is not None:
                continue
            requested = [t for t in ("C", "E") if getattr(layer.forms, t) != "none"]
            if requested and layer.glora_C is None and layer.glora_E is None:
                off[path] = requested
            elif layer.makes_bias and self.bias_switches:
                flags[path] = self.bias_switches[path]
        lines = []
        if off:
            terms = sorted({t for ts in off.values() for t in ts})
            lines.append(
                f"glora: {' and '.join(terms)} (the terms that add a bias) are off on {_group(off)}: "
                f"{type(self.model).__name__} has no bias there and no config flag that adds one, so a "
                "merged model could not hold it"
            )
        if flags:
            lines.append(
                f"glora: W0 C + E becomes a new bias on {_group(flags)}; merge turns on "
                f"{', '.join(sorted(set(flags.values())))} in the merged config so transformers loads it"
            )
        return lines

    def attach(self, model: nn.Module) -> None:
        unused = [k for k in self.config.layer_forms if not any(p == k or p.endswith("." + k) for p in self.layers)]
        if unused:
            raise LorafamError(
                f"adapter.layer_forms: {', '.join(map(repr, unused))} matches no adapted layer; keys are "
                f"module-name suffixes of adapter.target_modules layers, e.g. {next(iter(self.layers))!r}"
            )

    def peft_compatible(self) -> bool:
        """True when PEFT's GLoRA computes what this adapter computes, so it may read our file.

        PEFT ties A to B and D to E, uses one set of forms for every layer, and on a layer without a
        bias drops C, D and E altogether (the paper's code keeps W0 C + E as a new bias; we do where
        a merged model can hold it, see ``make_layer``).
        """
        forms = [layer.forms for layer in self.layers.values()]
        if any(f != forms[0] for f in forms) or forms[0].A != forms[0].B or forms[0].D != forms[0].E:
            return False
        return all(
            layer.base_layer.bias is not None or (layer.glora_C is None and layer.glora_E is None)
            for layer in self.layers.values()
        )

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        config = super().peft_config(base_model_name, task_type)
        if not self.peft_compatible():
            return config | {
                "peft_type": "LORAFAM_GLORA",
                "forms": self.config.forms.model_dump(),
                "layer_forms": {k: v.model_dump() for k, v in self.config.layer_forms.items()},
            }
        forms = next(iter(self.layers.values())).forms  # every layer's (peft_compatible), searched or stated
        return config | {
            "config_A_B": forms.A,
            "config_C": forms.C,
            "config_D_E": forms.D,
            "bias": "none",
            "init_weights": True,
        }


def _group(paths: dict[str, Any]) -> str:
    """'q_proj, v_proj (4 layers)': module-name suffixes in model order, with the layer count."""
    suffixes = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))
    return f"{', '.join(suffixes)} ({len(paths)} layer{'s' if len(paths) != 1 else ''})"
