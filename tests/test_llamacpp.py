"""llama.cpp as the client: the exported GGUF files run by llama.cpp's own tools (b11434).

Tiny Llama (ChatML and Llama 3 byte-level BPE), Qwen2 and Mistral (sentencepiece BPE) runs are
trained through `lorafam train` (tests/test_export.py's models) and exported both ways:

* ``--format gguf --quant f32``: ``llama-tokenize`` must give the tokenizer's ids (plain text and
  chat-template text with special tokens); ``llama-simple`` and ``llama-completion`` must continue a
  prompt greedily exactly as transformers' merged model does; ``llama-perplexity`` must run.
* ``--format gguf-lora --base``: llama.cpp with the base GGUF and ``--lora`` must continue exactly as
  the merged GGUF and as transformers with the adapter, for every variant the format can hold; the
  others are refused in one line. The adapter's arithmetic is also checked without llama.cpp:
  base tensor + lora_b @ lora_a = the merged GGUF's tensor.

The binaries come from scripts/build_llamacpp.sh (tests/llamacpp.py); without them these tests skip,
except under CI, where they fail.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_export import MODELS, build_run, gguf_file
from tinyrun import WORDS, adapter_section, cli
from tinyrun import one_thread  # noqa: F401  (an autouse fixture, active where imported)
from transformers import AutoTokenizer

import llamacpp
from lorafam.adapters import VARIANTS
from lorafam.export.adapter import low_rank_refusal
from lorafam.merge import load_adapted, merged_model
from lorafam.run import open_run

PROMPT = "the quick brown fox"
NEW_TOKENS = 16
#: A continuation is compared over at least this many tokens (fewer would let an early end-of-text
#: token make the comparison vacuous).
MIN_COMPARED = 8


def greedy_ids(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ``ids`` (argmax of fp32 logits, first index on ties, as llama.cpp)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            ids.append(int(logits.argmax()))
    return ids


def expected_text(tokenizer, prompt_ids: list[int], generated: list[int]) -> tuple[str, int, bool]:
    """What llama-completion prints for ``generated`` (its text only, special tokens unprinted), cut at
    the first special token: (text, tokens compared, whether it was cut). llama.cpp stops at an
    end-of-generation token and prints nothing for other control tokens, so after a cut it may print
    more than this text but never different text before it."""
    specials = set(tokenizer.all_special_ids)
    cut = next((i for i, t in enumerate(generated) if t in specials), len(generated))
    whole = tokenizer.decode(prompt_ids + generated[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    start = tokenizer.decode(prompt_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert whole.startswith(start)
    return whole[len(start):], cut, cut < len(generated)


def assert_same_continuation(got: str, want: tuple[str, int, bool], what: str) -> None:
    text, compared, cut = want
    assert compared >= MIN_COMPARED, f"only {compared} tokens before a special token: choose another prompt"
    if cut:
        assert got.startswith(text), (what, got, text)
    else:
        assert got == text, (what, got, text)


# ------------------------------------------------------------------------------------------------
# Merged exports, one per tiny architecture


@pytest.fixture(scope="module", params=list(MODELS))
def merged(request, tmp_path_factory):
    """(name, run, merged f32 GGUF) per tiny model."""
    root = tmp_path_factory.mktemp(request.param)
    run = build_run(root, request.param)
    result = cli("export", run, "--format", "gguf", "--quant", "f32", "--output", root / "f32")
    assert result.exit_code == 0, result.output
    return request.param, run, gguf_file(root / "f32")


def test_llama_tokenize_gives_the_tokenizers_ids(merged):
    name, run, path = merged
    tokenizer = AutoTokenizer.from_pretrained(run)
    texts = [PROMPT, "Hello there! It's 2024, naïve café, 3.14, tabs\tand   spaces\nnew lines", " leading space"]
    for text in texts:
        assert llamacpp.tokenize(path, text) == tokenizer(text)["input_ids"], (name, text)
    # Chat-template text: its special tokens (<|im_start|>, <|eot_id|>, <s>, [INST]) are parsed as such.
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "and of Spain?"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = tokenizer(chat, add_special_tokens=False)["input_ids"]
    got = llamacpp.tokenize(path, chat)
    if got[:1] != want[:1] and got[0] == tokenizer.bos_token_id:
        got = got[1:]  # llama-tokenize adds BOS where the model asks; the template wrote its own
    assert got == want, name
    assert set(want) & set(tokenizer.all_special_ids), "the chat text must hold special tokens"


def test_llama_completion_and_simple_continue_like_transformers(merged):
    name, run, path = merged
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = merged_model(open_run(run)).float().eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    generated = greedy_ids(model, prompt_ids, NEW_TOKENS)[len(prompt_ids):]
    want = expected_text(tokenizer, prompt_ids, generated)
    assert_same_continuation(llamacpp.complete(path, PROMPT, NEW_TOKENS), want, (name, "llama-completion"))
    # llama-simple (greedy, f16 KV cache) echoes the prompt's pieces first, then the continuation.
    echoed = llamacpp.simple(path, PROMPT, NEW_TOKENS)
    assert PROMPT in echoed
    assert_same_continuation(echoed[echoed.index(PROMPT) + len(PROMPT):], want, (name, "llama-simple"))


def test_llama_perplexity_runs_on_the_export(merged, tmp_path):
    name, _, path = merged
    rng = np.random.default_rng(0)
    text = tmp_path / "words.txt"
    text.write_text(" ".join(rng.choice(WORDS, size=400)))
    out = llamacpp.run("llama-perplexity", "-m", path, "-f", text, "-c", 64, "-b", 64, "-t", 1, "--chunks", 2)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    assert match, out.stderr[-2000:]
    ppl = float(match.group(1))
    # Finite, and better than uniform over the vocabulary: the model learned these words.
    assert math.isfinite(ppl) and 1 < ppl < len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data), (name, ppl)


# ------------------------------------------------------------------------------------------------
# The adapter alone: every variant in the registry, plus LoRA's rsLoRA and PiSSA options

CASES = {name: {} for name in VARIANTS} | {"rslora": {"variant": "lora", "rslora": True, "alpha": 16},
                                           "pissa": {"variant": "lora", "init": "pissa"}}
#: What the papers say the update is, stated here so a wrong classification fails: DoRA rescales
#: W's rows, Delta-LoRA moves W, GLoRA has no single pair, PiSSA trains on a changed W.
NOT_A_PRODUCT = {"dora", "delta_lora", "glora", "pissa"}


def case_section(case: str) -> dict:
    overrides = dict(CASES[case])
    section = adapter_section(overrides.pop("variant", case)) | {"target_modules": "all-linear"} | overrides
    return section


@pytest.mark.parametrize("case", list(CASES))
def test_which_variants_are_a_low_rank_product(case):
    section = case_section(case)
    config = VARIANTS[section["variant"]].Config(**section)
    refusal = low_rank_refusal(config)
    assert (refusal is not None) == (case in NOT_A_PRODUCT), (case, refusal)


@pytest.fixture(scope="module", params=[c for c in CASES if c not in NOT_A_PRODUCT])
def lora_export(request, tmp_path_factory):
    """A tiny Llama run of the variant exported as base + adapter (f32) and merged (f32)."""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    run = build_run(root, "llama-chatml", adapter=case_section(case), steps=12)
    result = cli("export", run, "--format", "gguf-lora", "--base", "--quant", "f32", "--output", root / "lora")
    assert result.exit_code == 0, result.output
    assert "LoRA GGUF written to" in result.output
    result = cli("export", run, "--format", "gguf", "--quant", "f32", "--output", root / "merged")
    assert result.exit_code == 0, result.output
    adapter = next((root / "lora").glob("*-LoRA-F32.gguf"))
    base = next(p for p in (root / "lora").glob("*.gguf") if p != adapter)
    return case, run, base, adapter, gguf_file(root / "merged")


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data, dtype=np.float64).reshape(tuple(reversed(t.shape.tolist()))) for t in gguf.GGUFReader(path).tensors}


def test_base_plus_lora_tensors_are_the_merged_tensors(lora_export):
    """Without llama.cpp: the adapter file's metadata, and base + B A = merged for every tensor."""
    case, run, base, adapter, merged_path = lora_export
    reader = gguf.GGUFReader(adapter)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 0.0
    lora, base_t, merged_t = tensors(adapter), tensors(base), tensors(merged_path)
    assert set(base_t) == set(merged_t)
    updated = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert updated and {f"{n}.lora_{s}" for n in updated for s in "ab"} == set(lora)
    # The adapter holds exactly the tensors the merge changed (all-linear: up to 7 per block; AdaLoRA
    # leaves out matrices pruned to rank 0, which the merge leaves as they were).
    changed = {name for name, weight in base_t.items() if np.abs(merged_t[name] - weight).max() > 1e-6}
    assert updated == changed and len(updated) >= 4, (case, sorted(updated ^ changed))
    for name, weight in base_t.items():
        want = merged_t[name]
        got = weight + lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"] if name in updated else weight
        scale = max(1.0, np.abs(want).max())
        assert np.abs(got - want).max() < 1e-5 * scale, (case, name, np.abs(got - want).max())


