"""Adapter dropout whose masks belong to the example, not to the batch layout.

A training step must not depend on its layout (batch_size x grad_accum x processes). ``nn.Dropout``
draws its masks from the global RNG in the order the rows come, so splitting the same global batch
into other micro-batches, or over other processes, gives every example other masks and the run
another adapter. Here each row's mask comes from its own generator, seeded from the row's key and
the dropout's salt: the trainer keys every training row by (seed, phase, step, example index) for
the forward and backward pass of its micro-batch (``keyed``), and ``Variant.apply`` salts each
dropout by its module path. The mask does not depend on how far the batch is padded either (rows
are padded on the right): on the CPU a row's draws fill its positions in order, so a row padded to
another length gets the same mask on its real tokens; on other devices the mask is drawn at the
data's full row length (data.max_length) and cut, because their kernels do not promise that order.

On the CPU the draws are numpy's SFC64 stream seeded by the row's key, 32 bits per value compared
with (1 - p) * 2^32: the same masks on every CPU, and 4x faster than torch's per-value
``bernoulli_`` (80 against 350 us for a 128 x 576 row here), which on the quickstart had cost 12% of
the step (120 adapted layers, a mask per row each). Other devices draw with their own generator
(``bernoulli_``): other, equally random masks from the same seeds.

Consequences worth knowing: gradient checkpointing's recomputation draws the same masks again
without replaying any RNG state, and a resumed run needs none for them. A dropout called twice in
one forward (weights shared across depth, as in ALBERT) applies the same mask both times. Outside a
keyed forward (a model called directly, as the PEFT-equality tests do), or on an input whose first
dimension is not the batch's rows, it is ``nn.Dropout``, drawing from the global RNG.

The mask is kept for backward as bool, 1 byte per value, where torch's CPU dropout keeps a float
noise tensor (4 bytes).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def mix(*parts: int | str) -> int:
    """A 63-bit seed from ``parts``, the same on every machine and process (not Python's ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class _Keys:
    rows: tuple[int, ...]
    length: int | None  # the data's full row length, for devices that draw at a fixed length


_active: _Keys | None = None  # not thread-local: a CUDA backward (and its recomputation) runs on another thread


@contextmanager
def keyed(rows: Sequence[int], length: int | None = None) -> Iterator[None]:
    """Adapter dropout inside draws row i's mask from ``rows[i]`` (one key per batch row)."""
    global _active
    previous, _active = _active, _Keys(tuple(rows), length)
    try:
        yield
    finally:
        _active = previous


class AdapterDropout(nn.Dropout):
    """``nn.Dropout`` on an adapter path's input, with per-example masks under ``keyed``."""

    def __init__(self, p: float):
        super().__init__(p)
        self.salt = 0  # set from the module path by Variant.apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(x, self.p, self.salt) if self.training else x


# Eager inside a compiled block (a graph break): per-row generators do not trace, and the keys,
# new every micro-batch, stay out of the compiled graph and its guards.
@torch.compiler.disable
def _dropout(x: torch.Tensor, p: float, salt: int) -> torch.Tensor:
    keys = _active
    if keys is None or x.dim() < 2 or x.shape[0] != len(keys.rows):
        return F.dropout(x, p, training=True)
    return x * _masks(tuple(x.shape), x.device, keys, salt, p) * (1.0 / (1.0 - p))


def _masks(shape: tuple[int, ...], device: torch.device, keys: _Keys, salt: int, p: float) -> torch.Tensor:
    if device.type == "cpu":
        return _cpu_masks(shape, keys.rows, salt, p)
    drawn = shape[1:]
    if keys.length is not None and len(shape) >= 3 and shape[1] <= keys.length:
        drawn = (keys.length, *shape[2:])
    mask = torch.empty((shape[0], *drawn), dtype=torch.bool, device=device)
    for row, key in enumerate(keys.rows):
        generator = torch.Generator(device=device)
        generator.manual_seed(mix(key, salt))
        mask[row].bernoulli_(1.0 - p, generator=generator)
    return mask[:, : shape[1]] if drawn != shape[1:] else mask


def _cpu_masks(shape: tuple[int, ...], rows: Sequence[int], salt: int, p: float) -> torch.Tensor:
    """Keep-masks of ``shape``, row i from SFC64 seeded by (rows[i], salt): value j kept when the
    stream's j-th 32-bit word is below (1 - p) * 2^32 (keep probability exact to 2^-32)."""
    n = math.prod(shape[1:])
    threshold = np.uint32(min(round((1.0 - p) * 2**32), 2**32 - 1))
    mask = np.empty((len(rows), n), dtype=np.bool_)
    for row, key in enumerate(rows):
        words = np.random.SFC64(mix(key, salt)).random_raw((n + 1) // 2).view(np.uint32)[:n]
        np.less(words, threshold, out=mask[row])
    return torch.from_numpy(mask).view(shape)


def salt_dropouts(layer: nn.Module, path: str) -> None:
    """Give each adapter dropout inside ``layer`` (at ``path`` in the model) its own salt."""
    for name, module in layer.named_modules():
        if isinstance(module, AdapterDropout):
            module.salt = mix(path, name)
