"""Tiny local model folders, data files and recipes for tests that run the real `lorafam` CLI.

The model is a 2-layer Llama (hidden 32) over a 40-word vocabulary with a word-level tokenizer, so
a whole `lorafam train` of a dozen steps runs in about a second in-process. Also the two ways tests
run the CLI: ``cli`` (in-process) and ``cli_subprocess``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from conftest import tiny_llama_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner, Result

from lorafam.cli import app

WORDS = (
    "the a quick brown fox jumps over lazy dog cat sat on mat and ran to see big small red blue "
    "green tree house river sun moon star day night one two three four"
).split()
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# A chat template over the word vocabulary: roles and markers outside it become <unk>, which is
# fine for a template (it is never trained), and each turn ends with <eos>.
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_model_folder(folder: Path, chat_template: bool = True) -> Path:
    """A Hugging Face model folder (config, safetensors weights, tokenizer) with random weights."""
    tokenizer = word_tokenizer()
    if chat_template:
        tokenizer.chat_template = WORD_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_moe_config(arch: str, vocab_size: int = 64):
    """A 2-layer mixture-of-experts config (4 experts, top 2, hidden 32): Qwen3-MoE or Mixtral, whose
    experts transformers 5 stores fused, as 3-D parameters."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=0,
                  tie_word_embeddings=True, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, **common)
    if arch == "mixtral":
        return MixtralConfig(intermediate_size=16, num_local_experts=4, **common)
    raise ValueError(arch)


def make_moe_model_folder(folder: Path, arch: str) -> Path:
    """``make_model_folder`` with a tiny mixture-of-experts model (``tiny_moe_config``)."""
    from transformers import AutoModelForCausalLM

    tokenizer = word_tokenizer()
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, vocab_size=len(tokenizer)))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_text_data(path: Path, rows: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))}) + "\n")
    return path


def make_chat_data(path: Path, rows: int = 64, seed: int = 0) -> Path:
    """User/assistant pairs of very different lengths, so micro-batches differ in label tokens."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    with path.open("w") as f:
        for _ in range(rows):
            messages = [{"role": "user", "content": words(2, 12)}, {"role": "assistant", "content": words(1, 14)}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# Variant keys that make a 12-step run exercise each variant's own state: AdaLoRA prunes between
# steps 2 and 10 (its score EMAs matter across a resume), Delta-LoRA's W starts moving at step 3.
VARIANT_KEYS: dict[str, dict[str, Any]] = {
    "adalora": {"tinit": 2, "tfinal": 2, "delta_t": 1, "target_r": 2},
    "delta_lora": {"start_step": 3},
}


#: The variants whose recipe refuses adapter dropout (test_variants.py checks that exactly these do).
#: Every other variant runs the tiny runs with dropout on, so a resume and another batch layout must give
#: every example the masks it had (lorafam.adapters.dropout).
REFUSES_DROPOUT = frozenset({"delta_lora", "glora"})


def adapter_section(variant: str, dropout: float = 0.1) -> dict[str, Any]:
    """r=4 on q_proj/v_proj, with adapter dropout unless the variant refuses it."""
    section = {"variant": variant, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    section |= VARIANT_KEYS.get(variant, {})
    section["dropout"] = 0.0 if variant in REFUSES_DROPOUT else dropout
    return section


def write_recipe(
    path: Path,
    model: Path,
    data: Path,
    output_dir: Path,
    adapter: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    data_keys: dict[str, Any] | None = None,
) -> Path:
    recipe = {
        "model": {"name": str(model)},
        "adapter": adapter or adapter_section("lora"),
        "data": {"train": str(data), "max_length": 24, "eval_split": 0.125} | (data_keys or {}),
        "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 2, "seed": 3}
        | (train or {}),
        "output_dir": str(output_dir),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(*args: Any, input: str | None = None, terminal_width: int | None = None) -> Result:
    """`lorafam ARGS` in this process (seconds saved per call over a subprocess); ``input`` is its
    stdin (a pipe, not a terminal)."""
    return CliRunner().invoke(
        app, [str(a) for a in args], input=input, terminal_width=terminal_width, catch_exceptions=False
    )


def cli_env() -> dict[str, str]:
    # No progress bars: stderr must be exactly the lines under test.
    return os.environ | {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "OMP_NUM_THREADS": "1",
    }


def cli_subprocess(
    *args: Any,
    launcher: Sequence[Any] = (sys.executable, "-m", "lorafam"),
    input: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """`python -m lorafam ARGS` as a user runs it (real stdin, stderr, exit code and signals).

    ``launcher`` is what ARGS follow (e.g. `accelerate launch ...` with a script or `-m lorafam` in
    ARGS); ``env`` is the whole environment, ``cli_env()`` unless given.
    """
    return subprocess.run(
        [*map(str, launcher), *map(str, args)],
        input=input, capture_output=True, text=True, env=cli_env() if env is None else env, timeout=timeout, cwd=cwd,
    )


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
