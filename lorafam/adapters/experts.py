"""Fused expert weights (mixture-of-experts): a low-rank update per expert of a 3-D parameter.

transformers 5 stores a mixture-of-experts layer's experts as one 3-D ``nn.Parameter`` per
projection (Qwen3-MoE and Mixtral: ``mlp.experts.gate_up_proj``, experts x 2·inter x hidden, and
``mlp.experts.down_proj``, experts x hidden x inter), read by the model's own dispatch (a loop over
the experts tokens were routed to, or a grouped matmul), never through an ``nn.Linear``. An adapter
of linear layers never sees them.

An ``ExpertLoRALayer`` wraps the module that owns such a parameter and gives each expert e its own
pair, W_e' = W_e + s B_e A_e. The update of every expert is formed at once, one batched matmul per
forward (``baddbmm``, no loop over experts), and the module's own forward runs on W' through
``torch.func.functional_call``: routing and dispatch stay the model's, and an expert no token was
routed to gets no gradient. The price is one temporary tensor the size of the fused weight per
forward, and its gradient in backward (as with PEFT's ``target_parameters``). There is no adapter
dropout on this path: the update is folded into the weight, so it has no input of its own to drop.

The tensors are laid out as PEFT's ``ParamWrapper`` lays them out, so PEFT loads the files:
``lora_A.weight`` is (experts·r) x in, rows e·r .. e·r+r-1 being A_e; ``lora_B.weight`` is
out x (r·experts), column j·experts + e being column j of B_e. Several parameters of one module nest
as PEFT nests them: the first in the module's parameter order innermost, at ``<module>.base_layer``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from lorafam.errors import LorafamError


def fused_parameters(model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(module path, parameter name, parameter) of every 3-D parameter, in model order."""
    for module_path, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.ndim == 3:
                yield module_path, name, param


def is_expert_weight(model: nn.Module, module_path: str, param: nn.Parameter) -> bool:
    """A fused expert weight: its first dimension is the owning module's ``num_experts``, the attribute
    transformers' expert modules (Qwen3-MoE, Mixtral, ...) carry."""
    module = model.get_submodule(module_path)
    return getattr(module, "num_experts", None) == param.shape[0]


def short_name(module_path: str, name: str) -> str:
    """'model.layers.3.mlp.experts' + 'down_proj' -> 'experts.down_proj' (what a recipe writes)."""
    return f"{module_path.rsplit('.', 1)[-1]}.{name}" if module_path else name


def find_expert_targets(
    model: nn.Module, target_parameters: list[str] | None, target_modules: list[str] | str
) -> list[tuple[str, str]]:
    """(module path, parameter name) of the fused parameters the recipe adapts, in model order.

    ``target_parameters`` None follows ``target_modules``: 'all-linear' takes every fused expert
    weight, a list of module names none. A list names parameters by the end of their path
    ('experts.gate_up_proj', 'down_proj'); each name must match at least one 3-D parameter.
    """
    fused = list(fused_parameters(model))
    if target_parameters is None:
        if target_modules != "all-linear":
            return []
        return [(path, name) for path, name, p in fused if is_expert_weight(model, path, p)]
    found: list[tuple[str, str]] = []
    for target in target_parameters:
        hits = [(path, name) for path, name, _ in fused if _matches(f"{path}.{name}" if path else name, target)]
        if not hits:
            have = sorted({short_name(path, name) for path, name, _ in fused})
            raise LorafamError(
                f"adapter.target_parameters: {target!r} matches no 3-D (fused expert) parameter in this model; "
                + (f"it has: {', '.join(have)}" if have else "it has none (adapt its linear layers with target_modules)")
            )
        found += hits
    return [(path, name) for path, name, _ in fused if (path, name) in set(found)]


def _matches(full: str, target: str) -> bool:
    return full == target or full.endswith("." + target)


