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

import copy
import json
import math
import re
from pathlib import Path

import gguf
import huggingface_hub
import numpy as np
import pytest
import torch
from test_export import MODELS, build_run, gguf_file, go_render  # noqa: F401 (a fixture)
from tinyrun import WORDS, adapter_section, cli
from transformers import AutoTokenizer

import llamacpp
from lorafam.adapters import VARIANTS
from lorafam.export.adapter import low_rank_refusal
from lorafam.merge import load_adapted, merged_model
from lorafam.quant import dequantize_model
from lorafam.run import open_run

PROMPT = "the quick brown fox"
NEW_TOKENS = 16
#: Tiny models whose greedy continuations vary (std 0.3 weights: a 0.02 init makes a 64-wide model
#: repeat one token, which would compare almost nothing). Measured: the smallest top-1/top-2 logit gap
#: along these continuations is ~0.01, three orders above the f32 difference of two implementations.
VARIED = {"initializer_range": 0.3}


def banned_ids(tokenizer, vocab_rows: int) -> list[int]:
    """Special tokens and the padding rows of the embedding: never generated in the comparisons, so
    every one of NEW_TOKENS tokens is compared (llama.cpp stops at end-of-generation tokens and
    prints nothing for control tokens; transformers would go on)."""
    return sorted(set(tokenizer.all_special_ids) | set(range(len(tokenizer), vocab_rows)))


def greedy_ids(model: torch.nn.Module, ids: list[int], n: int, banned: list[int] = ()) -> list[int]:
    """n greedy tokens after ``ids`` (argmax of fp32 logits, first index on ties, as llama.cpp)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logits[list(banned)] = -torch.inf
            ids.append(int(logits.argmax()))
    return ids


def continuation(tokenizer, model: torch.nn.Module, prompt: str = PROMPT, n: int = NEW_TOKENS) -> str:
    """transformers' greedy continuation of ``prompt`` as llama.cpp prints it: the text the new tokens
    add to the prompt's text."""
    banned = banned_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = greedy_ids(model, prompt_ids, n, banned)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    whole, start = decode(ids), decode(prompt_ids)
    assert whole.startswith(start)
    return whole[len(start):]


def llama_perplexity(path: Path, text: Path, lora: Path | None = None) -> float:
    """llama-perplexity's final estimate on ``text``: 2 chunks of 64 tokens, each scored on its second half.

    In f32 throughout: with flash attention (llama.cpp's default, ``-fa auto``) its CPU kernel rounds
    through f16, which on lora_plus's run at ddfcb37 moved the perplexity by 2.1e-3 relative, where
    ``-fa off`` agreed with transformers to 4e-6."""
    args = ["-m", path, "-f", text, "-c", 64, "-b", 64, "-t", 1, "--chunks", 2, "-ctk", "f32", "-ctv", "f32", "-fa", "off"]
    out = llamacpp.run("llama-perplexity", *args, *(["--lora", lora] if lora else []), complete="Final estimate")
    match = re.search(r"Final estimate: PPL = (\S+)", out.stdout + out.stderr)
    assert match, out.stderr[-2000:]
    return float(match.group(1))


