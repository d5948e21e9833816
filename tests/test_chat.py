"""`lorafam chat` and `lorafam generate` on tiny chat models (GPT-2 BPE + a ChatML template), checked
against transformers' own generate on models loaded without lorafam (PEFT for the adapter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafam.adapters import VARIANTS, AdapterLayer
from lorafam.recipe import validate_recipe
from lorafam.run import adapt
from tinyrun import adapter_section, cli, cli_subprocess, make_model_folder, make_text_data, write_recipe

PROMPT = "the quick brown fox"
NEW = 8


def make_chat_model(folder: Path, tokenizer, **config) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(**config) if config else tiny_llama_config(vocab_size=len(tokenizer))
    cfg.eos_token_id = tokenizer.eos_token_id
    # A random head tied to the embeddings repeats the prompt's last token ("\n") forever, which
    # would make every answer the same blank; an untied one gives varied tokens to compare.
    cfg.tie_word_embeddings = False
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_tokenizer) -> dict[str, Path]:
    """A tiny chat model folder and LoRA / PiSSA runs on it, trained by `lorafam train`."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chat")
    model = make_chat_model(root / "model", gpt2_tokenizer)
    data = make_text_data(root / "data.jsonl")
    out = {"model": model, "root": root}
    for name, adapter in {
        "lora": adapter_section("lora"),
        # On every linear at r=8 (of 32), so W's principal part matters to the answer (see below).
        "pissa": adapter_section("lora") | {"init": "pissa", "r": 8, "target_modules": "all-linear"},
    }.items():
        recipe = write_recipe(root / f"{name}.yaml", model, data, root / name, adapter=adapter,
                              train={"lr": 3e-2, "save_every": None})
        result = cli("train", recipe)
        assert result.exit_code == 0, result.output
        out[name] = root / name
        out[f"{name}_recipe"] = recipe
    return out


