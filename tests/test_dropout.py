"""Adapter dropout: masks that belong to the example (lorafam/adapters/dropout.py).

The layout tests (test_distributed.py) train with dropout on and compare adapters; these check the
mechanism itself: which rows get which masks, what the fallback is, and what backward keeps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tinyrun import adapter_section, make_model_folder

from lorafam.adapters import VARIANTS, build_variant
from lorafam.adapters.base import AdapterConfig
from lorafam.adapters.dropout import AdapterDropout, keyed, mix
from lorafam.modeling import load_model
from lorafam.recipe import ModelConfig

P = 0.25


def dropout(salt: int = 7) -> AdapterDropout:
    module = AdapterDropout(P).train()
    module.salt = salt
    return module


def dropped(module: AdapterDropout, x: torch.Tensor, keys: list[int]) -> torch.Tensor:
    with keyed(keys, length=16):
        return module(x)


def test_a_row_gets_its_masks_from_its_key_whatever_shares_its_batch_and_its_padding():
    module, x = dropout(), torch.ones(4, 16, 32)
    whole = dropped(module, x, [10, 11, 12, 13])
    # The same examples split into other micro-batches, in another order: the same rows.
    split = torch.cat([dropped(module, x[:1], [12]), dropped(module, x[:3], [10, 13, 11])])
    torch.testing.assert_close(split, whole[[2, 0, 3, 1]], rtol=0, atol=0)
    # Padded to 16 positions or to 9: the same mask on the positions both have.
    torch.testing.assert_close(dropped(module, x[:2, :9], [10, 11]), whole[:2, :9], rtol=0, atol=0)
    # Another key, or another module (salt), draws another mask.
    assert not torch.equal(dropped(module, x[:1], [14]), whole[:1])
    assert not torch.equal(dropped(dropout(salt=8), x[:1], [10]), whole[:1])


def test_keyed_masks_drop_at_rate_p_and_scale_what_they_keep():
    out = dropped(dropout(), torch.ones(8, 16, 512), list(range(8)))
    torch.testing.assert_close(out.unique(), torch.tensor([0.0, 1 / (1 - P)]))
    assert (out == 0).float().mean().item() == pytest.approx(P, abs=0.01)


def test_outside_a_keyed_forward_and_in_eval_it_is_plain_dropout():
    module, x = dropout(), torch.randn(3, 5, 8)
    torch.manual_seed(0)
    ours = module(x)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, nn.Dropout(P).train()(x), rtol=0, atol=0)
    with keyed([1, 2]):  # keys for another batch shape: not this forward's rows
        torch.manual_seed(0)
        torch.testing.assert_close(module(x), ours, rtol=0, atol=0)
    module.eval()
    with keyed([1, 2, 3]):
        assert module(x) is x


def test_backward_keeps_a_one_byte_mask_and_the_gradient_is_the_mask():
    x = torch.randn(4, 16, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dropped(dropout(), x, [1, 2, 3, 4])
    assert saved and all(t.dtype == torch.bool for t in saved), [t.dtype for t in saved]
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out != 0).float() / (1 - P))


@pytest.mark.parametrize("name", [n for n in VARIANTS if adapter_section(n)["dropout"] > 0])
def test_every_adapter_dropout_is_salted_by_its_module_path(name, tmp_path):
    model = load_model(ModelConfig(name=str(make_model_folder(tmp_path / "model"))))
    config = VARIANTS[name].Config.model_validate(adapter_section(name))
    assert isinstance(config, AdapterConfig)
    variant = build_variant(config).apply(model)
    salts = {}
    for path, layer in variant.layers.items():
        inside = [(n, m) for n, m in layer.named_modules() if isinstance(m, AdapterDropout)]
        assert len(inside) == 1, (path, inside)  # the variant's input dropout is this one
        salts[path] = inside[0][1].salt
        assert salts[path] == mix(path, inside[0][0])
    assert len(set(salts.values())) == len(salts) >= 2
