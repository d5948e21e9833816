"""QLoRA: any variant on a bitsandbytes-quantized base (tiny random Llamas quantized on CPU)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafam.adapters import VARIANTS
from lorafam.adapters.lora import LoRA
from lorafam.data import PreparedData
from lorafam.errors import LorafamError
from lorafam.hardware import native_bf16
from lorafam.merge import merge_run, merged_model
from lorafam.modeling import load_model
from lorafam.optim import make_optimizer
from lorafam.quant import (
    bits_per_param,
    bnb_config,
    dequantize_model,
    dequantized_weight,
    describe,
    estimate_weight_memory,
    is_4bit,
    is_quantized,
    keep_training_layout,
)
from lorafam.recipe import ModelConfig, TrainConfig, validate_recipe
from lorafam.run import RunFolder, RunInfo, adapt, open_run
from lorafam.trainer import train
from tinyrun import cli, make_model_folder, make_text_data, write_recipe

# Widths are multiples of 32 so bitsandbytes' CPU repacking (the trap below) can run on them.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    tie_word_embeddings=True,
)
ADAPTED = ["q_proj", "v_proj"]
#: Max |logit| difference between the adapted 4-bit model (bf16 compute) and its float merge
#: W_deq + delta: measured 2.5e-3 .. 6e-3 on this tiny model (logits ~1e-1 .. 1); bf16 rounding of
#: activations and of W_deq inside the 4-bit matmul account for all of it.
MERGE_ATOL = 2e-2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(gpt2_tokenizer), **TINY)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def raw_recipe(tiny_dir: Path, tmp_path: Path, variant: str = "lora", **model_keys) -> dict:
    return {
        "model": {"name": str(tiny_dir), "quantization": "nf4", **model_keys},
        "adapter": {"variant": variant, "r": 4, "alpha": 8, "target_modules": list(ADAPTED)},
        "data": {"train": "unused.jsonl"},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "optimizer": "adamw", "log_every": 1},
        "output_dir": str(tmp_path / "run"),
    }


def load_4bit(tiny_dir: Path, **keys) -> torch.nn.Module:
    return load_model(ModelConfig(name=str(tiny_dir), quantization="nf4", **keys))


def token_batch(vocab: int, seed: int = 0, rows: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def token_data(vocab: int, n: int = 16) -> PreparedData:
    rows = token_batch(vocab, seed=1, rows=n)
    table = datasets.Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    return PreparedData(train=table, eval=table.select(range(4)), format="text", label_names=None, report={})


def first_layer(variant, name: str = "q_proj"):
    return next(layer for path, layer in variant.layers.items() if path.endswith(f"layers.0.self_attn.{name}"))


# --------------------------------------------------------------------------------------------------
# Loading


def test_4bit_load_with_double_quant_gives_params4bit_with_nested_state(tiny_dir):
    model = load_4bit(tiny_dir)
    quantized = {n: m for n, m in model.named_modules() if is_4bit(m)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer; the tied head stays float
    for name, module in quantized.items():
        weight = module.weight
        assert type(weight).__name__ == "Params4bit" and weight.dtype == torch.uint8, name
        state = weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64
        assert state.nested and state.state2 is not None and state.absmax.dtype == torch.uint8
        assert module.compute_dtype == (torch.bfloat16 if native_bf16()[0] else torch.float32)  # compute_dtype: auto
    float_params = {n: p for n, p in model.named_parameters() if type(p).__name__ != "Params4bit"}
    assert float_params and all(p.dtype == torch.float32 for p in float_params.values())
    assert not any(p.requires_grad for p in model.parameters())

    plain = load_4bit(tiny_dir, double_quant=False, compute_dtype="float32")
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert not q_proj.weight.quant_state.nested and q_proj.weight.quant_state.absmax.dtype == torch.float32
    assert q_proj.compute_dtype == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_is_bf16_only_where_bf16_is_native(native, monkeypatch):
    import lorafam.hardware

    monkeypatch.setattr(lorafam.hardware, "native_bf16", lambda: (native, "stated by the test"))
    auto = ModelConfig(name="m", quantization="nf4")
    assert auto.compute_dtype == "auto"
    assert bnb_config(auto).bnb_4bit_compute_dtype == (torch.bfloat16 if native else torch.float32)
    assert describe(auto) == f"nf4, double quant, {'bfloat16' if native else 'float32'} compute"
    chosen = ModelConfig(name="m", quantization="nf4", compute_dtype="float16")
    assert bnb_config(chosen).bnb_4bit_compute_dtype == torch.float16  # a stated dtype is kept


def test_resolved_compute_dtype_is_recorded_and_kept_wherever_the_run_is_opened(tmp_path, monkeypatch):
    """`compute_dtype: auto` depends on the machine. run.json records what training resolved it to, and
    a run opened on another machine (merge, eval, export, chat) dequantizes its base the same way
    and its card says so; recipe.yaml keeps `auto` as written."""
    import lorafam.hardware
    from lorafam.merge import load_adapted

    model_dir = make_model_folder(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, make_text_data(tmp_path / "data.jsonl"), tmp_path / "run",
                          train={"max_steps": 2, "save_every": None, "mixed_precision": "no"})
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["quantization"] = "nf4"
    recipe.write_text(yaml.safe_dump(raw))

    monkeypatch.setattr(lorafam.hardware, "native_bf16", lambda: (True, "the training machine, stated by the test"))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["compute_dtype"] == "bfloat16"
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["compute_dtype"] == "auto"
    assert "compute dtype bfloat16" in (run_dir / "README.md").read_text()

    monkeypatch.setattr(lorafam.hardware, "native_bf16", lambda: (False, "the merging machine, stated by the test"))
    run = open_run(run_dir)
    assert run.recipe.model.compute_dtype == "bfloat16"
    adapted, _ = load_adapted(run)
    q_proj = adapted.model.layers[0].self_attn.q_proj.base_layer
    assert is_4bit(q_proj) and q_proj.compute_dtype == torch.bfloat16
    merged = merge_run(run_dir, tmp_path / "merged").path
    assert "compute dtype bfloat16" in (merged / "README.md").read_text()


def test_dequantized_weight_is_close_to_the_original(tiny_dir):
    original = LlamaForCausalLM.from_pretrained(tiny_dir).model.layers[0].self_attn.q_proj.weight
    q_proj = load_4bit(tiny_dir).model.layers[0].self_attn.q_proj
    dense = dequantized_weight(q_proj)
    assert dense.shape == original.shape and dense.dtype == torch.float32
    error = (dense - original).abs().max() / original.abs().max()
    assert 0 < error < 0.15  # NF4: 16 levels per block of 64, scaled to the block's absmax


@pytest.mark.parametrize("quantization, layer_type, param_type, dtype", [
    ("fp4", "Linear4bit", "Params4bit", torch.uint8),
    ("int8", "Linear8bitLt", "Int8Params", torch.int8),
])
def test_fp4_and_int8_bases_load_train_and_merge(quantization, layer_type, param_type, dtype, tiny_dir, tmp_path, gpt2_tokenizer):
    """The other two `model.quantization` values: the bitsandbytes layers the README names, a LoRA that
    trains on them (loss falls, every adapter tensor gets a gradient, no base byte moves), and a merge."""
    original = LlamaForCausalLM.from_pretrained(tiny_dir)
    recipe = validate_recipe(raw_recipe(tiny_dir, tmp_path, quantization=quantization))
    model = load_model(recipe.model)
    quantized = {n: m for n, m in model.named_modules() if is_quantized(m)}
    assert len(quantized) == 2 * 7 and model.lm_head.weight.dtype == torch.float32  # every linear but the head
    for name, module in quantized.items():
        assert type(module).__name__ == layer_type and type(module.weight).__name__ == param_type, name
        assert module.weight.dtype == dtype and not module.weight.requires_grad
    q_proj = model.model.layers[0].self_attn.q_proj
    dense, reference = dequantized_weight(q_proj), original.model.layers[0].self_attn.q_proj.weight
    error = ((dense - reference).abs().max() / reference.abs().max()).item()
    if quantization == "fp4":
        assert q_proj.weight.quant_state.quant_type == "fp4"
        nf4 = dequantized_weight(load_4bit(tiny_dir).model.layers[0].self_attn.q_proj)
        assert not torch.equal(dense, nf4)  # fp4's 16 levels, not nf4's
        assert 0 < error < 0.25
    else:
        assert 0 < error < 0.02  # 8 bits per weight, one scale per output row

    variant = adapt(model, recipe, [])
    before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    model.train()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(variant.param_groups(1e-2, 0.0))
    batch = token_batch(model.config.vocab_size)
    losses = []
    for step in range(3):
        loss = model(**batch).loss
        loss.backward()
        if step == 2:  # B starts at zero: A's gradient is zero on step 1 only
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    model.eval()
    with torch.no_grad():
        exact = dequantize_model(model, torch.float32)(input_ids=batch["input_ids"]).logits
    run_dir = Path(recipe.output_dir)
    folder = RunFolder(run_dir, writes=True)
    folder.start(recipe, gpt2_tokenizer, RunInfo(), overwrite=False)
    folder.save_adapter(variant, recipe)
    merged = AutoModelForCausalLM.from_pretrained(merge_run(run_dir, tmp_path / "merged").path)
    assert not hasattr(merged.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, exact, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Adapter on the quantized base


def test_zero_adapter_equals_quantized_base(tiny_dir):
    model = load_4bit(tiny_dir)
    batch = token_batch(model.config.vocab_size)
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"]).logits
    variant = LoRA(LoRA.Config(variant="lora", r=4, target_modules=ADAPTED)).apply(model)
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"]).logits
        assert torch.equal(adapted, base)  # B = 0: exactly the quantized base
        torch.nn.init.normal_(first_layer(variant).lora_B.weight, std=1.0)
        assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, base)


def test_training_updates_only_adapter_params(tiny_dir):
    model = load_4bit(tiny_dir)
    variant = LoRA(LoRA.Config(variant="lora", r=4, target_modules=ADAPTED)).apply(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter_keys = {k for k in before if ".lora_" in k}
    assert adapter_keys
    optimizer = make_optimizer(variant.param_groups(1e-2, 0.0), TrainConfig(optimizer="adamw_8bit"))
    model.train()
    batch = token_batch(model.config.vocab_size)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapter_keys  # every adapter tensor moved; not one base byte did


# --------------------------------------------------------------------------------------------------
# The trap: an eval pass must not cost the quantized layers their input gradients
#
# bitsandbytes decides per layer, in Linear4bit.__init__, whether to repack for CPU inference:
# ``self.support_avx512bf16_for_cpu = has_avx512bf16()`` (bitsandbytes.nn.modules), and a repacked
# layer's matmul runs the ``gemv_4bit`` op, whose CPU kernel bitsandbytes registers (at import, on
# such CPUs only) with no autograd formula: its output carries no gradient back to its input.
# The ``repacking_cpu`` fixture (conftest.py) makes both true on any CPU, so these tests cannot pass
# vacuously where the instructions are missing (the packed kernel's output is checked below).


def packed_layers(model: torch.nn.Module) -> int:
    """4-bit layers currently in bitsandbytes' CPU inference layout."""
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in model.modules() if is_4bit(m))


