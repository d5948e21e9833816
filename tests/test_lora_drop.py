"""LoRA-drop: what the shared table in test_variants.py cannot see (it never calls prepare())."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import tiny_llama_config
from test_variants import inputs, logits, make_model
from torch import nn
from transformers import LlamaForCausalLM

from lorafam.adapters import build_variant
from lorafam.adapters.base import PEFT_PREFIX
from lorafam.adapters.lora_drop import SAMPLE_PHASE, SHARED_ATTR, sample_indices, select_layers
from lorafam.errors import LorafamError
from lorafam.modeling import head_modules
from lorafam.recipe import validate_recipe
from lorafam.run import adapt, load_tensors, save_tensors

R, ALPHA = 4, 8


def recipe(task: str = "causal-lm", **adapter):
    keys = {"variant": "lora_drop", "r": R, "alpha": ALPHA, "target_modules": "all-linear"} | adapter
    return validate_recipe(
        {"model": {"name": "tiny", "task": task}, "adapter": keys, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    )


def llama_adapted(**adapter):
    model, task = make_model("llama")
    spec = recipe(task, **adapter)
    return model, spec, adapt(model, spec, head_modules(model, task))


def token_rows(n: int, seed: int = 5, vocab: int = 128) -> datasets.Dataset:
    """Tokenized causal-LM rows of varying length, so batches carry padding the importance must skip."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    ids = [torch.randint(1, vocab, (length,), generator=g).tolist() for length in lengths]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": [list(i) for i in ids]}
    )


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([list(r[key]) + [value] * (longest - len(r[key])) for r in rows])

    return {"input_ids": pad("input_ids", 0), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", -100)}


def real_fit(model, variant, calls: list, lr: float = 1e-2):
    """A stand-in for the CLI's fit: real AdamW steps over the variant's current parameter groups."""

    def fit(dataset, steps, phase):
        calls.append((len(dataset), steps, phase))
        steps = steps if steps is not None else math.ceil(len(dataset) / 4)  # None: one pass, as the CLI
        optimizer = torch.optim.AdamW(variant.param_groups(lr=lr, weight_decay=0.0))
        model.train()
        for step in range(steps):
            rows = [dataset[(step * 4 + i) % len(dataset)] for i in range(4)]
            model(**collate(rows)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        return SimpleNamespace(steps=steps)

    return fit


def randomize(variant, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in variant.layers.values():
            for linear in layer.pair():
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * 0.2)


# --------------------------------------------------------------------------------------------------
# Importance


def test_importance_is_the_adapter_output_norm_over_real_tokens():
    model, _, variant = llama_adapted(dropout=0.3)
    randomize(variant)
    sample = token_rows(10)
    model.train()  # importance must switch dropout off, and hand the mode back
    importance = variant.importance(sample)
    assert model.training

    # By hand: one example at a time (no padding), each layer's input captured by a pre-hook.
    model.eval()
    expected = {path: 0.0 for path in variant.layers}
    captured: dict[str, torch.Tensor] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, path=path: captured.__setitem__(path, args[0]))
        for path, layer in variant.layers.items()
    ]
    with torch.no_grad():
        for row in sample:
            captured.clear()
            model(input_ids=torch.tensor([row["input_ids"]]))
            for path, layer in variant.layers.items():
                x = captured[path].double()
                update = layer.scaling * x @ layer.lora_A.weight.double().T @ layer.lora_B.weight.double().T
                expected[path] += float(update.pow(2).sum())
    for h in handles:
        h.remove()
    total = sum(expected.values())
    assert math.isclose(sum(importance.values()), 1.0, rel_tol=1e-9)
    for path in variant.layers:
        assert importance[path] == pytest.approx(expected[path] / total, rel=1e-6), path


def test_zero_adapter_outputs_are_a_clear_error():
    model, _, variant = llama_adapted()
    with pytest.raises(LorafamError, match="sample_steps"):
        variant.prepare(lambda dataset, steps, phase: SimpleNamespace(steps=1), token_rows(10), seed=0)


# --------------------------------------------------------------------------------------------------
# The threshold rule, on a constructed case whose importances are known


class Parallel(nn.Module):
    """Seven linears reading the same embedding: with A = I and B = c I, layer i's importance is c_i^2 |x|^2."""

    SHAPES = {"a": 8, "b": 16, "c": 8, "d": 8, "e": 16, "f": 16, "g": 8}  # out features; all read 8

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        for name, out in self.SHAPES.items():
            self.add_module(name, nn.Linear(8, out))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return sum(getattr(self, name)(h).sum() for name in self.SHAPES)


