"""Model cards (README.md) in the run folder, the merged folder and the export folder, read back the
way the Hub and PEFT read them (huggingface_hub.ModelCard, PEFT's own card update)."""

from __future__ import annotations

import json

import peft
import pytest
from huggingface_hub import ModelCard
from tinyrun import adapter_section, cli, make_model_folder, make_text_data, write_recipe
from transformers import AutoModelForCausalLM

from lorafam.adapters import VARIANTS
from lorafam.card import model_card, write_model_card
from lorafam.recipe import validate_recipe
from lorafam.run import LoadedRun, RunInfo

INFO = {
    "trainable_params": 1234,
    "total_params": 567890,
    "steps": 12,
    "seconds": 3.5,
    "eval_before": {"loss": 3.2953, "perplexity": 26.99},
    "eval_after": {"loss": 1.9217, "perplexity": 6.83},
}


def loaded(tmp_path, model: str = "smollm2-135m", train: str = "chatterbot-english", adapter: dict | None = None, **model_keys):
    recipe = validate_recipe({
        "model": {"name": model, **model_keys},
        "adapter": adapter or {"variant": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": train},
        "output_dir": str(tmp_path),
    })
    return LoadedRun(recipe=recipe, info=RunInfo(**INFO), folder=tmp_path)


def card_data(path):
    return ModelCard.load(path).data.to_dict()


@pytest.mark.parametrize("kind, library, relation", [("adapter", "peft", "adapter"), ("merged", "transformers", "finetune"),
                                                      ("gguf", "gguf", "finetune"), ("gguf-lora", "gguf", "adapter")])
def test_front_matter_parses_with_huggingface_hub(tmp_path, kind, library, relation):
    run = loaded(tmp_path, train="tatsu-lab/alpaca:train")
    path = write_model_card(tmp_path, run, kind, gguf_file="run-Q8_0.gguf", quant="q8_0")
    data = card_data(path)
    assert data["library_name"] == library
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the packaged alias's Hub id
    assert data["base_model_relation"] == relation
    assert data["datasets"] == ["tatsu-lab/alpaca"]
    assert data["pipeline_tag"] == "text-generation"
    assert {"lorafam", "lora"} <= set(data["tags"])
    assert ("llama.cpp" in data["tags"]) == kind.startswith("gguf")


def test_body_has_the_recipe_method_parameters_and_evals(tmp_path):
    text = ModelCard.load(write_model_card(tmp_path, loaded(tmp_path), "adapter")).text
    assert "Hu et al., LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)" in text
    assert "Trainable parameters: 1,234 of 567,890 (0.2173%)" in text
    assert "| loss | 3.2953 | 1.9217 |" in text and "| perplexity | 26.9900 | 6.8300 |" in text
    assert "variant: lora" in text  # the resolved recipe
    assert "PeftModel.from_pretrained" not in text  # no adapter_config.json in this folder: not claimed


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_card_names_its_paper_and_tag(tmp_path, variant):
    run = loaded(tmp_path, adapter=adapter_section(variant))
    text = model_card(run, "adapter")
    assert VARIANTS[variant].paper and VARIANTS[variant].paper in text
    (tmp_path / "README.md").write_text(text)
    assert variant in card_data(tmp_path / "README.md")["tags"]


def test_local_base_and_data_are_not_claimed_as_hub_ids(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    data = card_data(write_model_card(tmp_path, loaded(tmp_path, model=str(model), train=str(tmp_path / "d.jsonl")), "merged"))
    assert "base_model" not in data and "datasets" not in data


def test_qlora_run_is_tagged_qlora(tmp_path):
    data = card_data(write_model_card(tmp_path, loaded(tmp_path, quantization="nf4"), "adapter"))
    assert "qlora" in data["tags"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    model, data = make_model_folder(root / "model"), make_text_data(root / "train.jsonl")
    recipe = write_recipe(root / "r.yaml", model, data, root / "run", train={"max_steps": 4, "save_every": None})
    result = cli("train", recipe)
    assert result.exit_code == 0, result.output
    return root


def test_train_writes_the_run_card_with_its_run_json_numbers(trained_run):
    run = trained_run / "run"
    info = json.loads((run / "run.json").read_text())
    card = ModelCard.load(run / "README.md")
    assert card.data.library_name == "peft"
    assert f"| loss | {info['eval_before']['loss']:.4f} | {info['eval_after']['loss']:.4f} |" in card.text
    assert f"Trainable parameters: {info['trainable_params']:,} of {info['total_params']:,}" in card.text
    assert "PeftModel.from_pretrained" in card.text  # a LoRA adapter PEFT loads


def test_peft_loads_the_run_and_updates_our_card_without_losing_it(trained_run):
    run = trained_run / "run"
    base = AutoModelForCausalLM.from_pretrained(trained_run / "model")
    model = peft.PeftModel.from_pretrained(base, str(run))
    ours = ModelCard.load(run / "README.md")
    model.create_or_update_model_card(str(run))  # what PEFT's save_pretrained does to a README
    updated = ModelCard.load(run / "README.md")  # (PEFT replaces the tags with its own)
    assert updated.data.library_name == "peft" and updated.data.pipeline_tag == ours.data.pipeline_tag
    assert ours.text.strip() in updated.text


def test_merge_writes_a_merged_card_and_transformers_still_loads_the_folder(trained_run, tmp_path):
    result = cli("merge", trained_run / "run", "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert card_data(tmp_path / "merged" / "README.md")["library_name"] == "transformers"
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
