"""The shared table: every registered variant, on a Llama-style and a BERT-style tiny model.

A new variant is covered here the moment it is registered; its only entry in this file is its
trainable-parameter formula (the paper's count), which a new variant must add.
"""

from __future__ import annotations

import typing

import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, LlamaForCausalLM

from lorafam.adapters import VARIANTS, Variant, build_variant
from lorafam.adapters.base import PEFT_PREFIX
from lorafam.modeling import head_modules
from lorafam.run import load_tensors, save_tensors

R = 4


def adapter_config(name: str):
    return VARIANTS[name].Config(variant=name, r=R, alpha=8, target_modules="all-linear")


def make_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
        task = "causal-lm"
    else:
        model = BertForSequenceClassification(tiny_bert_config(vocab_size=128, num_labels=3))
        task = "sequence-classification"
    model.eval()
    return model, task


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 12), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if arch == "llama" else torch.tensor([0, 2])
    return batch


def adapted(name: str, arch: str):
    model, task = make_model(arch)
    variant = build_variant(adapter_config(name)).apply(model, head_modules(model, task))
    return model, variant


def perturb(variant) -> None:
    """Non-zero adapter weights everywhere, so merge and save/load compare something real."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in variant.layers.values():
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer.") and p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# The trainable parameters each method adds to one adapted (out x in) linear layer, from its paper.
def per_layer_params(name: str, cfg, out_f: int, in_f: int, bias: bool = False) -> int:
    r = cfg.r
    formulas = {
        "lora": lambda: r * (in_f + out_f),
        "lora_plus": lambda: r * (in_f + out_f),  # plain LoRA; only the lrs differ
        "lora_fa": lambda: out_f * r,  # B only; A is frozen
        "vera": lambda: r + out_f,  # lambda_d and lambda_b; A and B are frozen and shared
        "dora": lambda: r * (in_f + out_f) + out_f,  # LoRA + the magnitude vector
        "delta_lora": lambda: r * (in_f + out_f),  # LoRA; W moves without gradient or optimizer state
        # default forms A, B: lora; C: lora (in x r, r x 1); D, E: constant (D only with a base bias)
        "glora": lambda: 2 * r * (in_f + out_f) + r * (in_f + 1) + int(bias) + 1,
        "adalora": lambda: r * (in_f + out_f) + r,  # P, Q and Lambda at init_r (= r); ranknum is a buffer
        # before prepare() (this table never calls it) every layer has its own LoRA pair; after it,
        # tests/test_lora_drop.py counts each shared pair once
        "lora_drop": lambda: r * (in_f + out_f),
    }
    assert name in formulas, f"add {name}'s trainable-parameter formula to tests/test_variants.py"
    return formulas[name]()


ARCHS = ["llama", "bert"]
NAMES = sorted(VARIANTS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_output_equals_base_at_init(name, arch):
    base, _ = make_model(arch)
    model, variant = adapted(name, arch)
    assert variant.layers, "no layer was adapted"
    batch = inputs(arch)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_trainable_parameters_match_formula(name, arch):
    model, variant = adapted(name, arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for path in variant.saved_modules for n, _ in model.named_parameters() if n.startswith(path + ".")}
    assert not any("base_layer" in n for n in trainable), "a frozen base weight is trainable"
    expected = sum(
        per_layer_params(name, variant.config, l.out_features, l.in_features, l.base_layer.bias is not None)
        for l in variant.layers.values()
    )
    adapter_count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)
    assert adapter_count == expected
    if arch == "bert":
        assert head, "the classification head must be trained"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, arch, tmp_path):
    model, variant = adapted(name, arch)
    perturb(variant)
    path = tmp_path / "adapter_model.safetensors"
    state = variant.adapter_state_dict()
    assert all(k.startswith("base_model.") for k in state)
    save_tensors(path, state)

    fresh, fresh_variant = adapted(name, arch)
    batch = inputs(arch)
    assert not torch.allclose(logits(fresh, batch), logits(model, batch))
    fresh_variant.load_adapter_state_dict(load_tensors(path))
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_merge_gives_equal_logits(name, arch):
    model, variant = adapted(name, arch)
    perturb(variant)
    batch = inputs(arch)
    before = logits(model, batch)
    base, _ = make_model(arch)
    assert not torch.allclose(before, logits(base, batch), atol=1e-3), "perturbed adapter changes nothing"
    merged = variant.merge()
    assert not any("base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_optimizer_steps_lower_the_loss(name, arch):
    model, variant = adapted(name, arch)
    model.train()
    torch.manual_seed(3)
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.0))
    batch = inputs(arch)
    losses = []
    for step in range(1, 41):
        loss = model(**batch).loss
        total = loss + sum(variant.extra_losses().values())
        total.backward()
        optimizer.step()
        variant.after_step(step, 40)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.97, losses


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", NAMES)
def test_saved_keys_are_the_ones_peft_names(name, arch, tmp_path):
    """Where our adapter_config.json names a PEFT method, PEFT itself, given that config, builds a model
    whose adapter state dict has exactly our keys and shapes. Other files say they are lorafam's own."""
    import json

    import peft

    from lorafam.recipe import validate_recipe
    from lorafam.run import save_adapter

    model, variant = adapted(name, arch)
    task = "causal-lm" if arch == "llama" else "sequence-classification"
    spec = validate_recipe({"model": {"name": "tiny", "task": task}, "adapter": variant.config.model_dump(),
                            "data": {"train": "x.jsonl"}, "output_dir": str(tmp_path)})
    save_adapter(tmp_path, variant, spec)
    ours = {k: tuple(v.shape) for k, v in variant.adapter_state_dict().items()}
    for path in variant.layers:
        assert any(k.startswith(f"{PEFT_PREFIX}{path}.") for k in ours), path
    peft_type = json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"]
    if peft_type.startswith("LORAFAM_"):  # PEFT has no such layout (Delta-LoRA, LoRA-drop, GLoRA without biases)
        assert peft_type not in {t.value for t in peft.PeftType}
        return
    config = peft.PeftConfig.from_pretrained(str(tmp_path))
    base, _ = make_model(arch)
    peft_model = peft.get_peft_model(base, config)
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(peft_model).items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs


