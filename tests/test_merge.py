"""`lorafam merge` writes the adapted model, and checks that it did.

Every registered variant is trained with the real `lorafam train` on a tiny Llama (no biases) and a
tiny Qwen2 (biases on q/k/v only), merged with the real `lorafam merge`, and the folder is read back
the way users read it: plain `from_pretrained`, no lorafam code. Then the check's own error path (a
tampered file, a dropped bias), and GLoRA's bias terms on layers that can and cannot hold a bias.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from safetensors.torch import load_file, save_file
from tinyrun import WORDS, adapter_section, cli, make_model_folder, make_text_data, word_tokenizer, write_recipe
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lorafam.merge
from lorafam.adapters import VARIANTS
from lorafam.merge import load_adapted
from lorafam.modeling import bias_switches
from lorafam.run import open_run

ARCHS = ["llama", "qwen2"]
CHECK_LINE = re.compile(r"^checked: reloaded with transformers, max abs logit difference vs the adapted model (\S+) ")


def tiny_qwen2_config(vocab_size: int) -> Qwen2Config:
    """Qwen2's q/k/v always have a bias, o_proj and the MLP never (no config flag for them)."""
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True,
    )


def make_qwen2_folder(folder: Path) -> Path:
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer)))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge-models")
    return {
        "llama": make_model_folder(root / "llama"),
        "qwen2": make_qwen2_folder(root / "qwen2"),
        "data": make_text_data(root / "train.jsonl"),
    }


def train_run(models: dict[str, Path], arch: str, tmp_path: Path, adapter: dict, **keys) -> tuple[Path, str]:
    """A finished run of the real `lorafam train` (6 steps at lr 1e-2); returns it and train's output."""
    recipe = write_recipe(
        tmp_path / f"{arch}.yaml", models[arch], models["data"], tmp_path / "run", adapter=adapter,
        train={"max_steps": 6, "save_every": None} | keys.get("train", {}),
    )
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output + result.stderr
    return tmp_path / "run", result.stdout


def all_linear(variant: str, **extra) -> dict:
    return adapter_section(variant) | {"target_modules": "all-linear"} | extra


def probe_ids(vocab_size: int) -> torch.Tensor:
    """Not merge's own probe batch: the test checks on inputs merge never saw."""
    return torch.randint(3, vocab_size, (3, 11), generator=torch.Generator().manual_seed(7))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(input_ids=ids).logits


def reload_plain(folder: Path, auto=AutoModelForCausalLM):
    """The merged folder as a user loads it, asserting transformers used every tensor in it."""
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["unexpected_keys"], f"tensors in the file that transformers dropped: {info['unexpected_keys']}"
    assert not info["missing_keys"], f"tensors transformers had to initialize: {info['missing_keys']}"
    return model.eval()


def checked_difference(stdout: str) -> float:
    found = [CHECK_LINE.match(line) for line in stdout.splitlines()]
    found = [m for m in found if m]
    assert len(found) == 1, stdout
    return float(found[0].group(1))


