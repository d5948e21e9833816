"""Measurements for looking inside adapters (shared by tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def saved_activation_bytes(fn: Callable[[], object], module: nn.Module) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward while ``fn`` runs.

    Counted by storage, so a tensor saved by several ops (or views of one) counts once; the
    module's own parameters are excluded, since they are held for backward anyway. This is what
    LoRA-FA saves: the adapter path keeping A x (r values per token) instead of x.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())