def reference_generate(model, tokenizer, messages, max_new_tokens=NEW) -> tuple[str, str, int]:
    """(stripped answer, raw decoded text, prompt length) from transformers' generate, greedy."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = output[0, inputs["input_ids"].shape[1] :]
    raw = tokenizer.decode(new, skip_special_tokens=True)
    return raw.strip(), raw, inputs["input_ids"].shape[1]


def plain_base(setup):
    return AutoModelForCausalLM.from_pretrained(setup["model"]).eval(), AutoTokenizer.from_pretrained(setup["model"])


def peft_adapted(setup, run: str):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(setup["model"])
    return PeftModel.from_pretrained(base, setup[run]).eval(), AutoTokenizer.from_pretrained(setup[run])


def json_rows(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------------------------------
# generate


def test_generate_greedy_equals_transformers_generate_on_the_peft_loaded_adapter(setup):
    result = cli("generate", setup["lora"], "--prompt", PROMPT, "--max-new-tokens", NEW, "--json")
    assert result.exit_code == 0, result.output
    [row] = json_rows(result.output)
    model, tokenizer = peft_adapted(setup, "lora")
    expected, _, _ = reference_generate(model, tokenizer, [{"role": "user", "content": PROMPT}])
    assert row["prompt"] == PROMPT and row["output"] == expected and row["new_tokens"] == NEW
    # Without --json: the answer alone.
    plain = cli("generate", setup["lora"], "--prompt", PROMPT, "--max-new-tokens", NEW)
    assert plain.exit_code == 0 and plain.output.strip() == expected


@pytest.mark.parametrize("run", ["lora", "pissa"])
def test_compare_base_gives_the_plain_base_models_answer(setup, run):
    result = cli("generate", setup[run], "--prompt", PROMPT, "--max-new-tokens", NEW, "--json", "--compare-base")
    assert result.exit_code == 0, result.output
    [row] = json_rows(result.output)
    messages = [{"role": "user", "content": PROMPT}]
    base_answer, _, _ = reference_generate(*plain_base(setup), messages)
    adapted_answer, _, _ = reference_generate(*peft_adapted(setup, run), messages)
    assert row["base_output"] == base_answer
    assert row["output"] == adapted_answer
    # Both are real text and the adapter changed it, so the two checks above mean something.
    assert base_answer and adapted_answer and base_answer != adapted_answer
    if run == "pissa":  # and the residual W - s B0 A0 alone (PEFT's disabled PiSSA) answers otherwise
        from lorafam.chat import Settings, encode, generate, open_target

        target = open_target(setup[run])
        with target.variant.disabled():
            for layer in target.variant.layers.values():
                layer.base_forward = layer.base_layer.forward
            residual_answer, _ = generate(target, encode(target.tokenizer, messages), Settings(max_new_tokens=NEW))
        assert residual_answer != base_answer


def test_generate_on_a_recipe_or_a_model_folder_is_the_base_model(setup):
    base_answer, _, _ = reference_generate(*plain_base(setup), [{"role": "user", "content": PROMPT}])
    for target in (setup["lora_recipe"], setup["model"]):
        result = cli("generate", target, "--prompt", PROMPT, "--max-new-tokens", NEW, "--json")
        assert result.exit_code == 0, result.output
        assert json_rows(result.output)[0]["output"] == base_answer


def test_generate_file_gives_one_json_row_per_prompt_and_a_side_by_side_table(setup, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n\n" + json.dumps("a red tree") + "\n")
    result = cli("generate", setup["lora"], "--file", prompts, "--max-new-tokens", NEW, "--json")
    assert result.exit_code == 0, result.output
    rows = json_rows(result.output)
    assert [r["prompt"] for r in rows] == [PROMPT, "a red tree"]
    single = json_rows(cli("generate", setup["lora"], "--prompt", "a red tree", "--max-new-tokens", NEW, "--json").output)
    assert rows[1]["output"] == single[0]["output"]
    table = cli("generate", setup["lora"], "--file", prompts, "--max-new-tokens", NEW, "--compare-base")
    assert table.exit_code == 0 and "base" in table.output and "adapted" in table.output


def test_generate_sampling_is_reproducible_with_a_seed(setup):
    def sample(seed: int) -> str:
        args = ("--prompt", PROMPT, "--max-new-tokens", NEW, "--temperature", "1.0", "--top-p", "0.95", "--seed", seed, "--json")
        return json_rows(cli("generate", setup["lora"], *args).output)[0]["output"]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{lora}"], "give exactly one of --prompt TEXT or --file prompts.jsonl"),
        (["{lora}", "--prompt", "x", "--file", "{lora}/run.json"], "give exactly one of --prompt"),
        (["{lora}", "--file", "{root}/missing.jsonl"], "--file {root}/missing.jsonl not found"),
        (["{lora}", "--file", "{root}/bad.jsonl"], "line 2 is not JSON"),
        (["{lora}", "--file", "{root}/noprompt.jsonl"], 'line 1 needs a non-empty "prompt" string'),
        (["{lora}", "--prompt", "x", "--top-p", "0"], "--top-p 0.0: give a value in (0, 1]"),
        (["{lora}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0: give 0 (greedy) or a positive value"),
        (["{model}", "--prompt", "x", "--compare-base"], "--compare-base needs a run folder"),
        (["{lora}/run.json", "--prompt", "x"], "is a file; give a run folder, a recipe (.yaml), a model folder"),
        (["{root}/nowhere", "--prompt", "x"], "does not exist; give a run folder, a recipe (.yaml)"),
    ],
)
def test_generate_bad_input_is_one_line_exit_2(setup, args, message):
    root = setup["root"]
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
    (root / "noprompt.jsonl").write_text('{"text": "ok"}\n')
    paths = {k: str(v) for k, v in setup.items()}
    result = cli("generate", *[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert message.format(**paths) in result.output


# --------------------------------------------------------------------------------------------------
# chat


def test_chat_through_stdin_streams_turns_resets_and_exits(setup):
    """A real process reading a real stdin pipe: two turns, /reset, the first turn again, /exit."""
    stdin = f"{PROMPT}\nsat on the mat\n/reset\n{PROMPT}\n/exit\nnever answered\n"
    proc = cli_subprocess("chat", setup["lora"], "--temperature", "0", "--max-new-tokens", NEW, "--show-prompt",
                          input=stdin)
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = peft_adapted(setup, "lora")
    first = [{"role": "user", "content": PROMPT}]
    answer1, raw1, length1 = reference_generate(model, tokenizer, first)
    second = first + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "sat on the mat"}]
    _, raw2, length2 = reference_generate(model, tokenizer, second)
    # Streamed answers, each ended by a newline; after /reset the first turn comes back identical.
    assert proc.stdout == f"{raw1}\n{raw2}\n{raw1}\n"
    counts = [int(n) for n in re.findall(r"\[prompt: (\d+) tokens\]", proc.stderr)]
    assert counts == [length1, length2, length1] and length2 > length1
    assert "(conversation cleared)" in proc.stderr


def test_chat_ends_cleanly_at_end_of_input_and_explains_unknown_commands(setup):
    result = cli("chat", setup["lora"], "--temperature", "0", "--max-new-tokens", NEW, input=f"/help\n\n{PROMPT}\n")
    assert result.exit_code == 0, result.output
    assert "unknown command /help; /reset clears the conversation" in result.output
    expected, _, _ = reference_generate(*peft_adapted(setup, "lora"), [{"role": "user", "content": PROMPT}])
    assert expected in result.output


def test_answers_stop_at_the_models_context_and_an_overlong_message_is_skipped(setup):
    """The tiny model declares 256 positions: an answer stops there, a longer message is refused."""
    result = cli("generate", setup["model"], "--prompt", PROMPT, "--max-new-tokens", 1000, "--json")
    assert result.exit_code == 0, result.output
    prompt_length = reference_generate(*plain_base(setup), [{"role": "user", "content": PROMPT}], max_new_tokens=1)[2]
    assert json_rows(result.output)[0]["new_tokens"] == 256 - prompt_length
    long_message = " ".join(["fox"] * 300)
    result = cli("chat", setup["model"], "--temperature", "0", "--max-new-tokens", NEW, "--show-prompt",
                     input=f"{long_message}\n{PROMPT}\n")
    assert result.exit_code == 0, result.output
    assert "and the model's context 256; shorten it; that message is left out of the conversation" in result.output
    # the next message is answered as the first of the conversation
    assert f"[prompt: {prompt_length} tokens]" in result.output


def test_chat_system_message_goes_first(setup):
    result = cli("chat", setup["model"], "--temperature", "0", "--max-new-tokens", NEW, "--system", "be brief",
                 input=f"{PROMPT}\n")
    assert result.exit_code == 0, result.output
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    expected, _, _ = reference_generate(*plain_base(setup), messages)
    assert expected in result.output


def test_chat_needs_a_chat_template(tmp_path):
    folder = make_model_folder(tmp_path / "plain", chat_template=False)  # word-level tokenizer, no template
    result = cli("chat", folder, input="hello\n")
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "has no chat template" in result.output and "lorafam generate" in result.output
    # generate continues the text as is there, as transformers does
    result = cli("generate", folder, "--prompt", "the quick brown", "--max-new-tokens", 5, "--json")
    assert result.exit_code == 0, result.output
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("the quick brown", return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert json_rows(result.output)[0]["output"] == expected


def test_chat_and_generate_on_a_qlora_run(tmp_path, gpt2_tokenizer, repacking_cpu):
    """A QLoRA run answers on its 4-bit base, as `lorafam chat` loads it, and stays in the training layout."""
    from lorafam.chat import Settings, answer_prompts, open_target
    from lorafam.merge import load_adapted
    from lorafam.quant import is_4bit
    from lorafam.run import open_run

    # Widths that bitsandbytes' CPU kernels take (multiples of 64, as tests/test_qlora.py uses).
    model = make_chat_model(
        tmp_path / "model", gpt2_tokenizer, vocab_size=len(gpt2_tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0,
    )
    recipe = write_recipe(tmp_path / "q.yaml", model, make_text_data(tmp_path / "d.jsonl"), tmp_path / "run",
                          train={"max_steps": 4, "save_every": None})
    raw = recipe.read_text().replace(f"name: {model}", f"name: {model}\n  quantization: nf4")
    recipe.write_text(raw)
    assert cli("train", recipe).exit_code == 0
    result = cli("chat", tmp_path / "run", "--temperature", "0", "--max-new-tokens", "5", input=f"{PROMPT}\n/exit\n")
    assert result.exit_code == 0, result.output
    reference, variant = load_adapted(open_run(tmp_path / "run"))
    expected, _, _ = reference_generate(reference, AutoTokenizer.from_pretrained(tmp_path / "run"),
                                        [{"role": "user", "content": PROMPT}], max_new_tokens=5)
    assert expected in result.output
    target = open_target(tmp_path / "run")
    layers = [m for m in target.model.modules() if is_4bit(m)]
    assert layers, "the QLoRA run should answer on its 4-bit base"
    answer_prompts(target, [PROMPT], Settings(max_new_tokens=3))
    # An inference pass must not repack the weights into bitsandbytes' CPU-only layout (no backward after
    # it); repacking_cpu makes every layer one that would repack, whatever this CPU.
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


# --------------------------------------------------------------------------------------------------
# Variant.disabled(), which --compare-base stands on


@pytest.mark.parametrize("name", [*VARIANTS, "lora+pissa"])
def test_disabled_gives_the_base_models_logits_for_every_variant(name, tiny_llama):
    variant_name, _, init = name.partition("+")
    section = adapter_section(variant_name, dropout=0.0) | ({"init": init} if init else {})
    recipe = validate_recipe({"model": {"name": "unused"}, "adapter": section, "data": {"train": "unused"}, "output_dir": "unused"})
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_llama(ids).logits
        torch.manual_seed(0)
        variant = adapt(tiny_llama, recipe, [])
        for p in variant.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        adapted = tiny_llama(ids).logits
        assert not torch.allclose(adapted, base, atol=1e-3)
        with variant.disabled() as model:
            torch.testing.assert_close(model(ids).logits, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny_llama(ids).logits, adapted)  # swapped back
    assert all(isinstance(tiny_llama.get_submodule(p), AdapterLayer) for p in variant.layers)