class ExpertLoRALayer(nn.Module):
    """Wraps the module owning one fused parameter (or another such layer, for a second parameter of
    the same module); the outermost layer's forward runs the module once with every wrapped parameter
    replaced by its adapted weight."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.scaling = scaling
        self.r = r
        weight = self.base_weight()
        # transformers marks expert modules stored (experts, in, out) with ``is_transposed``.
        self.transposed = bool(getattr(self.experts_module(), "is_transposed", False))
        experts, out_features, in_features = self._canonical(weight).shape
        self.num_experts, self.out_features, self.in_features = experts, out_features, in_features
        kw = {"bias": False, "device": weight.device, "dtype": torch.float32}  # fp32 whatever W is (see LoRALayer)
        self.lora_A = nn.Linear(in_features, r * experts, **kw)
        self.lora_B = nn.Linear(r * experts, out_features, **kw)
        # False inside ``Variant.disabled()``: the forward uses the original weight.
        self.enabled = True

    # ----------------------------------------------------------------------------------------------
    def experts_module(self) -> nn.Module:
        """The model's own module holding the parameter, below any nested layers."""
        module = self.base_layer
        while isinstance(module, ExpertLoRALayer):
            module = module.base_layer
        return module

    def base_weight(self) -> torch.Tensor:
        """The frozen fused weight W, in the model's layout."""
        return getattr(self.experts_module(), self.parameter_name)

    @torch.no_grad()
    def set_base_weight(self, value: torch.Tensor) -> None:
        param = self.base_weight()
        param.copy_(value.to(param.dtype))

    def _canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` as (experts, out, in), a view."""
        return weight.transpose(-2, -1) if self.transposed else weight

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B: experts x out x r, A: experts x r x in), views of the PEFT-layout tensors."""
        A = self.lora_A.weight.view(self.num_experts, self.r, self.in_features)
        B = self.lora_B.weight.view(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        return B, A

    def delta_weight(self) -> torch.Tensor:
        """s B_e A_e for every expert, (experts, out, in), fp32."""
        B, A = self.factors()
        return self.scaling * torch.bmm(B, A)

    def adapted_canonical(self) -> torch.Tensor:
        """W' as (experts, out, in) in fp32 (or wider, if the adapter is)."""
        B, A = self.factors()
        dtype = torch.promote_types(A.dtype, torch.float32)
        base = self._canonical(self.base_weight()).to(dtype)
        return torch.baddbmm(base, B.to(dtype), A.to(dtype), alpha=self.scaling)

    def adapted_weight(self) -> torch.Tensor:
        """W' in the model's layout and dtype: what the forward computes with and merge writes. On a
        16-bit base the sum is rounded to it each forward, as PEFT does (the gradient is unaffected)."""
        weight = self.base_weight()
        return self._canonical(self.adapted_canonical()).to(weight.dtype)

    def original_weight(self) -> torch.Tensor:
        """The pre-trained W (PiSSA keeps a residual in the parameter and adds the rest back here)."""
        weight = self.base_weight()
        if not self.is_pissa:
            return weight
        principal = self.scaling * torch.bmm(self.pissa_B0, self.pissa_A0)
        original = self._canonical(weight).to(principal.dtype) + principal
        return self._canonical(original).to(weight.dtype)  # (a transpose is its own inverse)

    def forward(self, *args, **kwargs):
        weights: dict[str, torch.Tensor] = {}
        layer: nn.Module = self
        while isinstance(layer, ExpertLoRALayer):
            weights[layer.parameter_name] = layer.adapted_weight() if layer.enabled else layer.original_weight()
            layer = layer.base_layer
        return functional_call(layer, weights, args, kwargs)

    # ----------------------------------------------------------------------------------------------
    # PiSSA, per expert: the batched SVD of the fused weight.
    @property
    def is_pissa(self) -> bool:
        return hasattr(self, "pissa_A0")

    @torch.no_grad()
    def pissa_init(self) -> None:
        """Top-r SVD of each W_e into A_e, B_e (as ``LoRALayer.pissa_init``, batched over experts);
        W becomes the residual. A0, B0 are kept for the rank-2r file, as for linear layers."""
        weight = self._canonical(self.base_weight())
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LorafamError(f"adapter.init: pissa needs a float expert weight to take its SVD, got {weight.dtype}")
        r = self.r
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = torch.sqrt(s[:, :r] / self.scaling)  # (experts, r)
        A = root[:, :, None] * vh[:, :r]  # (experts, r, in)
        B = u[:, :, :r] * root[:, None, :]  # (experts, out, r)
        self._set_factors(B, A)
        self.register_buffer("pissa_A0", A.clone())
        self.register_buffer("pissa_B0", B.clone())
        residual = weight.float() - self.scaling * torch.bmm(B, A)
        self.set_base_weight(residual.transpose(-2, -1) if self.transposed else residual)

    def _set_factors(self, B: torch.Tensor, A: torch.Tensor) -> None:
        A_peft, B_peft = to_peft_layout(B, A)
        self.lora_A.weight.copy_(A_peft)
        self.lora_B.weight.copy_(B_peft)

    # ----------------------------------------------------------------------------------------------
    # What the adapter file holds
    def adapter_named_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's own tensors (a nested layer's are saved under its own path)."""
        out = {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}
        out.update({n: b for n, b in self.named_buffers() if not n.startswith("base_layer.")})
        if self.is_pissa:  # saved as the rank-2r LoRA on the original W, as for linear layers
            del out["pissa_A0"], out["pissa_B0"]
            B, A = self.factors()
            A_pair, B_pair = to_peft_layout(torch.cat([B, -self.pissa_B0], dim=2), torch.cat([A, self.pissa_A0], dim=1))
            out["lora_A.weight"], out["lora_B.weight"] = A_pair, B_pair
        return out

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from lorafam.distributed import copy_into

        tensors = dict(tensors)
        if self.is_pissa:
            B_pair, A_pair = from_peft_layout(tensors.pop("lora_B.weight").float(), tensors.pop("lora_A.weight").float(), self.num_experts)
            r = self.r
            B0, A0 = -B_pair[:, :, r:], A_pair[:, r:]
            if not (torch.equal(A0, self.pissa_A0) and torch.equal(B0, self.pissa_B0)):
                # Split differently from the trained run (see LoRALayer.load_adapter_tensors): take the
                # file's principal part out of the original W instead of ours.
                original = self._canonical(self.original_weight()).float()
                residual = original - self.scaling * torch.bmm(B0, A0)
                self.set_base_weight(residual.transpose(-2, -1) if self.transposed else residual)
                self.pissa_A0.copy_(A0)
                self.pissa_B0.copy_(B0)
            self._set_factors(B_pair[:, :, :r], A_pair[:, :r])
        live = {n: t for n, t in self.adapter_named_tensors().items()}
        for name, value in tensors.items():
            copy_into(live[name], value)


def to_peft_layout(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B: experts x out x R, A: experts x R x in) -> PEFT's (lora_A: experts·R x in, lora_B: out x R·experts)."""
    experts, out_features, rank = B.shape
    return A.reshape(experts * rank, -1), B.permute(1, 2, 0).reshape(out_features, rank * experts)


def from_peft_layout(B: torch.Tensor, A: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``to_peft_layout``: (B: experts x out x R, A: experts x R x in)."""
    rank = A.shape[0] // experts
    return B.reshape(B.shape[0], rank, experts).permute(2, 0, 1), A.reshape(experts, rank, -1)


def unwrap(layer: nn.Module) -> nn.Module:
    """The model's own module below a stack of nested ``ExpertLoRALayer``s."""
    return layer.experts_module() if isinstance(layer, ExpertLoRALayer) else layer
