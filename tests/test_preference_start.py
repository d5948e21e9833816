"""SFT, then DPO: ``model.start_from`` takes a finished run's merged model as the base, and the DPO run
is a run like any other (run.json records where it started; eval, merge, chat and export work).

On a tiny random Llama with the real GPT-2 BPE (GGUF export needs a byte-level BPE) and a ChatML
template: an SFT run on chat data, then DPO pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_preference import make_pairs
from conftest import tiny_llama_config
from tinyrun import adapter_section, cli, make_chat_data, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lorafam import api
from lorafam.build import build
from lorafam.errors import LorafamError
from lorafam.merge import load_adapted, merged_model
from lorafam.modeling import load_model
from lorafam.recipe import load_recipe
from lorafam.run import open_run
from lorafam.tasks.preference import AnswerLogProbs


@pytest.fixture(scope="module")
def sft_then_dpo(tmp_path_factory, gpt2_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft-dpo")
    model = root / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(gpt2_tokenizer))).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    sft = write_recipe(root / "sft.yaml", model, make_chat_data(root / "chat.jsonl"), root / "sft",
                       adapter=adapter_section("lora", dropout=0.0), train={"lr": 5e-2, "save_every": None},
                       data_keys={"max_length": 64})
    trained = cli("train", sft)
    assert trained.exit_code == 0, trained.output + trained.stderr
    dpo = write_recipe(root / "dpo.yaml", model, make_pairs(root / "pairs.jsonl"), root / "dpo",
                       adapter=adapter_section("lora"), train={"lr": 5e-2, "save_every": None}, data_keys={"max_length": 64})
    raw = yaml.safe_load(dpo.read_text())
    raw["model"] |= {"task": "preference", "start_from": str(root / "sft")}
    dpo.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"root": root, "model": model, "sft": root / "sft", "dpo_recipe": dpo, "dpo": root / "dpo"}


def answer_log_probs(model, rows, tokenizer) -> torch.Tensor:
    batch = load_recipe_task().collator(tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        sums, _, _ = AnswerLogProbs(model.eval())(batch["labels"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sums


def load_recipe_task():
    from lorafam.tasks.preference import Preference

    return Preference()


def test_the_reference_is_the_merged_sft_model_not_the_plain_base(sft_then_dpo, gpt2_tokenizer):
    spec = load_recipe(sft_then_dpo["dpo_recipe"])
    rows = build(spec, None, 1).data.train
    reference = torch.tensor(list(rows["ref_chosen_logp"]) + list(rows["ref_rejected_logp"]), dtype=torch.float32)
    sft = answer_log_probs(merged_model(open_run(sft_then_dpo["sft"])), rows, gpt2_tokenizer)
    plain = answer_log_probs(load_model(spec.model.model_copy(update={"start_from": None})), rows, gpt2_tokenizer)
    torch.testing.assert_close(reference, sft, rtol=1e-5, atol=1e-4)
    assert (sft - plain).abs().max() > 0.1  # the SFT run really moved the model


def test_dpo_run_from_a_finished_run_records_it_and_evaluates_merges_chats_and_exports(sft_then_dpo, tmp_path):
    result = api.train(sft_then_dpo["dpo_recipe"])
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["start_from"] == str(sft_then_dpo["sft"].resolve())
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"]
    assert api.evaluate(result.run_dir).metrics == pytest.approx(info["eval_after"], rel=1e-5, abs=1e-6)

    merged = api.merge(result.run_dir, tmp_path / "merged")
    assert merged.check.max_logit_diff < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted, _ = load_adapted(open_run(result.run_dir))
    ids = torch.tensor([[3, 7, 9, 11, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits, atol=1e-4, rtol=0)
        # SFT + DPO, not DPO on the plain base: the merged model differs from base + DPO adapter alone.
        base = load_model(load_recipe(sft_then_dpo["dpo_recipe"]).model.model_copy(update={"start_from": None}))
        assert (base(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-2

    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "the quick brown fox"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = plain.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    chat = cli("chat", result.run_dir, "--temperature", "0", "--max-new-tokens", "4", input="the quick brown fox\n/exit\n")
    assert chat.exit_code == 0, chat.output
    assert expected and expected in chat.output

    exported = cli("export", result.run_dir, "--format", "gguf", "--quant", "f32", "--output", tmp_path / "gguf")
    assert exported.exit_code == 0, exported.output
    assert list((tmp_path / "gguf").glob("*.gguf"))


def test_start_from_checks(sft_then_dpo, tmp_path):
    path = sft_then_dpo["dpo_recipe"]
    with pytest.raises(LorafamError, match="model.start_from with model.quantization is not supported"):
        load_recipe(path, ["model.quantization=nf4"])
    other = load_recipe(path, [f"model.name={tmp_path}", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(LorafamError, match=r"model.start_from: .* trained on .*, not on model.name"):
        load_model(other.model)
    missing = load_recipe(path, [f"model.start_from={tmp_path / 'none'}", f"output_dir={tmp_path / 'y'}"])
    with pytest.raises(LorafamError, match="does not exist"):
        load_model(missing.model)