def transformers_perplexity(tokenizer, model: torch.nn.Module, text: Path, n_ctx: int = 64, chunks: int = 2) -> float:
    """llama-perplexity's computation (tools/perplexity/perplexity.cpp) in transformers: the text's ids
    (BOS added where the tokenizer adds one) cut into chunks of n_ctx, each chunk's first token
    replaced by BOS where BOS is added, the negative log-likelihood of the tokens after position
    n_ctx / 2, averaged over all chunks, exponentiated."""
    ids = tokenizer(text.read_text())["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    first, nll, count = n_ctx // 2, 0.0, 0
    with torch.no_grad():
        for i in range(chunks):
            chunk = ids[i * n_ctx:(i + 1) * n_ctx]
            if adds_bos:
                chunk = [tokenizer.bos_token_id] + chunk[1:]
            logprobs = model(input_ids=torch.tensor([chunk])).logits[0].double().log_softmax(-1)
            targets = torch.tensor(ids[i * n_ctx + first + 1:(i + 1) * n_ctx])
            nll -= logprobs[first:n_ctx - 1].gather(1, targets[:, None]).sum().item()
            count += n_ctx - 1 - first
    return math.exp(nll / count)


def words_file(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    path = folder / "words.txt"
    path.write_text(" ".join(rng.choice(WORDS, size=300)))
    return path


# ------------------------------------------------------------------------------------------------
# Merged exports, one per tiny architecture


@pytest.fixture(scope="module", params=list(MODELS))
def merged(request, tmp_path_factory):
    """(name, run, merged f32 GGUF) per tiny model."""
    root = tmp_path_factory.mktemp(request.param)
    run = build_run(root, request.param, config_keys=VARIED)
    result = cli("export", run, "--format", "gguf", "--quant", "f32", "--output", root / "f32")
    assert result.exit_code == 0, result.output
    return request.param, run, gguf_file(root / "f32")


def test_llama_tokenize_gives_the_tokenizers_ids(merged):
    name, run, path = merged
    tokenizer = AutoTokenizer.from_pretrained(run)
    texts = [PROMPT, "Hello there! It's 2024, naïve café, 3.14, tabs\tand   spaces\nnew lines", "a  b\n y"]
    for text in texts:
        assert llamacpp.tokenize(path, text) == tokenizer(text)["input_ids"], (name, text)
    # Text that starts with a space, and text right after a special token: transformers' Metaspace
    # (prepend_scheme "first") adds no "▁" there; llama.cpp's sentencepiece tokenizer adds one to
    # every text piece that follows a special token (add_space_prefix and is_prev_special), as
    # sentencepiece adds its dummy prefix. So for the Mistral layout a lone "▁" token right after a
    # special one is dropped from both sides before comparing chat text (every other id must be
    # equal), and text that starts with a space is compared for byte-level BPE only.
    sentencepiece = MODELS[name][4] is None  # no tokenizer.ggml.pre
    space, specials = tokenizer.convert_tokens_to_ids("\u2581"), set(tokenizer.all_special_ids)

    def without_prefix_spaces(ids: list[int]) -> list[int]:
        return [t for i, t in enumerate(ids) if not (t == space and i > 0 and ids[i - 1] in specials)]

    def same_ids(got: list[int], want: list[int]) -> None:
        if sentencepiece:
            got, want = without_prefix_spaces(got), without_prefix_spaces(want)
        assert got == want, (name, tokenizer.convert_ids_to_tokens(got), tokenizer.convert_ids_to_tokens(want))

    if not sentencepiece:
        assert llamacpp.tokenize(path, " leading space") == tokenizer(" leading space")["input_ids"], name
    # Chat-template text: its special tokens (<|im_start|>, <|eot_id|>, <s>, ...) are parsed as such.
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "and of Spain?"}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert set(want) & set(tokenizer.all_special_ids), "the chat text must hold special tokens"
    got = llamacpp.tokenize(path, chat)
    if tokenizer.bos_token_id is not None and got[:2] == [tokenizer.bos_token_id] * 2:
        got = got[1:]  # llama-tokenize adds BOS where the model asks, before the template's own
    same_ids(got, want)


#: A mixture of experts picks its experts by the order of the router's logits: where the last chosen
#: and the first left-out expert are closer than this, float rounding may pick the other one (measured
#: on the tiny Mixtral: a gap of 2e-4 in router probability flipped an expert in llama.cpp, and the
#: next token with it). Greedy continuations are compared up to the first such step.
ROUTER_LOGIT_MARGIN = 1e-2


def decisive_steps(tokenizer, model: torch.nn.Module, n: int, banned: list[int] = ()) -> int:
    """How many of the first ``n`` greedy steps after PROMPT route every token with a margin of at least
    ROUTER_LOGIT_MARGIN in every layer (``n`` for a dense model)."""
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(getattr(layer, "mlp", None), "gate")]
    if not routers:
        return n
    margins: list[float] = []

    def record(module, args, out):
        top = out[0].float().topk(module.top_k + 1, dim=-1).values
        margins.append(float((top[:, -2] - top[:, -1]).min()))

    hooks = [router.register_forward_hook(record) for router in routers]
    try:
        prompt_ids = tokenizer(PROMPT)["input_ids"]
        ids = greedy_ids(model, prompt_ids, n, banned)
        for step in range(n):  # step s is decided by the forward pass over the first len(prompt) + s ids
            margins.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[:len(prompt_ids) + step]]))
            if min(margins) < ROUTER_LOGIT_MARGIN:
                return step
    finally:
        for hook in hooks:
            hook.remove()
    return n


