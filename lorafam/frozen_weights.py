"""Mixed precision without a second copy of the frozen weights.

Under bf16 (or fp16) autocast every ``F.linear`` casts its fp32 weight to bf16, and when the input
needs a gradient autograd keeps that cast copy until the backward pass, to compute the input's
gradient from it. For a frozen base, which is nearly every weight of an adapter run, that is a
half-size second copy of the model held through every step: on the packaged SmolLM2-135M it made
a bf16 quickstart peak above the fp32 one (issue 23).

``uncopied_frozen_weights()`` routes such calls through ``FrozenLinear``, which computes the same
forward under the same autocast but keeps a reference to the fp32 weight, not the copy, and casts
it again in backward, one layer at a time. The arithmetic is the same casts and the same matmuls
(tests/test_frozen_weights.py), so what a run trains does not change, only what it holds. It costs
one more cast of each frozen weight per micro-batch, a memory-bound pass: on the quickstart on a
2-core CPU 9-11% of the step for 0.2-0.35 GB of peak RSS (benchmarks/precision_memory.py), which is
why it is the recipe's choice (``train.recast_frozen_weights``), off by default.

Weights that train, are not fp32 (a quantized or bf16-loaded base), or are shards (FSDP's
DTensors, DeepSpeed's partitions) go through ``F.linear`` untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
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
