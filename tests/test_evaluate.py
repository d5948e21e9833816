"""`evaluate()` against a direct computation: the loss is Σ loss / Σ label tokens over the rows,
whatever the eval batch size, and perplexity is exp of that mean.

Every other eval test compares one ``evaluate()`` with another (run vs merged, run.json vs
``lorafam eval``), which a wrong average in both passes. Here the reference is each row run alone
through the plain model, with rows whose label counts differ tenfold, so a per-batch mean (or a
per-row one) moves the result far beyond rounding.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama_config
from tinyrun import cli, make_model_folder, make_text_data, word_tokenizer, write_recipe
from transformers import LlamaForCausalLM

from lorafam.data import make_collator
from lorafam.evaluate import evaluate
from lorafam.tasks import get_task

# (length, labelled positions at the end): label counts from 1 to 29, so batches of 3 hold very
# different numbers of label tokens and a mean of batch means is far from the token mean.
SHAPES = [(30, 29), (4, 2), (12, 12), (3, 1), (25, 20), (6, 6), (18, 3)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer))).eval()
    rng = random.Random(0)
    rows = []
    for length, labelled in SHAPES:
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(length)]
        labels = [-100] * (length - labelled) + ids[length - labelled :]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return tokenizer, model, rows


def direct_sums(model, rows) -> tuple[float, int]:
    """Σ over rows of the summed next-token cross-entropy on labelled positions, and Σ of their count,
    each row alone (no padding), in float64 from the model's fp32 logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].double()
            targets = torch.tensor(row["labels"][1:])
            keep = targets != -100
            total += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total, count


def test_label_counts_really_differ_across_batches(setup):
    """Otherwise a mean of batch means would equal the token mean and the test below prove nothing."""
    _, _, rows = setup
    per_batch = [sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows[i : i + 3]) for i in range(0, len(rows), 3)]
    assert max(per_batch) >= 3 * min(per_batch), per_batch


@pytest.mark.parametrize("batch_size", [1, 3, len(SHAPES)])
def test_eval_loss_is_the_token_mean_at_any_batch_size(setup, batch_size):
    tokenizer, model, rows = setup
    task = get_task("causal-lm")
    metrics = evaluate(task.loss_module(model), task, rows, make_collator(tokenizer, "causal-lm"), batch_size)
    loss_sum, count = direct_sums(model, rows)
    assert metrics["tokens"] == count == sum(labelled - (length == labelled) for length, labelled in SHAPES)
    # fp32 logits, padded or not: equal to rounding (measured ~1e-7 relative).
    assert metrics["loss"] == pytest.approx(loss_sum / count, rel=2e-6, abs=0)
    # A mean of per-row means is far from it: the tolerance above tells them apart.
    row_means = [direct_sums(model, [row]) for row in rows]
    per_row = sum(s / c for s, c in row_means) / len(rows)
    assert abs(per_row - loss_sum / count) > 1e-3 * (loss_sum / count)


def test_eval_batches_rows_of_like_length_and_a_cap_scores_the_first_rows(setup):
    """Rows go into eval batches shortest first, so a batch is padded to about its rows' length;
    under ``max_batches`` the rows scored are still the data's first ones, as without sorting."""
    tokenizer, model, rows = setup
    task, collate = get_task("causal-lm"), make_collator(tokenizer, "causal-lm")
    seen = []

    def spy(batch_rows):
        seen.append([len(r["input_ids"]) for r in batch_rows])
        return collate(batch_rows)

    evaluate(task.loss_module(model), task, rows, spy, 3)
    assert [n for batch in seen for n in batch] == sorted(length for length, _ in SHAPES)
    seen.clear()
    capped = evaluate(task.loss_module(model), task, rows, spy, 3, max_batches=1)
    assert sorted(n for batch in seen for n in batch) == sorted(length for length, _ in SHAPES[:3])
    loss_sum, count = direct_sums(model, rows[:3])
    assert capped["tokens"] == count and capped["loss"] == pytest.approx(loss_sum / count, rel=2e-6, abs=0)


def test_perplexity_is_exp_of_the_mean_loss(setup):
    tokenizer, model, rows = setup
    task = get_task("causal-lm")
    metrics = evaluate(task.loss_module(model), task, rows, make_collator(tokenizer, "causal-lm"), 3)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
    assert 1.0 < metrics["perplexity"] < 10 * len(tokenizer)  # a random model: near the vocabulary size


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_runs_eval_is_the_fp32_eval_lorafam_eval_computes_from_the_saved_run(mixed_precision, tmp_path):
    """The eval during training runs in fp32 (train.eval_precision's default) also where the model was
    prepared for bf16 training, whose forward Accelerate wraps in autocast: so run.json's eval equals
    `lorafam eval` of the saved run, which loads the model afresh, to the last bit."""
    model, data = make_model_folder(tmp_path / "model"), make_text_data(tmp_path / "train.jsonl")
    recipe = write_recipe(tmp_path / "r.yaml", model, data, tmp_path / "run",
                          train={"max_steps": 4, "save_every": None, "mixed_precision": mixed_precision})
    trained = cli("train", recipe)
    assert trained.exit_code == 0, trained.output + trained.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["precision"]["mixed_precision"] == mixed_precision
    evaluated = cli("eval", tmp_path / "run", "--json")
    assert evaluated.exit_code == 0, evaluated.output + evaluated.stderr
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert metrics["tokens"] == info["eval_after"]["tokens"] > 0
    assert metrics["loss"] == info["eval_after"]["loss"]  # same rows, batches and fp32 arithmetic