def test_llama_cpp_continues_greedily_like_transformers(merged):
    name, run, path = merged
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = merged_model(open_run(run)).float().eval()
    banned = banned_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    n = decisive_steps(tokenizer, model, NEW_TOKENS, banned)
    assert n >= 4, (name, n)  # enough to compare; the tiny MoE models' routing near-ties left 6 of 16 in a full CI run
    want = continuation(tokenizer, model, n=n)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    new_ids = greedy_ids(model, prompt_ids, n, banned)[len(prompt_ids):]
    assert len(set(new_ids)) >= 3, want  # a varied continuation (not one token repeated): something to compare
    assert llamacpp.complete(path, PROMPT, n, banned=banned) == want, name
    # llama-simple (greedy over the whole vocabulary, f16 KV cache, no options) echoes the prompt's
    # pieces, then the continuation; it stops at an end-of-generation token, so compare up to there.
    n = decisive_steps(tokenizer, model, NEW_TOKENS)
    echoed = llamacpp.simple(path, PROMPT, n)
    assert PROMPT in echoed, echoed
    got = echoed[echoed.index(PROMPT) + len(PROMPT):]
    unbanned, compared = _greedy_until_special(tokenizer, model, n)
    assert compared >= 4 and got.startswith(unbanned), (name, got, unbanned)