WANTED = {"a": 0.30, "b": 0.25, "c": 0.20, "d": 0.05, "e": 0.08, "f": 0.07, "g": 0.05}


def hand_set(variant) -> None:
    with torch.no_grad():
        for path, layer in variant.layers.items():
            lora_A, lora_B = layer.pair()
            lora_A.weight.copy_(torch.eye(8))
            lora_B.weight.copy_(math.sqrt(WANTED[path]) * torch.eye(layer.out_features, 8))


def test_threshold_keeps_the_most_important_layers_until_covered():
    torch.manual_seed(0)
    model = Parallel()
    spec = recipe(
        r=8, alpha=8, target_modules=list(Parallel.SHAPES), threshold=0.7, sample_ratio=1.0, sample_steps=3
    )
    variant = build_variant(spec.adapter).apply(model)
    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]], "attention_mask": [[1, 1, 1], [1, 1]]})
    calls = []

    def fit(dataset, steps, phase):  # "training" that lands on the hand-set weights
        calls.append((len(dataset), steps, phase))
        hand_set(variant)
        return SimpleNamespace(steps=steps)

    record = variant.prepare(fit, rows, seed=0)

    assert calls == [(2, 3, SAMPLE_PHASE)]
    for path, g in WANTED.items():
        assert record["importance"][path] == pytest.approx(g, rel=1e-6)
    assert record["kept"] == ["a", "b", "c"]  # 0.30 + 0.25 < 0.7 <= 0.30 + 0.25 + 0.20
    assert record["shared"] == {"8x8": ["d", "g"], "16x8": ["e", "f"]}
    layers = variant.layers
    assert layers["d"].pair()[0].weight is layers["g"].pair()[0].weight
    assert layers["d"].pair()[1].weight is layers["g"].pair()[1].weight
    assert layers["e"].pair()[0].weight is layers["f"].pair()[0].weight
    assert layers["d"].pair()[0].weight is not layers["e"].pair()[0].weight
    own = {id(layers[p].pair()[0].weight) for p in "abc"}
    assert len(own) == 3 and not own & {id(layers[p].pair()[0].weight) for p in "defg"}
    # Each pair is r (in + out): three own, one per shared shape.
    assert record["params_before"] == 8 * (4 * 16 + 3 * 24)
    assert record["params_after"] == 8 * (2 * 16 + 24) + 8 * (16 + 24)
    assert variant.parameter_counts()[0] == record["params_after"]


def test_select_layers_rule():
    g = {"x": 0.5, "y": 0.3, "z": 0.2, "w": 0.0}
    assert select_layers(g, 0.5) == ["x"]
    assert select_layers(g, 0.51) == ["x", "y"]
    assert select_layers(g, 0.8) == ["x", "y"]
    assert select_layers(g, 1.0) == ["x", "y", "z"]  # a zero-importance layer is never needed
    assert select_layers({"x": 0.1, "y": 0.2, "z": 0.7}, 0.9) == ["z", "y"]  # by importance, not order


def test_sampling_is_seeded_and_stratified_for_classification():
    labels = [0] * 20 + [1] * 10
    rows = datasets.Dataset.from_dict({"input_ids": [[1]] * 30, "attention_mask": [[1]] * 30, "labels": labels})
    picked = sample_indices(rows, 0.3, seed=4)
    assert sorted(labels[i] for i in picked) == [0] * 6 + [1] * 3
    assert picked == sample_indices(rows, 0.3, seed=4)
    assert picked != sample_indices(rows, 0.3, seed=5)
    causal = token_rows(30)
    assert len(sample_indices(causal, 0.1, seed=0)) == 3
    assert len(sample_indices(causal, 1.0, seed=0)) == 30


# --------------------------------------------------------------------------------------------------
# The whole prepare() with real optimizer steps, then main-run steps, save, restore + load, merge


