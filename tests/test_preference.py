"""model.task preference: its formats, the reference, every variant, batch layouts and resume.

Runs use the tiny word-level Llama of tests/tinyrun.py on chat pairs whose chosen answers start
with "the" and rejected ones with "a" (something a dozen steps can learn).
"""

from __future__ import annotations

import json
import math
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tinyrun import WORD_CHAT_TEMPLATE, WORDS, adapter_section, cli, make_model_folder, read_metrics, word_tokenizer, write_recipe

import lorafam.run as run_folder
from lorafam import api
from lorafam.adapters import VARIANTS
from lorafam.build import build
from lorafam.data import prepare_data
from lorafam.errors import LorafamError
from lorafam.modeling import load_model
from lorafam.recipe import load_recipe
from lorafam.run import ADAPTER_WEIGHTS
from lorafam.tasks.base import IGNORE_INDEX
from lorafam.tasks.preference import AnswerLogProbs

STEPS = 12


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_pairs(path: Path, rows: int = 48, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            prompt = [{"role": "user", "content": _words(rng, 2, 10)}]
            chosen = prompt + [{"role": "assistant", "content": "the " + _words(rng, 1, 8)}]
            rejected = prompt + [{"role": "assistant", "content": "a " + _words(rng, 1, 8)}]
            f.write(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return path


@pytest.fixture(scope="module")
def pref_assets(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pref")
    return make_model_folder(folder / "model"), make_pairs(folder / "pairs.jsonl")


def pref_recipe(tmp_path: Path, assets, variant: str = "lora", name: str = "run", objective: str = "dpo",
                train: dict | None = None, model: dict | None = None, data: dict | None = None) -> Path:
    model_dir, pairs = assets
    path = write_recipe(tmp_path / f"{name}.yaml", model_dir, pairs, tmp_path / name, adapter=adapter_section(variant),
                        train={"lr": 5e-2} | (train or {}), data_keys={"max_length": 32} | (data or {}))
    raw = yaml.safe_load(path.read_text())
    raw["model"] |= {"task": "preference"} | (model or {})
    raw["preference"] = {"objective": objective}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def plain_base_log_probs(recipe_path: Path, rows) -> tuple[list[float], list[float]]:
    """Each pair's summed answer log-probs under the base model loaded afresh (no adapter at all)."""
    spec = load_recipe(recipe_path)
    model = load_model(spec.model).eval()
    collate = spec.task.collator(word_tokenizer())
    batch = collate([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        sums, _, _ = AnswerLogProbs(model)(batch["labels"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    half = len(rows)
    return sums[:half].tolist(), sums[half:].tolist()


# --------------------------------------------------------------------------------------------------
# Formats


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    return tokenizer


def prepared(tmp_path: Path, rows: list[dict], max_length: int = 24, **data):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_recipe(pref_recipe(tmp_path, (tmp_path, path), data={"max_length": max_length, "eval": str(path)} | data))
    return prepare_data(spec.data, chat_tokenizer(), "preference", spec.train.seed)


def test_text_pairs_train_the_answers_only_and_bad_pairs_are_counted(tmp_path):
    rows = [
        {"prompt": "the cat sat", "chosen": "on the mat", "rejected": "on a tree"},
        {"prompt": "one two", "chosen": "three", "rejected": "three"},  # the same answer: teaches nothing
        {"prompt": "one two", "chosen": "", "rejected": "four"},  # empty side
        {"prompt": " ".join(["big"] * 30), "chosen": "red", "rejected": "blue"},  # prompt fills max_length
        {"prompt": "sun", "chosen": "moon " * 30, "rejected": "star"},  # too long: truncated (both sides to max_length)
    ]
    data = prepared(tmp_path, rows)
    assert data.format == "preference"
    # (counted over train and eval, here the same file)
    assert data.report == {"read": 10, "kept": 4, "truncated": 2, "dropped_too_long": 2, "dropped_empty": 2, "dropped_malformed": 2}
    tokenizer = chat_tokenizer()
    row = data.train[0]
    chosen = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    rejected = [t for t, label in zip(row["rejected_input_ids"], row["rejected_labels"]) if label != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    assert chosen == tokenizer("on the mat", add_special_tokens=False)["input_ids"] + [eos]
    assert rejected == tokenizer("on a tree", add_special_tokens=False)["input_ids"] + [eos]
    assert row["input_ids"][: -len(chosen)] == row["rejected_input_ids"][: -len(rejected)]  # the same prompt
    assert all(len(r["input_ids"]) <= 24 and len(r["rejected_input_ids"]) <= 24 for r in data.train)


def test_chat_pairs_train_only_the_final_answer_with_its_end_of_turn(tmp_path):
    history = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]
    rows = [
        {"chosen": history + [{"role": "assistant", "content": "four sun"}],
         "rejected": history + [{"role": "assistant", "content": "moon"}]},
        {"chosen": history + [{"role": "assistant", "content": "four"}],
         "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "moon"}]},  # prompts differ
        {"chosen": history + [{"role": "assistant", "content": "four"}],
         "rejected": history + [{"role": "assistant", "content": " "}]},  # empty side
    ]
    data = prepared(tmp_path, rows, max_length=64)
    assert data.format == "preference-chat"
    assert data.report["kept"] == 2 and data.report["dropped_malformed"] == 2 and data.report["dropped_empty"] == 2
    tokenizer = chat_tokenizer()
    row = data.train[0]
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])
    assert trained.split() == ["four", "sun", "<eos>"]  # not "two", the earlier assistant turn
    rejected = tokenizer.decode([t for t, label in zip(row["rejected_input_ids"], row["rejected_labels"]) if label != IGNORE_INDEX])
    assert rejected.split() == ["moon", "<eos>"]


def test_preference_keys_are_strict_and_belong_to_the_preference_task(tmp_path, pref_assets):
    path = pref_recipe(tmp_path, pref_assets)
    with pytest.raises(LorafamError, match=r"preference.objective: .*'dpo', 'ipo', 'orpo' or 'simpo'"):
        load_recipe(path, ["preference.objective=kto"])
    with pytest.raises(LorafamError, match=r"preference.gama: unknown key"):
        load_recipe(path, ["preference.gama=1"])
    with pytest.raises(LorafamError, match=r"preference: applies to model.task preference only"):
        load_recipe(path, ["model.task=causal-lm"])


# --------------------------------------------------------------------------------------------------
# The reference is the model the run started from, for every variant


@pytest.mark.parametrize("variant", list(VARIANTS) + ["pissa"])
def test_reference_log_probs_are_the_starting_models(variant, tmp_path, pref_assets):
    """Computed by build() with the adapter off before anything trains: exactly the plain base model's
    (PiSSA: the original W, not its residual; GLoRA and LoRA-drop: the unrestructured base)."""
    adapter = {"init": "pissa"} if variant == "pissa" else {}
    path = pref_recipe(tmp_path, pref_assets, "lora" if variant == "pissa" else variant)
    raw = yaml.safe_load(path.read_text())
    raw["adapter"] |= adapter
    path.write_text(yaml.safe_dump(raw))
    built = build(load_recipe(path), None, 1)
    rows = built.data.train
    chosen, rejected = plain_base_log_probs(path, rows)
    assert rows["ref_chosen_logp"] == pytest.approx(chosen, rel=1e-5, abs=1e-5)
    assert rows["ref_rejected_logp"] == pytest.approx(rejected, rel=1e-5, abs=1e-5)
    assert built.data.eval is not None and "ref_chosen_logp" in built.data.eval.column_names


@pytest.mark.parametrize("variant", ["delta_lora", "lora_drop", "glora", "adalora"])
def test_every_pass_trains_against_the_starting_models_log_probs(variant, tmp_path, pref_assets, monkeypatch):
    """LoRA-drop's probe pass and the main pass (after Delta-LoRA's W starts moving at step 3, GLoRA's
    and AdaLoRA's structure changes) all score against the model the run started from."""
    import lorafam.trainer as trainer

    seen: dict[str, tuple[list[float], list[float]]] = {}
    seen_rows: dict = {}
    original = trainer.train

    def recording(recipe, model, variant_, tokenizer, data, *args, **kwargs):
        phase = kwargs.get("phase", "main")
        seen[phase] = (list(data.train["ref_chosen_logp"]), list(data.train["ref_rejected_logp"]))
        seen_rows[phase] = data.train
        return original(recipe, model, variant_, tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", recording)
    path = pref_recipe(tmp_path, pref_assets, variant)
    api.train(path)
    assert "main" in seen and (variant != "lora_drop" or len(seen) == 2)
    for phase, (chosen, rejected) in seen.items():
        expected_chosen, expected_rejected = plain_base_log_probs(path, seen_rows[phase])
        assert chosen == pytest.approx(expected_chosen, rel=1e-5, abs=1e-5), phase
        assert rejected == pytest.approx(expected_rejected, rel=1e-5, abs=1e-5), phase


# --------------------------------------------------------------------------------------------------
# Every variant (and a 4-bit base) trains, and eval of the run agrees with the run's own


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_trains_dpo_and_eval_of_the_run_matches_its_own(variant, tmp_path, pref_assets):
    result = api.train(pref_recipe(tmp_path, pref_assets, variant))
    rows = read_metrics(result.run_dir)
    losses = [r["loss"] for r in rows if "loss" in r and "phase" not in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    before, after = result.info.eval_before, result.info.eval_after
    assert set(after) >= {"loss", "accuracy", "rewards_chosen", "rewards_rejected", "reward_margin", "policy_accuracy", "pairs"}
    assert after["reward_margin"] == pytest.approx(after["rewards_chosen"] - after["rewards_rejected"])
    if variant != "lora_drop":  # its probe pass trains before the main run's first eval
        assert before["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert after["loss"] < math.log(2)
    if variant == "adalora":
        assert any("orth_reg" in r for r in rows)
    if variant == "lora_drop":
        assert any(r.get("phase") for r in rows)  # the prepare pass ran, on pairs
    evaluated = api.evaluate(result.run_dir).metrics  # the reference rebuilt from the saved run
    assert evaluated == pytest.approx(after, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_the_other_objectives_train(objective, tmp_path, pref_assets):
    result = api.train(pref_recipe(tmp_path, pref_assets, objective=objective))
    before, after = result.info.eval_before, result.info.eval_after
    assert after["loss"] < before["loss"]
    assert api.evaluate(result.run_dir).metrics == pytest.approx(after, rel=1e-5, abs=1e-6)


def test_dpo_trains_on_a_4bit_base(tmp_path, pref_assets):
    result = api.train(pref_recipe(tmp_path, pref_assets, model={"quantization": "nf4"}, train={"max_steps": 4}))
    assert result.info.eval_after["loss"] < result.info.eval_before["loss"]
    assert api.evaluate(result.run_dir).metrics == pytest.approx(result.info.eval_after, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Batch layout and resume


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_grad_accum_trains_the_same_adapter_as_one_big_batch(objective, tmp_path, pref_assets):
    """Per-pair loss sums over the step's pairs: 8 x 1 and 2 x 4 (micro-batches of different
    lengths) train the same adapter; ORPO's SFT term too."""
    settings = {"optimizer": "sgd", "lr": 0.5, "mixed_precision": "no", "max_steps": 6}
    one = api.train(pref_recipe(tmp_path, pref_assets, name="b8", objective=objective, train=settings | {"batch_size": 8}))
    accum = api.train(pref_recipe(tmp_path, pref_assets, name="b2x4", objective=objective,
                                  train=settings | {"batch_size": 2, "grad_accum": 4}))
    a, b = load_file(one.run_dir / ADAPTER_WEIGHTS), load_file(accum.run_dir / ADAPTER_WEIGHTS)
    assert relative_difference(a, b) < 1e-5
    mean_loss = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert mean_loss(accum.run_dir) == pytest.approx(mean_loss(one.run_dir), rel=1e-6)


@pytest.mark.parametrize("variant", ["lora", "delta_lora", "lora_drop", "adalora"])
def test_sigterm_then_resume_is_bitwise_the_uninterrupted_run(variant, tmp_path, pref_assets, monkeypatch):
    """The resumed run recomputes the reference from the starting model (before its checkpoint and
    LoRA-drop's recorded structure are restored): the same numbers, so the same adapter."""
    whole = api.train(pref_recipe(tmp_path, pref_assets, variant, name="whole"))
    expected = load_file(whole.run_dir / ADAPTER_WEIGHTS)
    recipe = pref_recipe(tmp_path, pref_assets, variant, name="cut")
    original = run_folder.write_metrics

    def write_metrics(handle, row):
        original(handle, row)
        if row.get("step") == 7 and "loss" in row and "phase" not in row:
            import os

            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_folder, "write_metrics", write_metrics)
    assert cli("train", recipe).exit_code == 143
    monkeypatch.undo()
    resumed = cli("train", recipe, "--resume")
    assert resumed.exit_code == 0, resumed.output
    got = load_file(tmp_path / "cut" / ADAPTER_WEIGHTS)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_seconds")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "cut")) == strip(read_metrics(whole.run_dir))


def test_two_processes_train_the_same_adapter_as_one(tmp_path, pref_assets):
    """DDP over 2 gloo processes, batch 4 each, against one process with batch 8: every process
    computes the same reference columns, and the step is normalised over all the step's pairs."""
    from test_distributed import launch

    settings = {"optimizer": "sgd", "lr": 0.5, "mixed_precision": "no", "max_steps": 6}
    one = api.train(pref_recipe(tmp_path, pref_assets, name="one", train=settings | {"batch_size": 8}))
    result = launch("-m", "lorafam", "train", pref_recipe(tmp_path, pref_assets, name="two", train=settings | {"batch_size": 4}))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    two = tmp_path / "two"
    info = json.loads((two / "run.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 8  # two processes really ran
    assert relative_difference(load_file(one.run_dir / ADAPTER_WEIGHTS), load_file(two / ADAPTER_WEIGHTS)) < 1e-5
    step_losses = lambda run: [r["loss"] for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert step_losses(two) == pytest.approx(step_losses(one.run_dir), rel=1e-6)
    assert info["eval_after"] == pytest.approx(one.info.eval_after, rel=1e-5, abs=1e-6)