def _greedy_until_special(tokenizer, model: torch.nn.Module, n: int = NEW_TOKENS) -> tuple[str, int]:
    """transformers' unconstrained greedy continuation up to its first special token (llama-simple
    stops at end-of-generation ones), as text and its number of tokens. Padding rows of the
    embedding (no token in the tokenizer) print as nothing, in llama.cpp too."""
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    new = greedy_ids(model, prompt_ids, n)[len(prompt_ids):]
    specials = set(tokenizer.all_special_ids)
    new = new[:next((i for i, t in enumerate(new) if t in specials), len(new))]
    decode = lambda t: tokenizer.decode([i for i in t if tokenizer.convert_ids_to_tokens(i) is not None],  # noqa: E731
                                        skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return decode(prompt_ids + new)[len(decode(prompt_ids)):], len(new)


def test_llama_perplexity_equals_transformers(merged, tmp_path):
    name, run, path = merged
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = merged_model(open_run(run)).float().eval()
    text = words_file(tmp_path)
    got, want = llama_perplexity(path, text), transformers_perplexity(tokenizer, model, text)
    # f32 in both; the sums run in another order (measured: relative 1e-4 on these std-0.3 models,
    # whose logits reach ~100). An unpermuted q/k row or a dropped tensor moves it by far more.
    assert math.isfinite(got) and abs(got - want) < 1e-3 * want, (name, got, want)


# ------------------------------------------------------------------------------------------------
# The adapter alone: every variant in the registry, plus LoRA's rsLoRA and PiSSA options

CASES = {name: {} for name in VARIANTS} | {"rslora": {"variant": "lora", "rslora": True, "alpha": 16},
                                           "pissa": {"variant": "lora", "init": "pissa"}, "qlora": {"variant": "lora"}}
#: Cases trained on a 4-bit NF4 base: the base GGUF is the dequantized base they were trained against.
MODEL_KEYS = {"qlora": {"quantization": "nf4", "compute_dtype": "float32"}}
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
    run = build_run(root, "llama-chatml", adapter=case_section(case), steps=12, config_keys=VARIED, model_keys=MODEL_KEYS.get(case))
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


def test_llama_cpp_with_lora_computes_the_adapted_model(lora_export, tmp_path):
    """base GGUF + --lora in llama.cpp = merged GGUF in llama.cpp = transformers with the adapter:
    the same greedy continuation, and the same perplexity (a check on every logit of the scored
    positions, not only the top one)."""
    case, run, base, adapter, merged_path = lora_export
    tokenizer = AutoTokenizer.from_pretrained(run)
    model, _ = load_adapted(open_run(run))  # transformers with the adapter, unmerged
    # fp32; a 4-bit base as its dequantized weights (what the adapter was trained against).
    model = dequantize_model(model, torch.float32).eval()
    want = continuation(tokenizer, model)
    banned = banned_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    with_lora = llamacpp.complete(base, PROMPT, NEW_TOKENS, lora=adapter, banned=banned)
    assert with_lora == want, (case, with_lora, want)
    assert llamacpp.complete(merged_path, PROMPT, NEW_TOKENS, banned=banned) == want, case
    # The adapter matters in llama.cpp: without it the base continues differently.
    assert llamacpp.complete(base, PROMPT, NEW_TOKENS, banned=banned) != want, case

    text = words_file(tmp_path)
    ppl = transformers_perplexity(tokenizer, model, text)
    with_lora, base_only = llama_perplexity(base, text, lora=adapter), llama_perplexity(base, text)
    assert abs(with_lora - ppl) < 1e-3 * ppl, (case, with_lora, ppl)
    assert abs(base_only - ppl) > 1e-2 * ppl, (case, base_only, ppl)


@pytest.mark.parametrize("case", sorted(NOT_A_PRODUCT))
def test_variants_that_are_not_a_product_are_refused_in_one_line(case, tmp_path):
    run = build_run(tmp_path, "llama-chatml", adapter=case_section(case), steps=4)
    result = cli("export", run, "--format", "gguf-lora", "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --format gguf-lora: a ") and "--format gguf" in line.split("instead")[-1], line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_modelfile_adds_the_adapter_to_the_base(lora_export):
    case, _, base, adapter, _ = lora_export
    lines = (adapter.parent / "Modelfile").read_text().splitlines()
    assert f"FROM ./{base.name}" in lines and f"ADAPTER ./{adapter.name}" in lines
    assert lines.index(f"ADAPTER ./{adapter.name}") == lines.index(f"FROM ./{base.name}") + 1
    assert any(line.startswith('TEMPLATE """') for line in lines) and 'PARAMETER stop "<|im_end|>"' in lines


@pytest.mark.parametrize("base", [True, False])
def test_adapter_gguf_card_says_how_to_run_it_on_a_base(tmp_path, base):
    """`export --format gguf-lora` writes a card whose commands name the files in the folder (and, with
    no base written, say that the user brings one)."""
    run = build_run(tmp_path, "llama-chatml", steps=2)
    result = cli("export", run, "--format", "gguf-lora", *(["--base", "--quant", "f32"] if base else []),
                 "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    card = huggingface_hub.ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "gguf" and "base_model" not in card.data.to_dict()  # a local base: no Hub id to name
    files = sorted(p.name for p in (tmp_path / "out").glob("*.gguf"))
    adapter = next(f for f in files if "-LoRA-" in f)
    assert f"--lora {adapter}" in card.text and "ollama create" in card.text
    if base:
        (base_file,) = [f for f in files if f != adapter]
        assert f"llama-completion -m {base_file} --lora {adapter}" in card.text and "bring a GGUF" not in card.text
    else:
        assert files == [adapter] and "bring a GGUF of the base model" in card.text


def test_adapter_alone_without_base_says_what_from_must_name(tmp_path):
    run = build_run(tmp_path, "llama-chatml", steps=4)
    result = cli("export", run, "--format", "gguf-lora", "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert [p.name for p in sorted((tmp_path / "out").glob("*.gguf"))] == ["run-LoRA-F32.gguf"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM must be the base model this adapter was trained on" in modelfile
    assert "ADAPTER ./run-LoRA-F32.gguf\n" in modelfile
    assert "llama.cpp: llama-completion -m BASE.gguf --lora" in result.output
    # --base belongs to gguf-lora only.
    other = cli("export", run, "--format", "gguf", "--base", "--output", tmp_path / "merged")
    assert other.exit_code == 2 and "--base is for --format gguf-lora" in other.output


# ------------------------------------------------------------------------------------------------
# The Modelfile's chat template and stop tokens, as Ollama uses them


def short_reply_data(path: Path, rows: int = 48) -> Path:
    """Chats whose assistant replies are two or three words: a tiny model learns within a few dozen
    steps to answer and then end its turn, so there is a stopping point to compare."""
    rng = np.random.default_rng(0)
    replies = ["yes indeed", "no thanks", "the red sun"]
    with path.open("w") as f:
        for i in range(rows):
            user = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": replies[i % 3]}]}) + "\n")
    return path


@pytest.mark.parametrize("name", ["llama-chatml", "llama3-untied"])
def test_modelfile_template_and_stops_end_the_reply_where_the_merged_model_does(name, tmp_path, go_render):
    """The exported chat model as Ollama runs it: the prompt is the Modelfile's TEMPLATE rendered by
    Go's text/template (Ollama's engine), llama.cpp generates greedily, and the reply ends at the
    first of the Modelfile's stop strings (llama.cpp prints special tokens here, so the stop strings,
    not llama.cpp's own end-of-generation list, are what end it). That reply, and where it ends,
    must be transformers' greedy reply from the merged model, which ends at its EOS."""
    run = build_run(tmp_path, name, steps=60, data=short_reply_data(tmp_path / "chats.jsonl"),
                    data_keys={"max_length": 64}, config_keys=VARIED)
    exported = cli("export", run, "--format", "gguf", "--quant", "f32", "--output", tmp_path / "f32")
    assert exported.exit_code == 0, exported.output
    modelfile = (tmp_path / "f32" / "Modelfile").read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)

    tokenizer = AutoTokenizer.from_pretrained(run)
    model = merged_model(open_run(run)).float().eval()
    messages = [{"role": "user", "content": "the lazy dog"}]
    (prompt,) = go_render(template, [{"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}])
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert prompt_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt_ids):].tolist()
    assert out[-1] == tokenizer.eos_token_id and len(out) < NEW_TOKENS, tokenizer.decode(out)  # it stopped, at EOS
    want = tokenizer.decode(out[:-1])
    assert want.strip(), "an empty reply compares nothing"

    printed = llamacpp.complete(gguf_file(tmp_path / "f32"), prompt, NEW_TOKENS, extra=("--special",))
    ends = [printed.index(stop) for stop in stops if stop in printed]
    assert ends, (printed, stops)  # a stop string ended it, not the token limit
    assert printed[:min(ends)] == want, (printed, stops, want)


# ------------------------------------------------------------------------------------------------
# The packaged SmolLM2 (its real 49k vocabulary and chat template), fine-tuned for a few steps


@pytest.mark.slow
def test_packaged_smollm2_adapter_in_llama_cpp(tmp_path):
    from tinyrun import cli_subprocess

    llamacpp.tool("llama-completion")  # skip (or fail under CI) before the minutes of training
    root = Path(__file__).parent.parent
    run, out = tmp_path / "run", tmp_path / "lora"
    trained = cli_subprocess(
        "train", root / "recipes" / "quickstart.yaml",
        "--set", "train.max_steps=4", "--set", "train.warmup_steps=0", "--set", "train.lr=3e-3",
        "--set", "data.max_samples=32", "--set", "data.max_length=64", "--set", "train.batch_size=4",
        "--set", "train.grad_accum=1", "--set", "train.eval_max_batches=1", "--set", "train.sample_prompt=null",
        "--set", "train.mixed_precision=no", "--set", f"output_dir={run}", timeout=900,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = cli_subprocess("export", run, "--format", "gguf-lora", "--base", "--quant", "f32", "--output", out, timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    adapter = next(out.glob("*-LoRA-F32.gguf"))
    base = next(p for p in out.glob("*.gguf") if p != adapter)
    assert adapter.stat().st_size < 2**22  # r=8 on q/k/v/o of 30 blocks: ~3.5 MB, not the model's 0.5 GB

    tokenizer = AutoTokenizer.from_pretrained(run)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert llamacpp.tokenize(base, chat) == tokenizer(chat)["input_ids"]

    model, _ = load_adapted(open_run(run))
    model = dequantize_model(model, torch.float32).eval()
    banned = banned_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    want = continuation(tokenizer, model, prompt=chat)
    assert llamacpp.complete(base, chat, NEW_TOKENS, lora=adapter, banned=banned) == want
    text = words_file(tmp_path)
    ppl = transformers_perplexity(tokenizer, model, text)
    with_lora, base_only = llama_perplexity(base, text, lora=adapter), llama_perplexity(base, text)
    assert abs(with_lora - ppl) < 1e-3 * ppl, (with_lora, ppl)
    assert abs(base_only - ppl) > 1e-3 * ppl, (base_only, ppl)  # the adapter is applied

    # The merged export at f16 and q8_0 against transformers' fp32 merged model.
    merged = merged_model(open_run(run)).float().eval()
    for quant in ("f16", "q8_0"):
        exported = cli_subprocess("export", run, "--format", "gguf", "--quant", quant, "--output", tmp_path / quant, timeout=900)
        assert exported.returncode == 0, exported.stderr[-3000:]
        compare_quantized_continuation(tokenizer, merged, gguf_file(tmp_path / quant), quant, chat, banned)


#: How far llama.cpp's quantized model may be from the fp32 one, as a multiple of the logit error the
#: rounded weights alone cause (measured below in fp32): ggml's CPU matmuls also round the
#: activations to the weights' dot-product type (f16 for f16, q8_0 for q8_0, the same rounding
#: scheme at the same relative size), and the two errors add up at most.
ROUNDING_ALLOWANCE = 2.0
QUANTIZED_TOKENS = 24


def compare_quantized_continuation(tokenizer, model: torch.nn.Module, path: Path, quant: str, prompt: str,
                                   banned: list[int]) -> tuple[int, int]:
    """llama.cpp's greedy continuation of ``prompt`` from a quantized GGUF must equal transformers' fp32
    one at every step up to the first where fp32's top-1/top-2 logit gap is within reach of the
    quantization error (ROUNDING_ALLOWANCE x the logit change that ``quant``'s rounding of the
    weights causes, by gguf-py's own quantizer); past that a different but equally good token is
    rounding, not a bug. The steps so guaranteed must be at least 4, so the check compares
    something. Returns how many tokens agree and how many were guaranteed."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    want = greedy_ids(model, prompt_ids, QUANTIZED_TOKENS, banned)
    rounded = copy.deepcopy(model)
    kind = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2:  # the export keeps 1-D tensors (norms, biases) in f32
                array = param.numpy().astype(np.float32)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, kind), kind).reshape(array.shape)))
        ids = torch.tensor([want])
        exact, approx = model(input_ids=ids).logits[0].float(), rounded(input_ids=ids).logits[0].float()
    positions = slice(len(prompt_ids) - 1, len(want) - 1)  # the logits that chose each new token
    exact, shift = exact[positions], (approx - exact)[positions]
    exact[:, banned] = -torch.inf
    top = exact.argmax(-1, keepdim=True)
    # Token j can overtake the fp32 choice only where its margin is within reach of the rounding's
    # change of that margin (times the allowance): a step is guaranteed when no token is.
    margin = exact.gather(1, top) - exact
    reach = ROUNDING_ALLOWANCE * (shift - shift.gather(1, top)).abs()
    safe = ((margin > reach) | (margin == torch.inf)).scatter(1, top, True).all(-1).tolist()
    guaranteed = next((i for i, ok in enumerate(safe) if not ok), len(safe))
    assert guaranteed >= 4, (quant, safe)
    got = llamacpp.complete(path, prompt, QUANTIZED_TOKENS, banned=banned)
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    # Agreeing tokens: the longest run of transformers' new tokens whose text llama.cpp printed.
    text = [decode(want[:len(prompt_ids) + k])[len(decode(prompt_ids)):] for k in range(QUANTIZED_TOKENS + 1)]
    agree = max(k for k in range(QUANTIZED_TOKENS + 1) if got.startswith(text[k]))
    assert agree >= guaranteed, (quant, got, text[-1], guaranteed)
    return agree, guaranteed