def test_prepare_then_train_save_restore_load_merge(tmp_path):
    base, _ = make_model("llama")
    model, spec, variant = llama_adapted(threshold=0.6, sample_ratio=0.5)
    batch = inputs("llama")
    calls = []
    record = variant.prepare(real_fit(model, variant, calls), token_rows(20), seed=3)

    # Phase 1: sample_steps unset, so fit gets None and decides (the trainer's one pass: tested through
    # the CLI below); the record keeps the step count the fit reports.
    assert calls == [(10, None, SAMPLE_PHASE)]
    assert record["sample_steps"] == math.ceil(10 / 4)  # what real_fit reports
    assert record == json.loads(json.dumps(record))
    assert math.isclose(sum(record["importance"].values()), 1.0, rel_tol=1e-9)
    assert record["kept"] == select_layers(record["importance"], 0.6)
    assert 0 < len(record["kept"]) < len(variant.layers)

    # Structure: kept layers own a pair, every other layer uses its shape's one shared pair.
    layers = variant.layers
    shared_paths = [p for paths in record["shared"].values() for p in paths]
    assert sorted(shared_paths + record["kept"]) == sorted(layers)
    assert any(len(paths) > 1 for paths in record["shared"].values()), "nothing is really shared"
    pair_ids = {}
    for key, paths in record["shared"].items():
        first = layers[paths[0]].pair()
        for p in paths:
            assert layers[p].pair()[0].weight is first[0].weight and layers[p].pair()[1].weight is first[1].weight
            assert f"{layers[p].out_features}x{layers[p].in_features}" == key
            assert "lora_A" not in layers[p]._modules
        pair_ids[key] = id(first[0].weight)
    assert len(set(pair_ids.values())) == len(pair_ids)
    for p in record["kept"]:
        assert id(layers[p].lora_A.weight) not in pair_ids.values()

    # The saving: each shared pair counted once, by the optimizer too.
    per_pair = lambda out_f, in_f: R * (out_f + in_f)  # noqa: E731
    expected = sum(per_pair(layers[p].out_features, layers[p].in_features) for p in record["kept"])
    for paths in record["shared"].values():
        expected += per_pair(layers[paths[0]].out_features, layers[paths[0]].in_features)
    assert record["params_after"] == expected == variant.parameter_counts()[0]
    assert record["params_before"] == sum(per_pair(l.out_features, l.in_features) for l in layers.values())
    assert record["params_after"] < record["params_before"]
    grouped = [p for g in variant.param_groups(1e-3, 0.0) for p in g["params"]]
    assert len({id(p) for p in grouped}) == len(grouped)
    assert sum(p.numel() for p in grouped) == record["params_after"]
    report = "\n".join(variant.report())
    assert f"{record['params_before']:,} -> {record['params_after']:,}" in report and "fewer" in report

    # The main run starts from fresh pairs (B = 0): the model is the base again.
    torch.testing.assert_close(logits(model, batch), logits(base, batch), atol=1e-5, rtol=1e-5)
    real_fit(model, variant, calls, lr=2e-2)(token_rows(20, seed=9), 6, "main")
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(base, batch), atol=1e-3)
    some_shared = layers[shared_paths[0]]
    assert some_shared.pair()[1].weight.abs().sum() > 0, "the shared pair did not train"

    # Saved: PEFT keys for kept layers, each shared tensor once under its shape's key.
    state = variant.adapter_state_dict()
    expected_keys = {f"{PEFT_PREFIX}{p}.lora_{m}.weight" for p in record["kept"] for m in "AB"}
    expected_keys |= {f"{PEFT_PREFIX}{SHARED_ATTR}.{k}.lora_{m}.weight" for k in record["shared"] for m in "AB"}
    assert set(state) == expected_keys
    path = tmp_path / "adapter_model.safetensors"
    save_tensors(path, state)

    # Loaded as `merge`/`eval` do: adapt() with run.json's record, then the weights.
    fresh, _ = make_model("llama")
    fresh_variant = adapt(fresh, spec, head_modules(fresh, "causal-lm"), json.loads(json.dumps(record)))
    assert fresh_variant.parameter_counts()[0] == record["params_after"]
    fresh_variant.load_adapter_state_dict(load_tensors(path))
    torch.testing.assert_close(logits(fresh, batch), trained, atol=1e-6, rtol=1e-6)
    for paths in record["shared"].values():
        owners = {id(fresh_variant.layers[p].pair()[0].weight) for p in paths}
        assert len(owners) == 1
    assert fresh_variant.report() == variant.report()

    # Merge: each layer's delta from its own or shared pair; nothing of the adapter left.
    merged = fresh_variant.merge()
    assert not hasattr(merged, SHARED_ATTR)
    assert not any("base_layer" in n or "lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), trained, atol=1e-4, rtol=1e-4)


def test_restore_on_the_meta_device_for_inspect():
    model, spec, variant = llama_adapted(threshold=0.5)
    record = variant.prepare(real_fit(model, variant, []), token_rows(30), seed=0)
    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    meta_variant = adapt(meta, spec, head_modules(meta, "causal-lm"), record)
    assert meta_variant.parameter_counts()[0] == record["params_after"]


def test_restore_rejects_a_record_for_other_layers():
    model, spec, variant = llama_adapted()
    record = {"importance": {"model.layers.0.self_attn.q_proj": 1.0}, "kept": ["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(LorafamError, match="target_modules"):
        variant.restore(record)


@pytest.mark.parametrize(
    "key, value",
    [("threshold", 0.0), ("threshold", 1.5), ("sample_ratio", 0.0), ("sample_ratio", 1.01), ("init", "pissa")],
)
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(LorafamError) as error:
        recipe(**{key: value})
    message = str(error.value)
    assert f": adapter.{key}: " in message, message
    assert ("(0, 1]" in message) if key != "init" else ("pissa" in message), message


def test_full_threshold_and_ratio_are_allowed():
    spec = recipe(threshold=1.0, sample_ratio=1.0)
    assert (spec.adapter.threshold, spec.adapter.sample_ratio) == (1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Through the CLI: the real probe phase, what run.json and metrics.jsonl record, what inspect prints


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`lorafam train` of LoRA-drop on tinyrun's model: 56 training rows, a 0.5 sample (28 rows), batch 4
    x grad_accum 2 = global batch 8, so one pass over the sample is ceil(28 / 8) = 4 steps, the last
    one partial. Records, per phase and step, which training examples each step took."""
    import lorafam.trainer as trainer
    from tinyrun import adapter_section, cli, make_model_folder, make_text_data, write_recipe

    root = tmp_path_factory.mktemp("lora-drop-cli")
    adapter = adapter_section("lora_drop") | {"sample_ratio": 0.5, "threshold": 0.6}
    recipe = write_recipe(root / "drop.yaml", make_model_folder(root / "model"), make_text_data(root / "train.jsonl"),
                          root / "run", adapter=adapter, train={"grad_accum": 2, "save_every": None, "max_steps": 6})
    seen: dict[int, list[list[tuple[int, ...]]]] = {}  # training rows of the phase -> per step, the examples
    original = trainer.Session.batches

    def batches(self, step):
        out = original(self, step)
        examples = [tuple(ids[mask.bool()].tolist()) for batch, *_ in out
                    for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        seen.setdefault(len(self.data.train), []).append(examples)
        return out

    trainer.Session.batches = batches
    try:
        result = cli("train", recipe)
    finally:
        trainer.Session.batches = original
    assert result.exit_code == 0, result.output + result.stderr
    return root / "run", recipe, seen


def test_the_probe_phase_is_one_pass_over_the_sample_in_global_batches(cli_run):
    from tinyrun import read_metrics

    run_dir, _, seen = cli_run
    record = json.loads((run_dir / "run.json").read_text())["prepare"]
    assert record["sample_size"] == 28 and record["sample_steps"] == math.ceil(28 / 8) == 4
    phase_rows = [r for r in read_metrics(run_dir) if r.get("phase") == SAMPLE_PHASE]
    assert [r["step"] for r in phase_rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in phase_rows)
    main_rows = [r for r in read_metrics(run_dir) if "loss" in r and "phase" not in r]
    assert [r["step"] for r in main_rows] == [1, 2, 3, 4, 5, 6]
    # One pass: every sampled example exactly once (the last global batch holds the 4 left over).
    assert sorted(seen) == [28, 56] and len(seen[56]) == 6
    sample_steps = seen[28]
    assert [len(step) for step in sample_steps] == [8, 8, 8, 4]
    taken = [example for step in sample_steps for example in step]
    assert len(set(taken)) == len(taken) == 28


def test_inspect_of_the_run_prints_what_the_probe_decided(cli_run):
    from safetensors.torch import load_file
    from tinyrun import cli

    run_dir, _, _ = cli_run
    record = json.loads((run_dir / "run.json").read_text())["prepare"]
    result = cli("inspect", run_dir)
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.output.splitlines()
    assert f"LoRA-drop: importance from 28 sampled examples after 4 steps; threshold 0.6" in lines
    kept, total = len(record["kept"]), len(record["importance"])
    assert any(line.startswith(f"kept {kept} of {total} layers with their own LoRA") for line in lines)
    starred = {line.split()[-1] for line in lines if line.startswith("  * ")}
    assert starred == set(record["kept"]) and 0 < kept < total
    # ... and it is what the adapter file holds: own keys for the kept layers, one shared pair per shape
    state = load_file(run_dir / "adapter_model.safetensors")
    own = {k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in state if SHARED_ATTR not in k}
    assert own == set(record["kept"])
    trainable = sum(t.numel() for t in state.values())
    assert trainable == record["params_after"]
    assert any(line.startswith(f"trainable params: {trainable:,} / ") for line in lines)