def test_llama_cpp_with_lora_continues_like_the_merged_model(lora_export):
    case, run, base, adapter, merged_path = lora_export
    tokenizer = AutoTokenizer.from_pretrained(run)
    model, _ = load_adapted(open_run(run))  # transformers with the adapter, unmerged
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    generated = greedy_ids(model.float().eval(), prompt_ids, NEW_TOKENS)[len(prompt_ids):]
    want = expected_text(tokenizer, prompt_ids, generated)
    with_lora = llamacpp.complete(base, PROMPT, NEW_TOKENS, lora=adapter)
    assert_same_continuation(with_lora, want, (case, "base + --lora"))
    assert_same_continuation(llamacpp.complete(merged_path, PROMPT, NEW_TOKENS), want, (case, "merged"))
    # The adapter matters in llama.cpp: without it the base continues differently.
    assert llamacpp.complete(base, PROMPT, NEW_TOKENS) != with_lora, case


@pytest.mark.parametrize("case", sorted(NOT_A_PRODUCT))
def test_variants_that_are_not_a_product_are_refused_in_one_line(case, tmp_path):
    run = build_run(tmp_path, "llama-chatml", adapter=case_section(case), steps=4)
    result = cli("export", run, "--format", "gguf-lora", "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --format gguf-lora: a ") and "--format gguf" in line.split("instead")[-1], line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