@pytest.mark.parametrize("name", NAMES)
def test_exactly_the_listed_variants_refuse_dropout(name):
    """tests/tinyrun.py runs every other variant with dropout on; a variant that starts or stops
    refusing it must update that list (and so the resume tests' claim 'with dropout on')."""
    from pydantic import ValidationError
    from tinyrun import REFUSES_DROPOUT

    assert REFUSES_DROPOUT <= set(VARIANTS)
    keys = {"variant": name, "r": R, "target_modules": ["q_proj"]}
    if name in REFUSES_DROPOUT:
        with pytest.raises(ValidationError, match="dropout"):
            VARIANTS[name].Config(**keys, dropout=0.1)
    else:
        assert VARIANTS[name].Config(**keys, dropout=0.1).dropout == 0.1
    assert VARIANTS[name].Config(**keys, dropout=0.0).dropout == 0.0


# --------------------------------------------------------------------------------------------------
# adapter.init: gaussian


def init_choices(name: str) -> tuple[str, ...]:
    field = VARIANTS[name].Config.model_fields.get("init")
    return typing.get_args(field.annotation) if field is not None else ()


GAUSSIAN = [name for name in NAMES if "gaussian" in init_choices(name)]


def initial_factors(name: str, init: str, r: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Every A and every B entry of a fresh adapter (each tensor once) on a 256-wide Llama, r = 16:
    32,768 A entries (fewer once pairs are shared). A variant that later restructures its pairs (LoRA-drop's fresh and shared
    pairs) is restructured too, so its second init path is included."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=16)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.head_dim = 256, 512, 1, 64
    model = LlamaForCausalLM(config)
    cfg = VARIANTS[name].Config(variant=name, r=r, alpha=8, target_modules="all-linear", init=init)
    variant = build_variant(cfg).apply(model)
    restructure = getattr(variant, "restructure", None)
    if restructure is not None:
        restructure(kept=list(variant.layers)[:1], seed=1)
    pairs = [layer.low_rank_factors() for layer in variant.layers.values()]
    unique = lambda ts: torch.cat([t.detach().flatten() for t in {id(t): t for t in ts}.values()])  # noqa: E731
    if restructure is not None:
        assert len({id(A) for _, A in pairs}) < len(pairs)  # some layers share a pair now
    return unique(A for _, A in pairs), unique(B for B, _ in pairs)


def is_normal_with_std(values: torch.Tensor, std: float) -> bool:
    """Mean 0, standard deviation ``std`` (within 3%) and kurtosis 3 (within 0.25): tolerances of
    over 5 standard errors at 32k samples, while Kaiming-uniform (std 1/sqrt(3 in) = 0.036 at in =
    256, kurtosis 1.8) misses both."""
    values = values.double()
    mean, sd = values.mean().item(), values.std().item()
    kurtosis = (((values - mean) / sd) ** 4).mean().item()
    return abs(mean) < 5 * std / values.numel() ** 0.5 and abs(sd / std - 1) < 0.03 and abs(kurtosis - 3) < 0.25


@pytest.mark.parametrize("name", GAUSSIAN)
def test_gaussian_init_draws_A_from_normal_with_std_one_over_r(name):
    r = 16
    A, B = initial_factors(name, "gaussian", r)
    assert A.numel() >= 20_000 and torch.count_nonzero(B) == 0
    assert is_normal_with_std(A, 1 / r)
    default_A, default_B = initial_factors(name, "default", r)
    assert torch.count_nonzero(default_B) == 0
    assert not is_normal_with_std(default_A, 1 / r)  # the check tells the two inits apart


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_match_what_the_variant_does(name):
    """What `lorafam analyze` reads off the class is true of the variant: ``has_low_rank_factors`` where
    every layer gives its low-rank pair, ``draws_artifacts`` where it has its own ``write_artifacts``."""
    cls = VARIANTS[name]
    _, variant = adapted(name, "llama")
    assert cls.has_low_rank_factors == all(layer.low_rank_factors() is not None for layer in variant.layers.values())
    assert cls.draws_artifacts == (cls.write_artifacts is not Variant.write_artifacts)