def trained_grads_after_eval(tiny_dir: Path, tmp_path: Path, tokenizer, guard: bool) -> tuple[list[float], list[int]]:
    """Train with the real trainer, evaluating every step; return layer 0's q_proj A+B grad norms
    seen at each optimizer step, and how many 4-bit layers were repacked at that point."""
    recipe = validate_recipe(raw_recipe(tiny_dir, tmp_path) | {"train": {
        "max_steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 1, "log_every": 1}})
    model = load_4bit(tiny_dir)  # eval mode, as from_pretrained returns it
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if is_4bit(m))  # load_model's guard
    if not guard:  # undo it: the layers as transformers returns them on such a CPU
        for module in model.modules():
            if is_4bit(module):
                module.support_avx512bf16_for_cpu = True
    variant = adapt(model, recipe, [])
    layer = first_layer(variant)
    seen: list[float] = []
    packed: list[int] = []
    after_step = variant.after_step

    def record(step: int, total: int) -> dict:
        grads = [p.grad for p in (layer.lora_A.weight, layer.lora_B.weight)]
        seen.append(sum(0.0 if g is None else g.norm().item() for g in grads))
        packed.append(packed_layers(model))
        return after_step(step, total)

    variant.after_step = record
    data = token_data(model.config.vocab_size)
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    if not guard:
        import lorafam.trainer as trainer_module

        original = trainer_module.keep_training_layout
        trainer_module.keep_training_layout = lambda m: 0
    try:
        train(recipe, model, variant, tokenizer, data, tmp_path / "run", Console(quiet=True))
    finally:
        if not guard:
            trainer_module.keep_training_layout = original
    packed.append(packed_layers(model))  # after the last eval
    return seen, packed


@pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit")  # the unguarded run's lost gradient
def test_eval_pass_during_training_keeps_gradients_flowing(tiny_dir, tmp_path, gpt2_tokenizer, repacking_cpu):
    grads, packed = trained_grads_after_eval(tiny_dir, tmp_path, gpt2_tokenizer, guard=True)
    assert len(grads) == 3 and all(g > 0 for g in grads)
    assert packed == [0, 0, 0, 0]  # three evals (one per step) and not one layer repacked
    # Layer 0's q_proj reaches the loss only through o_proj and everything above it, all 4-bit.
    # Without the guard the same run repacks every layer at its first eval (the "eval before",
    # ahead of step 1) and the adapter gets exactly no gradient at any step: what the guard prevents.
    unguarded, packed = trained_grads_after_eval(tiny_dir, tmp_path / "unguarded", gpt2_tokenizer, guard=False)
    assert packed == [14, 14, 14, 14]
    assert unguarded == [0.0, 0.0, 0.0]


def test_guard_undoes_an_earlier_repacking(tiny_dir, repacking_cpu):
    config = bnb_config(ModelConfig(name=str(tiny_dir), quantization="nf4"))
    model = LlamaForCausalLM.from_pretrained(tiny_dir, quantization_config=config)  # no guard
    batch = token_batch(model.config.vocab_size)
    q_proj = model.model.layers[0].self_attn.q_proj
    reference = dequantized_weight(q_proj).clone()
    codes = q_proj.weight.data.clone()
    with torch.no_grad():
        model.train()  # train mode: no repacking
        plain = model(input_ids=batch["input_ids"]).logits
        assert packed_layers(model) == 0
        model.eval()
        repacked = model(input_ids=batch["input_ids"]).logits  # eval + no grad: every layer repacks
    assert packed_layers(model) == 14
    state = q_proj.weight.quant_state
    assert not state.nested and state.absmax.dtype == torch.bfloat16  # the inference layout's constants
    # The packed kernel computes the same model (bf16 absmax; logits here are ~0.3).
    torch.testing.assert_close(repacked, plain, atol=2e-2, rtol=0)
    assert keep_training_layout(model) == 14
    assert packed_layers(model) == 0
    assert not state.packing_format_for_cpu and state.nested
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if is_4bit(m))
    assert torch.equal(q_proj.weight.data, codes)  # the 4-bit codes come back exactly
    # Undoing re-quantizes the absmax (bf16 round trip): within bf16 precision of the original.
    torch.testing.assert_close(dequantized_weight(q_proj), reference, rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert packed_layers(model) == 0  # and the next eval pass leaves it alone


# --------------------------------------------------------------------------------------------------
# Every variant that supports a quantized base trains on one


SUPPORTED = sorted(name for name, v in VARIANTS.items() if v.supports_quantized_base)


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_variant_trains_on_4bit_base(name, tiny_dir, tmp_path, gpt2_tokenizer):
    recipe = validate_recipe(raw_recipe(tiny_dir, tmp_path, variant=name))
    model = load_4bit(tiny_dir)
    variant = adapt(model, recipe, [])
    model.train()
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert params and set(map(id, params.values())) == set(map(id, variant.trainable_parameters()))
    optimizer = torch.optim.AdamW(variant.param_groups(1e-2, 0.0))
    batch = token_batch(model.config.vocab_size)
    steps, losses = 4, []
    for step in range(1, steps + 1):
        loss = model(**batch).loss
        extras = variant.extra_losses()
        (loss + sum(extras.values()) if extras else loss).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
        if step == steps:
            # Zero-initialized factors (B, VeRA's d, GLoRA's pieces) make some gradients zero on
            # step 1 only; by the last step every trainable tensor must get one. q/v_proj reach the
            # loss only through o_proj, a 4-bit layer: one that passed no input gradient would
            # leave every adapter here at exactly zero.
            silent = [n for n, p in params.items() if not p.grad.abs().sum() > 0]
            assert not silent, f"no gradient reached {silent}"
        optimizer.step()
        variant.after_step(step, steps)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses  # same batch every step: it must fit it (AdaLoRA least: ~3e-4)
    assert all(is_4bit(layer.base_layer) for layer in variant.layers.values())

    # Merge as users do: the run folder through merge_run (W_deq + delta, written, reloaded and
    # checked by merge itself), then the folder read back by plain transformers.
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"]).logits  # 4-bit base, bf16 compute
        exact = dequantize_model(model, torch.float32)(input_ids=batch["input_ids"]).logits  # W_deq, fp32
        untrained = dequantize_model(load_4bit(tiny_dir), torch.float32)(input_ids=batch["input_ids"]).logits
    run_dir = Path(recipe.output_dir)
    folder = RunFolder(run_dir, writes=True)
    folder.start(recipe, gpt2_tokenizer, RunInfo(), overwrite=False)
    folder.save_adapter(variant, recipe)
    result = merge_run(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(result.path)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(merged_logits, exact, atol=1e-5, rtol=0)  # the same function, in fp32
    torch.testing.assert_close(merged_logits, adapted, atol=MERGE_ATOL, rtol=0)  # up to bf16 compute
    # ... and what was merged is the training (AdaLoRA, the smallest, moved the logits by ~2e-2).
    assert (exact - untrained).abs().max() > 100 * 1e-5


def test_every_registered_variant_is_accepted_or_rejected_at_recipe_load(tiny_dir, tmp_path):
    """The registry decides: supported variants load on nf4, the others fail saying why."""
    for name, cls in VARIANTS.items():
        raw = raw_recipe(tiny_dir, tmp_path, variant=name)
        if cls.supports_quantized_base:
            assert validate_recipe(raw).model.quantization == "nf4"
        else:
            with pytest.raises(LorafamError, match=rf"{name} cannot train on a quantized base .*model.quantization: null"):
                validate_recipe(raw)


def test_variant_that_writes_w_is_rejected_generically(tiny_dir, tmp_path, monkeypatch):
    class WritesW(LoRA):  # stand-in for a variant that updates W in place (Delta-LoRA as in the paper)
        supports_quantized_base = False

    monkeypatch.setitem(VARIANTS, "lora", WritesW)
    with pytest.raises(LorafamError, match=r"adapter.variant: lora cannot train on a quantized base .*updates the base weights"):
        validate_recipe(raw_recipe(tiny_dir, tmp_path))
    validate_recipe(raw_recipe(tiny_dir, tmp_path) | {"model": {"name": str(tiny_dir)}})  # unquantized: fine


def test_quantization_keys_are_strict(tiny_dir, tmp_path):
    with pytest.raises(LorafamError, match="model.quantization"):
        validate_recipe(raw_recipe(tiny_dir, tmp_path, quantization="nf3"))
    with pytest.raises(LorafamError, match="double_quant applies to nf4/fp4"):
        validate_recipe(raw_recipe(tiny_dir, tmp_path, quantization="int8", double_quant=True))
    with pytest.raises(LorafamError, match="model.compute_dtype"):
        validate_recipe(raw_recipe(tiny_dir, tmp_path, compute_dtype="int4"))


# --------------------------------------------------------------------------------------------------
# Merge


def trained_4bit_run(tiny_dir: Path, tmp_path: Path, gpt2_tokenizer) -> Path:
    recipe = validate_recipe(raw_recipe(tiny_dir, tmp_path))
    model = load_4bit(tiny_dir)
    variant = adapt(model, recipe, [])
    model.train()
    optimizer = torch.optim.AdamW(variant.param_groups(3e-2, 0.0))
    batch = token_batch(model.config.vocab_size)
    for _ in range(4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    run_dir = Path(recipe.output_dir)
    folder = RunFolder(run_dir, writes=True)
    folder.start(recipe, gpt2_tokenizer, RunInfo(), overwrite=False)
    folder.save_adapter(variant, recipe)
    return run_dir


def test_merge_of_a_4bit_run_equals_the_adapted_model(tiny_dir, tmp_path, gpt2_tokenizer):
    run_dir = trained_4bit_run(tiny_dir, tmp_path, gpt2_tokenizer)
    from lorafam.merge import load_adapted

    adapted, variant = load_adapted(open_run(run_dir))
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in variant.layers.values())
    batch = token_batch(adapted.config.vocab_size, seed=3)["input_ids"]
    with torch.no_grad():
        reference = adapted(input_ids=batch).logits

    result = merge_run(run_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(result.path)
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=batch).logits
    error_deq = (merged_logits - reference).abs().max().item()
    assert error_deq < MERGE_ATOL

    # Merging into the original float weights instead would be off by the quantization error.
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    plain = validate_recipe(raw_recipe(tiny_dir, tmp_path) | {"model": {"name": str(tiny_dir)}})
    plain_variant = adapt(original, plain, [])
    plain_variant.load_adapter_state_dict(variant.adapter_state_dict())
    with torch.no_grad():
        error_orig = (plain_variant.merge()(input_ids=batch).logits - reference).abs().max().item()
    assert error_orig > 5 * error_deq


def test_merge_requantize_saves_a_4bit_model_and_reports_its_error(tiny_dir, tmp_path, gpt2_tokenizer):
    import re

    from lorafam.merge import probe_batch, probe_logits

    run_dir = trained_4bit_run(tiny_dir, tmp_path, gpt2_tokenizer)
    float_cli = cli("merge", run_dir, "--output", tmp_path / "merged-float", terminal_width=200)
    assert float_cli.exit_code == 0, float_cli.output
    result = cli("merge", run_dir, "--output", tmp_path / "merged-nf4", "--requantize", "nf4", terminal_width=200)
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("re-quantized to nf4"))
    printed = float(re.fullmatch(r"re-quantized to nf4: max abs logit difference vs the float merge (\S+) \(fixed probe batch\)", line)[1])

    # Both folders as users read them: plain transformers, no lorafam code in the load.
    float_merge = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-float")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-nf4")
    assert reloaded.config.quantization_config.load_in_4bit
    q_proj = reloaded.model.layers[0].self_attn.q_proj
    assert is_4bit(q_proj) and q_proj.weight.quant_state.nested
    # The saved codes are the NF4 quantization of the float merge.
    dense = float_merge.model.layers[0].self_attn.q_proj.weight
    error = (dequantized_weight(q_proj) - dense).abs().max() / dense.abs().max()
    assert 0 < error < 0.15
    # The printed figure is what the saved 4-bit model does: its logits against the float merge's on
    # the probe batch merge names, recomputed here from the two folders.
    batch = probe_batch(AutoTokenizer.from_pretrained(tmp_path / "merged-nf4"))
    measured = (probe_logits(reloaded, batch, "causal-lm") - probe_logits(float_merge, batch, "causal-lm")).abs().max().item()
    assert measured > 1e-2  # 4-bit rounding of every linear: far from nothing
    assert printed == pytest.approx(measured, rel=1e-3)  # printed to 4 significant digits
    with pytest.raises(LorafamError, match="--requantize 'int4'"):
        merge_run(run_dir, tmp_path / "bad", requantize="int4")


# --------------------------------------------------------------------------------------------------
# Optimizers


def test_paged_optimizer_on_cpu_says_so_once_and_silences_bitsandbytes(capsys):
    import lorafam.quant as quant

    quant._paged_note_shown = False
    param = torch.nn.Parameter(torch.randn(64, 80))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("paged_adamw_8bit", "paged_adamw_32bit"):
            optimizer = make_optimizer([{"params": [param], "lr": 1e-3}], TrainConfig(optimizer=name))
            for _ in range(2):
                param.grad = torch.randn_like(param)
                optimizer.step()
            assert type(optimizer).__name__ == {"paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}[name]
    lines = [line for line in capsys.readouterr().err.splitlines() if "paging" in line]
    assert lines == ["note: train.optimizer paged_adamw_8bit: paging needs CUDA; on CPU it runs as adamw_8bit (same updates, no paging)"]
    assert not [w for w in caught if "Paged optimizers" in str(w.message)]


def test_adamw_8bit_keeps_8bit_state():
    param = torch.nn.Parameter(torch.randn(128, 64))
    optimizer = make_optimizer([{"params": [param], "lr": 1e-3}], TrainConfig(optimizer="adamw_8bit"))
    param.grad = torch.randn_like(param)
    optimizer.step()
    assert optimizer.state[param]["state1"].dtype == torch.uint8


# --------------------------------------------------------------------------------------------------
# Memory arithmetic (lorafam inspect)


def test_double_quant_saves_what_the_qlora_paper_says():
    # Paper, section 3: 32/64 = 0.5 bits/param of constants; double quantization 8/64 + 32/(64*256)
    # = 0.127 bits/param, "a reduction of 0.373 bits per parameter ... approximately 3 GB for a 65B model".
    saving = bits_per_param("nf4", False) - bits_per_param("nf4", True)
    assert saving == pytest.approx(0.373, abs=5e-4)
    assert 65e9 * saving / 8 == pytest.approx(3.03e9, rel=1e-2)

    config = LlamaConfig(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                         vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        llama_65b = LlamaForCausalLM(config)
    single = estimate_weight_memory(llama_65b, "nf4", double_quant=False)
    double = estimate_weight_memory(llama_65b, "nf4", double_quant=True)
    assert 64e9 < single.quantized_params < 66e9  # every linear but the head: ~65B
    assert double.bytes_16bit == pytest.approx(2 * 65.3e9, rel=2e-2)
    assert single.quantized_bytes - double.quantized_bytes == pytest.approx(3.03e9, rel=2e-2)
    # 4.127 bits for the linears, 16 bits for embeddings + head: ~34 GB, the paper's "<48 GB" 65B.
    assert 33e9 < double.quantized_bytes < 35e9


def test_inspect_prints_quantized_and_16bit_weight_memory(tiny_dir, tmp_path):
    import yaml

    recipe = tmp_path / "q.yaml"
    recipe.write_text(yaml.safe_dump(raw_recipe(tiny_dir, tmp_path)))
    result = cli("inspect", recipe, terminal_width=200)
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("base weights"))
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(vocab_size=50257, **TINY))
    linear = sum(m.weight.numel() for n, m in meta.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear))
    other = sum(p.numel() for p in meta.parameters()) - linear
    expected = (linear * (4 + 8 / 64 + 32 / (64 * 256)) + 16 * other) / 8 / 1024**2
    assert f"{expected:.1f} MB" in line and "nf4 + double quant" in line and "at 16-bit" in line


def test_parameter_counts_count_4bit_weights_once_each(tiny_dir):
    plain = LlamaForCausalLM.from_pretrained(tiny_dir)
    variant = LoRA(LoRA.Config(variant="lora", r=4, target_modules=ADAPTED)).apply(load_4bit(tiny_dir))
    trainable, total = variant.parameter_counts()
    lora_params = sum(p.numel() for p in variant.trainable_parameters())
    assert trainable == lora_params and total == sum(p.numel() for p in plain.parameters()) + lora_params