# --------------------------------------------------------------------------------------------------
# Every variant: the folder users get is the adapted model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_merged_folder_reloaded_by_plain_transformers_equals_the_adapted_model(name, arch, models, tmp_path):
    run, _ = train_run(models, arch, tmp_path, all_linear(name))
    result = cli("merge", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + result.stderr
    assert checked_difference(result.stdout) < 1e-4

    plain = reload_plain(tmp_path / "merged")
    adapted, _ = load_adapted(open_run(run))
    base = AutoModelForCausalLM.from_pretrained(models[arch])
    ids = probe_ids(plain.config.vocab_size)
    expected = logits(adapted, ids)
    assert (expected - logits(base, ids)).abs().max() > 1e-3, "training left the adapter without effect"
    assert (logits(plain, ids) - expected).abs().max() < 1e-4


def test_sequence_classifier_merge_is_checked_and_reloads(tmp_path):
    """A BERT classifier (biases everywhere, a trained head): AutoModelForSequenceClassification."""
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer), num_labels=2)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    data = tmp_path / "labels.jsonl"
    rows = [{"text": " ".join(WORDS[i % 7 : i % 7 + 6]), "label": "odd" if i % 2 else "even"} for i in range(40)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = write_recipe(
        tmp_path / "cls.yaml", tmp_path / "bert", data, tmp_path / "run",
        adapter=adapter_section("glora") | {"target_modules": ["query", "value"]},
        train={"max_steps": 6, "save_every": None},
    )
    text = recipe.read_text().replace("model:\n", "model:\n  task: sequence-classification\n", 1)
    recipe.write_text(text)
    assert cli("train", recipe).exit_code == 0
    result = cli("merge", tmp_path / "run", "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + result.stderr
    assert checked_difference(result.stdout) < 1e-4
    plain = reload_plain(tmp_path / "merged", AutoModelForSequenceClassification)
    adapted, _ = load_adapted(open_run(tmp_path / "run"))
    ids = probe_ids(plain.config.vocab_size)
    assert (logits(plain, ids) - logits(adapted, ids)).abs().max() < 1e-4


def test_merge_of_a_4bit_run_is_checked_against_the_dequantized_adapted_model(models, tmp_path):
    run, _ = train_run(models, "llama", tmp_path, all_linear("lora"))
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("quantization: null", "quantization: nf4"))
    result = cli("merge", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + result.stderr
    assert checked_difference(result.stdout) < 1e-4  # fp32 vs fp32: the dequantized base is exact in both


@pytest.mark.parametrize("name", ["lora", "glora"])
def test_the_check_changes_nothing_merge_writes_in_bfloat16(name, models, tmp_path):
    """The check runs the adapted model in fp32 and puts it back: a bf16 merge writes the same bits
    with and without it, and passes it within the bf16 tolerance."""
    run, _ = train_run(models, "llama", tmp_path, all_linear(name))
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("  dtype: float32\n", "  dtype: bfloat16\n", 1))
    checked = cli("merge", run, "--output", tmp_path / "checked")
    assert checked.exit_code == 0, checked.output + checked.stderr
    assert 0 < checked_difference(checked.stdout) < lorafam.merge.CHECK_TOLERANCE[torch.bfloat16]
    assert cli("merge", run, "--output", tmp_path / "unchecked", "--no-verify").exit_code == 0
    written = [load_file(tmp_path / folder / "model.safetensors") for folder in ("checked", "unchecked")]
    assert written[0].keys() == written[1].keys()
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, written[1][k]) for k, t in written[0].items())


# --------------------------------------------------------------------------------------------------
# The check fails loudly and leaves nothing behind


def tamper(module: str, amount: float):
    """A save step that writes the folder, then shifts one weight in the written file."""
    write = lorafam.merge._write_folder

    def tampered(model, tokenizer, folder: Path) -> None:
        write(model, tokenizer, folder)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        tensors[f"{module}.weight"] += amount
        save_file(tensors, path, metadata={"format": "pt"})

    return tampered


def assert_failed_and_wrote_nothing(result, parent: Path) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: merge check failed: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not (parent / "merged").exists()
    assert not list(parent.glob(".merged*")), "a temporary folder was left behind"
    return lines[0]


