"""Mixed precision without a second copy of the frozen weights (``train.frozen_weights``).

Under bf16 (or fp16) autocast every ``F.linear`` casts its fp32 weight to bf16, and when the input
needs a gradient autograd keeps that cast copy until the backward pass, to compute the input's
gradient from it. For a frozen base, which is nearly every weight of an adapter run, that is a
half-size second copy of the model held through every step, and a cast of the whole model every
forward: on the packaged SmolLM2-135M it made a bf16 quickstart peak above the fp32 one (issue 23).

Two ways out, both computing what autocast computes, bit for bit (tests/test_frozen_weights.py):

* ``hold`` (the default, ``HeldWeights``): through the training steps each frozen ``nn.Linear``
  weight is held in the autocast dtype, the very values autocast would round it to, so the cast is
  a no-op and autograd keeps the parameter itself. Its exact fp32 values wait in an unlinked file
  beside the run (the page cache's, not the process's memory) and come back for an fp32 eval and at
  the end of the pass, so evaluation, merging and the model a caller gets back see the weights as
  loaded. Half the frozen weights' memory and no per-step cast.
* ``recast`` (``uncopied_frozen_weights()``): the weights stay fp32; ``FrozenLinear`` computes the
  same forward but keeps a reference to the fp32 weight, not the copy, and casts it again in
  backward: one more cast of each frozen weight per micro-batch, so slower steps.

Weights that train, are not fp32 (a quantized or bf16-loaded base), are shards (FSDP's DTensors,
DeepSpeed's partitions), are tied to a module that is not a plain linear (an embedding), or that the
adapter reads itself (``Variant.weights_kept_as_loaded``: DoRA's norms, GLoRA's composed weight,
Delta-LoRA's updates of W) are left as they are.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class FrozenLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a frozen weight: the gradient reaches ``x`` only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.linear(x, weight, bias)  # under the caller's autocast, as the call it replaces
        ctx.save_for_backward(weight)  # the parameter itself: a reference, no copy
        ctx.compute_dtype, ctx.input_dtype = out.dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (weight,) = ctx.saved_tensors
        # Autograd's own backward: the output's gradient times the autocast copy of W, then back to
        # the input's dtype (the backward of autocast's cast of x).
        dtype = ctx.compute_dtype
        return grad.to(dtype).matmul(weight.to(dtype)).to(ctx.input_dtype), None, None


class _UncopiedFrozenWeights(TorchFunctionMode):
    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if self._applies(x, weight, bias):
                return FrozenLinear.apply(x, weight, bias)
        return func(*args, **kwargs)

    def _applies(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        return (
            torch.is_grad_enabled() and x.requires_grad
            and torch.is_autocast_enabled(self.device_type)
            and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and weight.dtype == torch.float32 and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
        )


def _linear_args(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple:
    """``F.linear``'s arguments, however they were passed."""
    return input, weight, bias


@contextmanager
def uncopied_frozen_weights(device_type: str, enabled: bool = True) -> Iterator[None]:
    """Inside: frozen fp32 weights of ``F.linear`` calls are not kept as autocast copies for backward."""
    if not enabled:
        yield
        return
    with _UncopiedFrozenWeights(device_type):
        yield


def own_the_rest(model: nn.Module, held: list[nn.Parameter]) -> None:
    """Copy every other CPU parameter and buffer of ``model`` into memory of its own.

    transformers loads a safetensors checkpoint on the CPU as views of one file mapping: the fp32
    weights are the mapping's pages, resident once read. Holding most of them in bf16 frees none of
    those pages while one tensor (an embedding, a norm) still points into the mapping, so the rest
    are copied out and the mapping goes with the last of them. A tensor already of its own is
    copied for nothing: a transient of its size.
    """
    skip = {id(p) for p in held}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in skip and tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


def holdable_weights(model: nn.Module, kept: set[int]) -> list[nn.Parameter]:
    """The frozen fp32 weights of ``model``'s plain ``nn.Linear`` layers that only those layers own
    (not tied to an embedding), less ``kept`` (ids: ``Variant.weights_kept_as_loaded``)."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, name))
    out, seen = [], set()
    for module in model.modules():
        weight = module._parameters.get("weight") if type(module) is nn.Linear else None
        if weight is None or id(weight) in seen or id(weight) in kept:
            continue
        seen.add(id(weight))
        if (type(weight) is nn.Parameter and weight.dtype == torch.float32 and not weight.requires_grad
                and all(type(m) is nn.Linear and n == "weight" for m, n in owners[id(weight)])):
            out.append(weight)
    return out


class HeldWeights:
    """``params`` held in ``dtype``; their exact values in an unlinked file in ``folder``.

    The file has no name from the moment it is made, so a run killed at any point leaves nothing
    behind; it is removed when ``release`` closes it. The held values live in one flat buffer, the
    parameters views into it: one allocation above glibc's mmap threshold, given back whole when
    the fp32 values return, where a few hundred per-weight tensors would leave holes in the heap.
    The fp32 values come back as mappings of the file, not copies: an eval on a heap that training
    left large (glibc keeps what it freed) adds no anonymous memory. Measured on the quickstart,
    copies at each eval peaked 0.7-1 GB higher than autocast's copies (``copy``).
    """

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, folder: Path | None = None):
        self.params, self.dtype = params, dtype
        self.device = params[0].device
        self._starts = [0]  # each parameter's first element in the flat buffer and the file
        for p in params:
            self._starts.append(self._starts[-1] + p.numel())
        self.numel = self._starts[-1]
        self._file = tempfile.TemporaryFile(prefix=".lorafam-frozen-", dir=folder)
        for p in params:
            self._file.write(memoryview(p.detach().cpu().contiguous().numpy()).cast("B"))
        self._file.flush()
        self._hold()

    def _hold(self) -> None:
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for p, start, stop in zip(self.params, self._starts, self._starts[1:]):
            view = flat[start:stop].view(p.shape)
            view.copy_(p.data)  # the autocast dtype's rounding, as autocast's own cast
            p.data = view  # frees the fp32 values: the file keeps them

    def _load(self) -> None:
        """Every parameter back to its exact fp32 values: on the CPU a copy-on-write mapping of its
        span of the file, as transformers loads a safetensors checkpoint (pages read as used, the
        page cache's; each parameter its own storage, so savers see no weights shared)."""
        for p, start in zip(self.params, self._starts):
            mapped = np.memmap(self._file, dtype=np.float32, mode="c", offset=start * 4, shape=tuple(p.shape))
            p.data = torch.from_numpy(mapped).to(self.device)

    @contextmanager
    def originals(self) -> Iterator[None]:
        """Inside: the weights as loaded (an fp32 eval); held again after."""
        self._load()
        try:
            yield
        finally:
            self._hold()

    def release(self) -> None:
        """The weights as loaded for good; the file is gone once nothing maps it."""
        if self._file.closed:
            return
        self._load()
        self._file.close()  # the mappings keep the (nameless) file until the model is freed
