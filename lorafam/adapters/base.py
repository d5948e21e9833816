"""The one interface every LoRA-family variant implements.

A variant is a small file with three things:

* a ``Config`` (pydantic, strict) holding its recipe keys under ``adapter:``;
* an ``AdapterLayer`` subclass that wraps one frozen ``nn.Linear`` (forward, delta weight, merge);
* a ``Variant`` subclass that builds those layers and owns anything that spans layers: shared
  tensors (VeRA), optimizer groups (LoRA+), an extra loss term (AdaLoRA), a per-step hook
  (Delta-LoRA, AdaLoRA), and the PEFT-format ``adapter_config.json``.

The trainer, save, merge and eval code only talk to this interface; nothing outside ``adapters/``
looks at a variant's name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from lorafam.adapters.dropout import AdapterDropout, salt_dropouts
from lorafam.adapters.experts import ExpertLoRALayer, find_expert_targets, fused_parameters, short_name, unwrap
from lorafam.distributed import copy_into, full_tensor
from lorafam.errors import LorafamError

# Prefix PEFT puts in front of module paths in adapter_model.safetensors; we use the same so that
# `peft.PeftModel.from_pretrained` reads our files.
PEFT_PREFIX = "base_model.model."


class AdapterConfig(BaseModel):
    """Keys shared by every variant (the ``adapter:`` section of a recipe)."""

    model_config = ConfigDict(extra="forbid")

    variant: str = Field(description="Which member of the family: see `lorafam.adapters.VARIANTS`.")
    r: int = Field(8, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter path's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Linear layers to adapt: names matched against the end of each module path, "
        "or 'all-linear' for every linear layer except the output head, and on a mixture-of-experts model "
        "every expert of its fused expert weights (see target_parameters); the router stays frozen.",
    )
    target_parameters: list[str] | None = Field(
        None,
        description="Fused 3-D expert weights to adapt with a low-rank update per expert (mixture-of-experts "
        "models, e.g. ['experts.gate_up_proj', 'experts.down_proj']): names matched against the end of each "
        "parameter path. null: follow target_modules (all-linear takes every fused expert weight, a list none); "
        "[]: none. Only variants that support it (lora, lora_plus, lora_fa, dora); no adapter dropout on them.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Extra modules trained in full and saved with the adapter. The classification "
        "head of a sequence-classification model is added automatically.",
    )

    def check_recipe(self, recipe: Any) -> None:
        """Checks of this section against the rest of the recipe (e.g. AdaLoRA's schedule against
        train.max_steps), run when the recipe loads; raise ValueError. Default: none."""


class AdapterLayer(nn.Module):
    """Wraps a frozen base ``nn.Linear``; subclasses add the trainable update.

    The base layer is kept as ``base_layer`` (PEFT's attribute name) so module paths, and hence
    the saved keys, line up with PEFT's.
    """

    #: True where a training step reads W itself (a norm, a composed weight, an update written into
    #: it), not only through ``base_layer(x)``: mixed precision then leaves W in its own dtype instead
    #: of holding it in the autocast dtype (``Variant.weights_kept_as_loaded``, lorafam.frozen_weights).
    reads_base_weight: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W as a dense (out, in) float tensor.

        Use this, never ``base_layer.weight``, wherever a variant needs W itself (a norm, an SVD,
        a merge): on a quantized base ``base_layer.weight`` holds packed 4-bit codes, and this
        dequantizes them on the fly (a temporary, no full-precision copy is kept). On an
        unquantized base it is ``base_layer.weight`` itself, no copy. Layers that only need W x
        should call ``base_layer(x)``, which works on every base.
        """
        from lorafam.quant import dequantized_weight

        return dequantized_weight(self.base_layer)

    def set_base_weight(self, value: torch.Tensor) -> None:
        """Overwrite W (e.g. PiSSA's residual); a quantized base re-quantizes it with its own settings."""
        from lorafam.quant import set_weight

        set_weight(self.base_layer, value)

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, shape (out, in), in the base weight's dtype."""
        raise NotImplementedError

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update's low-rank pair (B: out x r, A: r x in) as trained, or None where there is none.

        What the LoRA paper's subspace analysis compares (its section 7.2): A's right-singular
        vectors span the input directions the update reads, B's left-singular vectors the output
        directions it writes. For LoRA the whole update is scale * B @ A; a variant whose update
        adds more on top (DoRA's row rescaling, Delta-LoRA's moved W) returns the pair it trains.
        Default: None (e.g. GLoRA, whose update is no single product).
        """
        return None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the original pre-trained layer computes on ``x``, with the adapter out of the way.

        Default ``base_layer(x)``. A layer whose init rewrote W (PiSSA keeps the residual there)
        overrides this to add back what it took out.
        """
        return self.base_layer(x)

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes. Default: W + delta weight.

        On a quantized base W is the dequantized weight the adapter was trained against, and the
        merged layer is float (the dtype the base was quantized from).
        """
        weight = self.base_weight()
        bias = self.base_layer.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        linear.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight + self.delta_weight().to(weight.dtype))
            if bias is not None:
                linear.bias.copy_(bias.to(weight.dtype))
        return linear

    def adapter_named_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the adapter file for this layer (relative names), base weights excluded."""
        out = {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}
        out.update({n: b for n, b in self.named_buffers() if not n.startswith("base_layer.")})
        return out

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set this layer from tensors named and shaped as ``adapter_named_tensors`` gives them.

        Default: copy into them. A layer whose saved form is not its live form (PiSSA saves a
        converted rank-2r LoRA) overrides this.
        """
        live = self.adapter_named_tensors()
        for name, value in tensors.items():
            copy_into(live[name], value)


class _BaseOnly(nn.Module):
    """Stands in for an adapter layer inside ``Variant.disabled()``: the base function only."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.base_forward(x)


def dropout_module(p: float) -> nn.Module:
    """Dropout on an adapter path's input; its masks follow the example (lorafam.adapters.dropout)."""
    return AdapterDropout(p) if p > 0 else nn.Identity()


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and for bitsandbytes' quantized linears (which subclass it)."""
    return isinstance(module, nn.Linear)


class Variant:
    """One adapter method applied to one model. Subclasses set ``name``, ``Config`` and ``make_layer``."""

    name: ClassVar[str]
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: Paper the method comes from, shown in `lorafam inspect` and the README.
    paper: ClassVar[str] = ""
    #: The ``peft_type`` written to adapter_config.json; None where PEFT has no such method.
    peft_type: ClassVar[str | None] = None
    #: True where the method can run on a 4-bit quantized base (it never writes into W). Layers
    #: that need W itself get it dequantized from ``AdapterLayer.base_weight()``.
    supports_quantized_base: ClassVar[bool] = True
    #: Why not, when ``supports_quantized_base`` is False: shown in the recipe-load error.
    quantized_base_reason: ClassVar[str] = (
        "it updates the base weights W in place during training, and a quantized base cannot hold "
        "such small updates"
    )
    #: True where the method trains with its parameters sharded across processes (FSDP2, ZeRO-3):
    #: nothing it does between steps needs a whole tensor or gradient of another process.
    supports_sharding: ClassVar[bool] = True
    #: Why not, when ``supports_sharding`` is False: shown in the error.
    sharding_reason: ClassVar[str] = ""
    #: True while a step may leave some trainable parameters out of the graph (GLoRA's supernet
    #: trains one form per tensor per step): data parallelism must then not wait for their gradients.
    leaves_parameters_unused: ClassVar[bool] = False
    #: True where every layer's ``low_rank_factors`` returns the pair it trains, so
    #: `lorafam analyze subspace` can compare two runs of it.
    has_low_rank_factors: ClassVar[bool] = False
    #: True where training decides ranks or layers and ``write_artifacts`` draws them
    #: (`lorafam analyze ranks`).
    draws_artifacts: ClassVar[bool] = False
    #: Attribute of the model root holding the one module shared by all layers (VeRA's
    #: projections, LoRA-drop's shared pairs), or None; see ``set_shared_module``.
    shared_attr: ClassVar[str | None] = None
    #: True where the method has a per-expert form for fused 3-D expert weights (``make_expert_layer``).
    supports_expert_parameters: ClassVar[bool] = False
    #: Why not, when ``supports_expert_parameters`` is False: shown in the error.
    expert_parameters_reason: ClassVar[str] = "lorafam implements its update for linear layers only"

    def __init__(self, config: AdapterConfig):
        self.config = config
        self.model: nn.Module | None = None
        self.layers: dict[str, AdapterLayer] = {}
        #: Fused expert weights adapted, by the path of the layer holding each (PEFT's nesting: a
        #: module's second parameter wraps its first, which then sits at ``<module>.base_layer``).
        self.expert_layers: dict[str, ExpertLoRALayer] = {}
        self.saved_modules: dict[str, nn.Module] = {}
        self._target_notes: list[str] = []

    # ----------------------------------------------------------------------------------------------
    # Building
    @property
    def scaling(self) -> float:
        return self.config.alpha / self.config.r

    def make_layer(self, base_layer: nn.Linear, path: str) -> AdapterLayer:
        raise NotImplementedError

    def make_expert_layer(self, base: nn.Module, parameter_name: str, path: str) -> ExpertLoRALayer:
        """The layer adapting fused parameter ``parameter_name`` of ``base`` (the model's expert module or
        a layer already wrapping it); ``path`` is the parameter's path. Variants with
        ``supports_expert_parameters`` implement it."""
        raise NotImplementedError

    def attach(self, model: nn.Module) -> None:
        """Called once after all layers are injected: create state shared across layers here."""

    def set_shared_module(self, module: nn.Module) -> None:
        """Register ``module`` once, on the model root, as ``shared_attr``: .to(device) moves it,
        model.parameters() yields each shared tensor once, its state saves under
        ``base_model.model.<shared_attr>.`` (``shared_state_dict``) and ``merge`` removes it. Layers
        hold it as a plain attribute, not a submodule, so it is not saved or moved once per layer."""
        self.model.register_module(self.shared_attr, module)

    def shared_module(self) -> nn.Module | None:
        """The module ``set_shared_module`` registered; None before it (or after ``merge``)."""
        return getattr(self.model, self.shared_attr, None) if self.shared_attr else None

    def apply(self, model: nn.Module, head_modules: list[str] = ()) -> "Variant":
        """Freeze ``model``, wrap its target linears in adapter layers, unfreeze saved modules."""
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        paths = find_targets(model, self.config.target_modules, head_modules)
        for path in paths:
            parent, attr = _parent_of(model, path)
            base_layer = getattr(parent, attr)
            layer = self.make_layer(base_layer, path)
            salt_dropouts(layer, path)
            # New modules start in train mode; follow the model's mode so dropout is off in eval.
            layer.train(base_layer.training)
            setattr(parent, attr, layer)
            self.layers[path] = layer
        self._apply_experts(model)
        self.attach(model)
        for name in list(self.config.modules_to_save) + list(head_modules):
            path = _find_module_path(model, name)
            if path is None:
                raise LorafamError(
                    f"adapter.modules_to_save: no module named {name!r} in the model; "
                    "name a module path such as 'classifier' or 'score'"
                )
            module = model.get_submodule(path)
            for p in module.parameters():
                p.requires_grad_(True)
            self.saved_modules[path] = module
        return self

    def weights_kept_as_loaded(self) -> set[int]:
        """ids of the frozen parameters inside this adapter that mixed precision must not hold in the
        autocast dtype (lorafam.frozen_weights): the adapter's own (LoRA-FA's A, shared modules), the
        fused expert weights, and the base weights of layers with ``reads_base_weight``. A base
        weight its layer uses only through ``base_layer(x)`` is rounded to the autocast dtype in that
        call anyway, so holding it so changes nothing a step computes."""
        kept = set()
        for layer in self.layers.values():
            kept.update(id(p) for name, p in layer.named_parameters()
                        if layer.reads_base_weight or not name.startswith("base_layer."))
        for module in [*self.expert_layers.values(), *([self.shared_module()] if self.shared_module() else [])]:
            kept.update(id(p) for p in module.parameters())
        return kept

    def _apply_experts(self, model: nn.Module) -> None:
        """Wrap the fused expert weights the recipe targets; note the 3-D weights left frozen."""
        cfg = self.config
        targets = find_expert_targets(model, cfg.target_parameters, cfg.target_modules)
        if targets and not self.supports_expert_parameters:
            able = ", ".join(_expert_capable())
            key = "adapter.target_parameters" if cfg.target_parameters else "adapter.target_modules: all-linear"
            raise LorafamError(
                f"{key}: {self.name} cannot adapt fused expert weights ({targets[0][0]}.{targets[0][1]} and "
                f"{len(targets) - 1} more): {self.expert_parameters_reason}; set adapter.target_parameters: [] to "
                f"leave them frozen, or pick a variant that adapts them: {able}"
            )
        wrapped: dict[str, int] = {}  # module path -> how many of its parameters are wrapped
        for module_path, name in targets:
            parent, attr = _parent_of(model, module_path)
            base = getattr(parent, attr)
            layer = self.make_expert_layer(base, name, f"{module_path}.{name}")
            layer.train(base.training)
            setattr(parent, attr, layer)
            wrapped[module_path] = wrapped.get(module_path, 0) + 1
        for module_path, count in wrapped.items():
            layer = model.get_submodule(module_path)
            for depth in range(count):  # outermost first, as PEFT names them
                self.expert_layers[module_path + ".base_layer" * depth] = layer
                layer = layer.base_layer
        self._target_notes = self._coverage_notes(model)

    def _coverage_notes(self, model: nn.Module) -> list[str]:
        """Never silent about the large weights an adapter leaves alone, nor what it does on them."""
        notes = []
        frozen: dict[str, list[int]] = {}
        adapted = {id(layer.base_weight()) for layer in self.expert_layers.values()}
        for module_path, name, param in fused_parameters(model):
            if id(param) in adapted:
                continue
            module_path = module_path.split(".base_layer")[0]  # as the recipe names it
            frozen.setdefault(short_name(module_path, name), []).append(param.numel())
        if frozen:
            names = sorted(frozen)
            count = sum(len(v) for v in frozen.values())
            params = sum(sum(v) for v in frozen.values())
            # The whole list to write: the ones adapted now, and these.
            suggested = sorted(set(self.expert_parameter_names()) | set(names))
            key = f"adapter.target_parameters: [{', '.join(suggested)}]"
            how = (f"{key} would adapt them" if self.supports_expert_parameters
                   else f"{self.name} cannot adapt them; {', '.join(_expert_capable())} can, with {key}")
            notes.append(f"not adapted: {count} fused 3-D weight(s), {params:,} parameters ({', '.join(names)}); {how}")
        if self.expert_layers and _has_quantized_layers(model):
            weights = [layer.base_weight() for layer in self.expert_layers.values()]
            notes.append(
                f"the fused expert weights stay {str(weights[0].dtype).removeprefix('torch.')} on this quantized "
                f"base ({sum(w.numel() for w in weights):,} parameters): bitsandbytes quantizes linear layers only"
            )
        if self.expert_layers and self.config.dropout > 0:
            notes.append(
                f"adapter.dropout {self.config.dropout:g} applies to the linear layers only: an update folded "
                "into fused expert weights has no input of its own to drop"
            )
        return notes

    def target_notes(self) -> list[str]:
        """What the targets leave out or treat differently (3-D weights left frozen, no dropout on
        experts), decided from the model; `train` and `inspect` print them with ``notes()``."""
        return list(self._target_notes)

    # ----------------------------------------------------------------------------------------------
    # Before training: a variant that decides its structure from a preliminary run (LoRA-drop)
    # does it here. ``fit(dataset, steps, phase)`` runs the one training loop on ``dataset`` (rows
    # already tokenized) for ``steps`` optimizer steps (None: one pass) over this variant's current
    # parameters, and returns the loop's TrainResult.
    def prepare(self, fit: Callable[[Any, int | None, str], Any], train_data: Any, seed: int) -> dict[str, Any]:
        """Returns facts to record in run.json (e.g. importances). Default: nothing to do."""
        return {}

    def restore(self, prepared: dict[str, Any]) -> None:
        """Rebuild the structure ``prepare`` chose (from run.json) before loading saved weights."""

    # ----------------------------------------------------------------------------------------------
    # Training hooks, called by the trainer in this order each optimizer step:
    #   loss = task loss + sum(extra_losses()); backward; clip; optimizer.step(); after_step()
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups. Default: every trainable parameter at the base lr."""
        return [{"params": self.trainable_parameters(), "lr": lr, "weight_decay": weight_decay}]

    def extra_losses(self) -> dict[str, torch.Tensor]:
        """Named terms added to the task loss (and logged), e.g. AdaLoRA's orthogonality penalty."""
        return {}

    def after_step(self, step: int, total_steps: int) -> dict[str, float]:
        """Runs after each optimizer step, before gradients are zeroed. Returns values to log."""
        return {}

    def train_state(self) -> dict[str, torch.Tensor]:
        """Variant state beyond the adapter weights that a resumed run needs (e.g. AdaLoRA scores)."""
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise LorafamError(f"checkpoint holds variant state this {self.name!r} run does not know")

    # ----------------------------------------------------------------------------------------------
    # Saving, loading, merging
    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter keyed as PEFT keys them: the live tensors, not copies."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.adapted_layers():
            for name, tensor in layer.adapter_named_tensors().items():
                out[f"{PEFT_PREFIX}{path}.{name}"] = tensor
        for path, module in self.saved_modules.items():
            for name, tensor in module.state_dict(keep_vars=True).items():
                out[f"{PEFT_PREFIX}{path}.{name}"] = tensor
        out.update(self.shared_state_dict())
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What the adapter file holds: ``live_tensors`` detached (a variant may save another layout).

        Sharded parameters (FSDP2) are gathered whole, so the file is the same whatever the number
        of processes; that is a collective, which every process must call.
        """
        return {k: full_tensor(v.detach()).contiguous() for k, v in self.live_tensors().items()}

    def shared_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that belong to no single layer, with their keys. Default: the shared module's
        state under its path (LoRA-drop's shared pairs); none without one."""
        shared = self.shared_module()
        if shared is None:
            return {}
        return {f"{PEFT_PREFIX}{self.shared_attr}.{k}": v for k, v in shared.state_dict(keep_vars=True).items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise LorafamError(f"adapter weights do not match this recipe's adapter ({detail})")
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise LorafamError(
                    f"adapter weight {key} has shape {tuple(value.shape)}, the recipe builds "
                    f"{tuple(own[key].shape)}"
                )
        layer_keys: set[str] = set()
        for path, layer in self.adapted_layers():
            keys = {name: f"{PEFT_PREFIX}{path}.{name}" for name in layer.adapter_named_tensors()}
            layer.load_adapter_tensors({name: state[key] for name, key in keys.items()})
            layer_keys.update(keys.values())
        targets = self.live_tensors()
        for key, value in state.items():
            if key not in layer_keys:
                copy_into(targets[key], value)

    def adapted_layers(self) -> Iterator[tuple[str, AdapterLayer | ExpertLoRALayer]]:
        """(path, layer) of every adapter layer: linear layers, then fused expert weights."""
        yield from self.layers.items()
        yield from self.expert_layers.items()

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Inside the block the model computes its base function: every adapter layer is bypassed.

        Each adapter layer is swapped out of the model for a stand-in that calls its
        ``base_forward`` (W0 x + b, the original W for PiSSA), and swapped back on exit, so the same
        loaded model answers as the base and as the adapted model (``lorafam generate
        --compare-base``) without a second copy of the weights. Modules trained in full
        (``modules_to_save``) keep their trained values: the base's own copies are not kept.
        """
        swapped: list[tuple[nn.Module, str, AdapterLayer]] = []
        try:
            for path, layer in self.layers.items():
                parent, attr = _parent_of(self.model, path)
                setattr(parent, attr, _BaseOnly(layer))
                swapped.append((parent, attr, layer))
            for expert_layer in self.expert_layers.values():
                expert_layer.enabled = False  # forward on the original weights (PiSSA's added back)
            yield self.model
        finally:
            for parent, attr, layer in swapped:
                setattr(parent, attr, layer)
            for expert_layer in self.expert_layers.values():
                expert_layer.enabled = True

    def merge(self) -> nn.Module:
        """Replace every adapter layer by a plain linear computing the same function."""
        for path, layer in self.layers.items():
            parent, attr = _parent_of(self.model, path)
            setattr(parent, attr, layer.merged())
        self.layers = {}
        with torch.no_grad():
            adapted = {path: layer.adapted_weight() for path, layer in self.expert_layers.items()}
            for path, layer in self.expert_layers.items():
                layer.base_weight().copy_(adapted[path])  # W' exactly as the forward computed it
            outermost = [path for path in self.expert_layers if not isinstance(_parent_of(self.model, path)[0], ExpertLoRALayer)]
            for path in outermost:
                parent, attr = _parent_of(self.model, path)
                setattr(parent, attr, unwrap(self.expert_layers[path]))
        self.expert_layers = {}
        if self.shared_module() is not None:
            # The merged model is a plain transformers model: no shared module left in it.
            delattr(self.model, self.shared_attr)
        return self.model

    def peft_config(self, base_model_name: str, task_type: str) -> dict[str, Any]:
        """adapter_config.json. Variants PEFT can read override this with PEFT's field names."""
        cfg = self.config
        return {
            "peft_type": self.peft_type or f"LORAFAM_{self.name.upper()}",
            "task_type": task_type,
            "base_model_name_or_path": base_model_name,
            "r": cfg.r,
            # None (not []) where only parameters are adapted: PEFT then matches target_parameters alone.
            "target_modules": sorted({p.rsplit(".", 1)[-1] for p in self.layers}) or None,
            **({"target_parameters": self.expert_parameter_names()} if self.expert_layers else {}),
            "modules_to_save": list(self.saved_modules) or None,
            "inference_mode": True,
        }

    def expert_parameter_names(self) -> list[str]:
        """The adapted fused parameters as target_parameters names them ('experts.down_proj')."""
        names = set()
        for path, layer in self.expert_layers.items():
            module_path = path.split(".base_layer")[0]
            names.add(short_name(module_path, layer.parameter_name))
        return sorted(names)

    # ----------------------------------------------------------------------------------------------
    # Reporting
    def notes(self) -> list[str]:
        """Lines the user should read once the adapter is built: decisions the variant made from the
        model itself (e.g. GLoRA terms left out where a layer cannot hold them). `train` and
        `inspect` print them. Default: none."""
        return []

    def report(self) -> list[str]:
        """Extra lines for `lorafam inspect` (e.g. AdaLoRA's final ranks). Default: none."""
        return []

    def write_artifacts(self, folder: Path) -> list[Path]:
        """Extra files for the finished run folder (e.g. AdaLoRA's rank plot). Default: none."""
        return []

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the adapted model."""
        from lorafam.quant import parameter_count

        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(parameter_count(p) for p in self.model.parameters())
        return trainable, total


# --------------------------------------------------------------------------------------------------
# Module lookup


def find_targets(model: nn.Module, targets: list[str] | str, exclude: list[str] = ()) -> list[str]:
    """Module paths of the linear layers ``targets`` names. Raises if none match."""
    head = set(exclude) | set(_output_head_names(model))
    linears = [name for name, m in model.named_modules() if name and is_linear(m)]
    if targets == "all-linear":
        found = [n for n in linears if not any(n == h or n.endswith("." + h) for h in head)]
    else:
        found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise LorafamError(
            f"adapter.target_modules {targets!r} matches no linear layer in this model; "
            f"it has: {', '.join(suffixes[:12])}"
        )
    return found


def _has_quantized_layers(model: nn.Module) -> bool:
    from lorafam.quant import has_quantized_layers

    return has_quantized_layers(model)


def _expert_capable() -> list[str]:
    from lorafam.adapters import VARIANTS

    return [name for name, v in VARIANTS.items() if v.supports_expert_parameters]


def _output_head_names(model: nn.Module) -> list[str]:
    """The output embedding (LM head), never adapted by 'all-linear' (as in PEFT)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return [name for name, m in model.named_modules() if head is not None and m is head]


def _find_module_path(model: nn.Module, name: str) -> str | None:
    for path, _ in model.named_modules():
        if path and (path == name or path.endswith("." + name)):
            return path
    return None


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """nn.Linear's default init (what LoRA's A starts from in the reference implementation)."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def grid_positions(paths: list[str]) -> dict[str, tuple[str, str]]:
    """Each module path as (block index, shortest module name that is unique among ``paths``).

    'model.layers.3.self_attn.q_proj' -> ('3', 'q_proj'); a path with no block index gets '-' as its
    layer. The (layer, module) grid of rank maps, importance maps and per-module analyses.
    """
    split = {path: _layer_and_rest(path) for path in paths}
    rests = [rest for _, rest in split.values()]
    return {path: (layer, _shortest_unique_suffix(rest, rests)) for path, (layer, rest) in split.items()}


def _layer_and_rest(path: str) -> tuple[str, str]:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if re.fullmatch(r"\d+", part) and i + 1 < len(parts):
            return part, ".".join(parts[i + 1 :])
    return "-", path


def _shortest_unique_suffix(rest: str, all_rests: list[str]) -> str:
    parts = rest.split(".")
    others = {r for r in all_rests if r != rest}
    for k in range(1, len(parts) + 1):
        suffix = ".".join(parts[-k:])
        if not any(o == suffix or o.endswith("." + suffix) for o in others):
            return suffix
    return rest