def test_a_tampered_merged_file_fails_the_check_naming_the_module(models, tmp_path, monkeypatch):
    run, _ = train_run(models, "llama", tmp_path, all_linear("lora"))
    monkeypatch.setattr(lorafam.merge, "_write_folder", tamper("model.layers.1.mlp.down_proj", 0.05))
    line = assert_failed_and_wrote_nothing(cli("merge", run, "--output", tmp_path / "merged"), tmp_path)
    assert "first module whose output differs: model.layers.1.mlp.down_proj " in line
    found = re.search(r"differ from the adapted model's by (\S+) \(tolerance (\S+):", line)
    assert found and float(found.group(1)) > float(found.group(2)) > 0

    # --no-verify writes it anyway, and says it did not check.
    result = cli("merge", run, "--output", tmp_path / "merged", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "not checked (--no-verify)" in result.stdout.splitlines()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_bias_transformers_drops_on_load_fails_the_check(models, tmp_path, monkeypatch):
    """The bug this check exists for: GLoRA's new biases written, but the config not told about them."""
    run, _ = train_run(models, "llama", tmp_path, all_linear("glora"))
    monkeypatch.setattr(lorafam.merge, "switch_on_biases", lambda model: [])
    line = assert_failed_and_wrote_nothing(cli("merge", run, "--output", tmp_path / "merged"), tmp_path)
    assert "first module whose output differs: model.layers.0.self_attn.q_proj " in line
    assert "transformers did not load 14 tensor(s) of the file, e.g. model.layers.0.self_attn.q_proj.bias" in line


# --------------------------------------------------------------------------------------------------
# GLoRA's bias terms


def test_bias_switches_are_found_by_building_the_class_with_the_flag_on():
    llama = LlamaForCausalLM(tiny_llama_config(vocab_size=64))
    switches = bias_switches(llama)
    assert switches["model.layers.1.self_attn.o_proj"] == "attention_bias"
    assert switches["model.layers.0.mlp.down_proj"] == "mlp_bias"
    assert len(switches) == 2 * 7 and "lm_head" not in switches
    assert bias_switches(Qwen2ForCausalLM(tiny_qwen2_config(64))) == {}  # q/k/v have one; nothing adds more
    assert bias_switches(torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))) is None  # nothing reloads by config


def test_glora_merge_on_llama_switches_the_config_flags_so_the_biases_load(models, tmp_path):
    run, stdout = train_run(models, "llama", tmp_path, adapter_section("glora") | {"target_modules": ["q_proj", "down_proj"]})
    assert (
        "glora: W0 C + E becomes a new bias on q_proj, down_proj (4 layers); merge turns on attention_bias, "
        "mlp_bias in the merged config so transformers loads it"
    ) in stdout.splitlines()
    result = cli("merge", run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output + result.stderr
    assert "merged config: attention_bias, mlp_bias switched on, so the biases the adapter added load" in result.stdout

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    plain = reload_plain(tmp_path / "merged")  # every bias in the file loaded, none made up
    _, variant = load_adapted(open_run(run))
    for path, layer in variant.layers.items():
        _, bias = layer.effective_weight_and_bias()
        assert bias.abs().max() > 0
        torch.testing.assert_close(plain.get_submodule(path).bias, bias.detach())
    # Layers the flags give a bias but the adapter did not touch get an exact zero one.
    assert torch.equal(plain.model.layers[0].self_attn.k_proj.bias, torch.zeros(16))


def test_glora_on_qwen2_leaves_out_bias_terms_where_no_bias_can_load(models, tmp_path):
    run, stdout = train_run(models, "qwen2", tmp_path, all_linear("glora"))
    note = (
        "glora: C and E (the terms that add a bias) are off on o_proj, gate_proj, up_proj, down_proj (8 layers): "
        "Qwen2ForCausalLM has no bias there and no config flag that adds one, so a merged model could not hold it"
    )
    assert note in stdout.splitlines()
    keys = load_file(run / "adapter_model.safetensors").keys()
    for layer in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        has_c = any(f"layers.0.{layer}.glora_C." in k for k in keys)
        has_e = any(f"layers.0.{layer}.glora_E." in k for k in keys)
        assert has_c == has_e == (layer == "self_attn.q_proj"), layer  # q/k/v have a bias: C, D, E stay
    inspected = cli("inspect", run)
    assert inspected.exit_code == 0 and note in inspected.stdout.splitlines()
    # With every bias term on a layer that holds one, PEFT computes the same function: labelled GLORA.
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "GLORA"
