"""lorafam vs TRL's SFTTrainer on the quickstart's job: wall time, peak RSS and one evaluator's loss (issue 23).

    python benchmarks/vs_trl.py                                 # lorafam shipped + packed, TRL default, 120 steps each
    python benchmarks/vs_trl.py --steps 4 --eval-rows 16        # a check that every part runs (minutes, not a measurement)
    python benchmarks/vs_trl.py --lorafam shipped packed-half --trl default no-ckpt
    python benchmarks/vs_trl.py --rounds 2                      # every run twice, the second round in reverse: A B B A
    python benchmarks/vs_trl.py --lorafam-set train.sample_prompt=null --trl-set gradient_checkpointing=false
    python benchmarks/vs_trl.py --threads 1 --work /tmp/vs_trl  # keep the data, recipes, logs and adapters

The job is recipes/quickstart.yaml's, read from the file so both sides follow it: the packaged
SmolLM2-135M-Instruct, the packaged chatterbot-english chats, loss on the assistant's tokens, LoRA
(r, alpha, dropout, target modules), steps (``--steps``), micro-batch x grad_accum, AdamW lr, cosine
schedule with warmup, clipping, seed, max_length and eval batch size. What "most users would pick
instead" is TRL 1.16's ``SFTTrainer`` with a PEFT ``LoraConfig``, so that is the other side.

Same data. The train and held-out chats are lorafam's own split of chatterbot-english
(``train_test_split(data.eval_split, seed=train.seed)``, as lorafam/data/prepare.py does), written to
JSONL; the script checks that lorafam prepares those files into the very rows it prepares from the
alias. lorafam reads them as ``messages`` chats (``data.train`` / ``data.eval`` in a generated
recipe); TRL reads the same chats through ``datasets.load_dataset("json")`` as conversational
prompt/completion rows, where its loss is on the completion by default (SmolLM2's chat template has
no ``{% generation %}`` tags, so TRL's ``assistant_only_loss`` cannot be used). Both render with
SmolLM2's chat template; the script compares every tokenized train row (token ids and labels) of the
two sides and prints a warning when the token ids differ. ``--eval-rows`` caps the held-out chats
(the first N), for both tools' own evals and the evaluator alike.

Each tool's defaults otherwise. lorafam: the recipe as shipped (``mixed_precision: auto``: bf16
autocast where the CPU runs bf16 natively, else fp32; eval and a sample before and after training).
TRL: ``SFTConfig`` with the job's settings and nothing else but ``use_cpu=True`` (without it SFTConfig
refuses to start on a machine with no GPU), ``report_to="none"`` and ``output_dir``; its defaults
are then bf16 autocast (``bf16`` defaults to True, even on CPU), gradient checkpointing on, packing
off, ``adamw_torch_fused``; the facts it ran with are printed. TRL evaluates on the held-out rows
before and after training, as lorafam's run does. Configurations: ``--lorafam`` shipped, packed
(``data.packing: true``: a micro-batch then counts packed rows, ~2 chats each here) and packed-half
(packed at half the micro-batch: a step sees about as many chats as unpacked); ``--trl`` default,
no-ckpt (gradient checkpointing off, as lorafam's default) and packed (TRL's BFD packing); any key
through ``--lorafam-set KEY=VALUE`` (``lorafam train --set``) or ``--trl-set FIELD=VALUE`` (SFTConfig,
value parsed as YAML).

Each run is its own process, one after the other (``--rounds`` 2 or more alternates the order),
with the same threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``; default every core).
Reported per run: wall seconds from the process's start to its adapter file written (imports, model
and data loading, evals and all), the training loop as the tool reports it (lorafam: the step
windows of metrics.jsonl; TRL: ``train_runtime``), and the process's peak RSS (``wait4``).

One evaluator for all: a separate fp32 process loads the base with plain transformers, each adapter
with ``PeftModel.from_pretrained`` (lorafam writes PEFT-format adapters into its run folder), and
computes the mean cross-entropy over the assistant tokens (the answer and its ``<|im_end|>``) of the
held-out chats, truncated to max_length; the base alone is the reference.

What differs and stays different: the order in which batches are drawn (each tool's own sampler,
same seed), the adapter's initial values and dropout masks (each tool's RNG use), TRL also trains
the newline the template writes after ``<|im_end|>`` (lorafam masks it; counted by the row check),
lorafam's run also generates the recipe's sample_prompt before and after training (drop it with
``--lorafam-set train.sample_prompt=null``), lorafam flushes denormals to zero on CPU (TRL does not),
and each tool's own eval figure uses its own labels and precision (the evaluator's column is the one
to compare). Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_peft  # noqa: E402  (the benchmark next to this one: CPU facts, versions, child environment)

ROOT = vs_peft.ROOT
RECIPE = ROOT / "recipes" / "quickstart.yaml"
IGNORE = -100

LORAFAM_CONFIGS = ("shipped", "packed", "packed-half")
#: SFTConfig fields each named TRL configuration changes from TRL's defaults.
TRL_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-ckpt": {"gradient_checkpointing": False},  # lorafam's default; TRL's is on
    "packed": {"packing": True},
}
#: lorafam's train.schedule -> transformers' lr_scheduler_type (both warm up linearly from 0 first).
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def lorafam_sets(name: str, recipe: Any) -> list[str]:
    """The ``--set`` items of a named lorafam configuration."""
    # Packed, batch_size counts rows of ~2 chatterbot chats each (at max_length 128): half the rows
    # give a step about the chats of an unpacked one.
    half = max(1, recipe.train.batch_size // 2)
    return {"shipped": [], "packed": ["data.packing=true"],
            "packed-half": ["data.packing=true", f"train.batch_size={half}"]}[name]


# --------------------------------------------------------------------------------------------------
# Data: lorafam's split, written once for both tools


def export_data(recipe: Any, work: Path, eval_rows: int | None) -> dict[str, Any]:
    """Write lorafam's train and held-out chats as JSONL (messages for lorafam, prompt/completion for
    TRL), and check that lorafam prepares the files into the rows it prepares from the alias.
    Returns the file paths, lorafam's tokenized train rows and the check's figures."""
    import datasets

    from lorafam.data import prepare_data
    from lorafam.data.sources import load_source
    from lorafam.modeling import load_tokenizer

    datasets.disable_progress_bars()
    cfg, seed, task = recipe.data, recipe.train.seed, recipe.model.task
    split = load_source(cfg.train).train_test_split(test_size=cfg.eval_split, seed=seed)  # as prepare_data splits
    # Only the chats lorafam trains on: it drops those with an empty answer, which TRL would train on.
    train, held_all = (split[part].filter(usable_chat) for part in ("train", "test"))
    held = held_all.select(range(min(eval_rows or len(held_all), len(held_all))))
    files = {}
    for part, rows in (("train", train), ("eval", held)):
        files[part] = write_jsonl(work / f"{part}.jsonl", ({"messages": r["messages"]} for r in rows))
        files[f"{part}_trl"] = write_jsonl(work / f"{part}_trl.jsonl", (
            {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows))

    tokenizer = load_tokenizer(recipe.model)
    from_alias = prepare_data(cfg, tokenizer, task, seed)
    from_files = prepare_data(cfg.model_copy(update={"train": str(files["train"]), "eval": str(files["eval"])}),
                              tokenizer, task, seed)
    n_eval = len(from_files.eval)
    same = (rows_of(from_alias.train) == rows_of(from_files.train)
            and rows_of(from_alias.eval)[:n_eval] == rows_of(from_files.eval))
    return {"files": files, "lorafam_rows": rows_of(from_files.train), "same_as_alias": same,
            "train_chats": len(train), "eval_chats": len(held), "heldout_total": len(split["test"]),
            "empty_dropped": len(split["train"]) + len(split["test"]) - len(train) - len(held_all),
            "report": from_files.report}


def usable_chat(row: dict[str, Any]) -> bool:
    """lorafam's own test (the chat format's): a well-formed chat with a non-empty assistant answer."""
    from lorafam.data.formats.chat import chat_messages
    from lorafam.data.rows import Skip

    try:
        return bool(chat_messages(row["messages"]))
    except Skip:
        return False


def write_jsonl(path: Path, rows: Any) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def rows_of(dataset: Any) -> list[tuple[list[int], list[int]]]:
    return list(zip(dataset["input_ids"], dataset["labels"]))


def compare_rows(ours: list, theirs: list, newline_id: int) -> dict[str, Any]:
    """lorafam's tokenized train rows against TRL's, row by row (neither reorders before training)."""
    n = min(len(ours), len(theirs))
    same_ids = sum(a[0] == b[0] for a, b in zip(ours, theirs))
    same_labels = sum(a == b for a, b in zip(ours, theirs))
    # TRL's completion is everything after the prompt, so it also labels the template's "\n" after <|im_end|>.
    newline_only = sum(
        a[0] == b[0] and a[1] != b[1] and a[1][:-1] == b[1][:-1] and a[1][-1] == IGNORE and b[1][-1] == newline_id
        for a, b in zip(ours, theirs)
    )
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a[0] != b[0]), None)
    return {"lorafam_rows": len(ours), "trl_rows": len(theirs), "compared": n, "same_ids": same_ids,
            "same_labels": same_labels, "labels_differ_by_final_newline": newline_only, "first_ids_diff": first_diff,
            "row0_ids": {"lorafam": ours[0][0], "trl": theirs[0][0]} if n else None}


# --------------------------------------------------------------------------------------------------
# Runs: one process each


def timed_process(cmd: list[str], log: Path, threads: int, adapter: Path, label: str) -> dict[str, Any]:
    """Run ``cmd`` to its end: seconds from its start to ``adapter`` written and to its exit, and the
    process's own peak RSS (wait4's, so nothing else counts)."""
    start = time.time()  # wall clock, as the adapter file's mtime
    with log.open("w") as out:
        # vs_peft's environment: this checkout's lorafam on PYTHONPATH, OMP/MKL threads, hubs offline.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=vs_peft.child_env(threads))
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    exit_s = time.time() - start
    if proc.returncode != 0 or not adapter.is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        sys.exit(f"{label} failed (exit {proc.returncode}, log {log}):\n{tail}")
    return {"wall_s": adapter.stat().st_mtime - start, "exit_s": exit_s, "peak_rss_mb": usage.ru_maxrss / 1024,
            "log": str(log)}


def run_lorafam(name: str, sets: list[str], recipe_path: Path, work: Path, tag: str, threads: int) -> dict[str, Any]:
    """`lorafam train` on the generated recipe, through the CLI, with the configuration's --set items."""
    out = work / "runs" / f"lorafam-{name}-{tag}"
    cmd = [sys.executable, "-m", "lorafam", "train", str(recipe_path), *(f"--set={s}" for s in sets),
           f"--set=output_dir={out}"]
    result = timed_process(cmd, work / f"lorafam-{name}-{tag}.log", threads, out / "adapter_model.safetensors",
                           f"lorafam {name}")
    info = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result | {
        "tool": "lorafam", "config": name, "sets": sets, "adapter": str(out),
        "loop_s": loop_seconds(metrics), "precision": info["precision"]["mixed_precision"],
        "precision_reason": info["precision"].get("reason"), "own_eval_loss": (info.get("eval_after") or {}).get("loss"),
        "run_json_seconds": info.get("seconds"), "packing": info.get("packing"),
    }


def loop_seconds(metrics: list[dict[str, Any]]) -> float:
    """The training steps alone: each logged window's seconds per step times its steps. (run.json's
    ``seconds`` also holds the final eval and sample.)"""
    total, last = 0.0, 0
    for row in metrics:
        if "step_seconds" in row and "phase" not in row:
            total += row["step_seconds"] * (row["step"] - last)
            last = row["step"]
    return total


def run_trl(name: str, overrides: dict[str, Any], job: dict[str, Any], data: dict[str, Any], work: Path, tag: str,
            threads: int) -> dict[str, Any]:
    out = work / "runs" / f"trl-{name}-{tag}"
    spec = {"job": job, "overrides": overrides, "out": str(out), "threads": threads,
            "train": str(data["files"]["train_trl"]), "eval": str(data["files"]["eval_trl"]),
            "rows": str(work / f"trl-{name}-{tag}-rows.jsonl"), "result": str(work / f"trl-{name}-{tag}.json")}
    result = timed_process([sys.executable, __file__, "--trl-child", json.dumps(spec)], work / f"trl-{name}-{tag}.log",
                           threads, out / "adapter_model.safetensors", f"TRL {name}")
    child = json.loads(Path(spec["result"]).read_text())
    return result | child | {"tool": "trl", "config": name, "overrides": overrides, "adapter": str(out),
                             "rows": spec["rows"] if child["wrote_rows"] else None}


def trl_child(spec: dict[str, Any]) -> None:
    """TRL's side, in its own process: SFTTrainer with a PEFT LoraConfig, the job's settings only."""
    import torch

    torch.set_num_threads(spec["threads"])
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    job = spec["job"]
    train = datasets.load_dataset("json", data_files=spec["train"], split="train")
    held = datasets.load_dataset("json", data_files=spec["eval"], split="train")
    settings = dict(
        max_steps=job["steps"], per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"], learning_rate=job["lr"],
        lr_scheduler_type=SCHEDULES[job["schedule"]], warmup_steps=job["warmup_steps"],
        weight_decay=job["weight_decay"], max_grad_norm=job["max_grad_norm"] or 0.0, max_length=job["max_length"],
        per_device_eval_batch_size=job["eval_batch_size"], seed=job["seed"],
    )
    # --trl-set may change any of the job's settings too (e.g. seed=1 beside --lorafam-set train.seed=1).
    args = SFTConfig(output_dir=spec["out"], use_cpu=not torch.cuda.is_available(), report_to="none",
                     **(settings | spec["overrides"]))
    lora = LoraConfig(r=job["r"], lora_alpha=job["alpha"], lora_dropout=job["dropout"],
                      target_modules=job["target_modules"], task_type="CAUSAL_LM")
    # The model by path, as a user passes a hub id: TRL loads it itself (fp32 unless told otherwise).
    trainer = SFTTrainer(model=job["model"], args=args, train_dataset=train, eval_dataset=held, peft_config=lora)
    before = trainer.evaluate()
    trained = trainer.train()
    after = trainer.evaluate()
    trainer.save_model(spec["out"])

    # After the adapter is written (the wall time stops there): what it ran with, and its train rows.
    rows = trainer.train_dataset
    wrote_rows = not args.packing and {"input_ids", "labels"} <= set(rows.column_names)
    if wrote_rows:
        write_jsonl(Path(spec["rows"]), ({"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows))
    facts = {"bf16": args.bf16, "fp16": args.fp16, "accelerate_mixed_precision": str(trainer.accelerator.mixed_precision),
             "gradient_checkpointing": args.gradient_checkpointing, "packing": args.packing,
             "padding_free": args.padding_free, "completion_only_loss": trainer.completion_only_loss,
             "optim": str(getattr(args.optim, "value", args.optim)), "model_dtype": str(trainer.model.dtype)}
    Path(spec["result"]).write_text(json.dumps({
        "loop_s": trained.metrics["train_runtime"], "own_eval_loss": after["eval_loss"],
        "own_eval_loss_before": before["eval_loss"], "final_train_loss": trained.training_loss,
        "precision": "bf16" if facts["accelerate_mixed_precision"] == "bf16" else facts["accelerate_mixed_precision"],
        "trl_facts": facts, "wrote_rows": wrote_rows,
    }))


# --------------------------------------------------------------------------------------------------
# One evaluator for every adapter


def eval_child(spec: dict[str, Any]) -> None:
    """fp32, plain transformers + PEFT: the base alone, then each adapter on a freshly loaded base."""
    import torch
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    chats = [json.loads(line)["messages"] for line in Path(spec["eval"]).read_text().splitlines()]
    encoded = [e for e in (assistant_labels(tokenizer, chat, spec["max_length"]) for chat in chats) if e is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    for i in range(0, len(encoded), 8):
        chunk = encoded[i : i + 8]
        width = max(len(ids) for ids, _ in chunk)
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
            "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in chunk]),
        })

    results = {}
    for label, adapter in [("base", None), *spec["adapters"]]:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for batch in batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                loss_sum += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                            ignore_index=IGNORE, reduction="sum").item()
                count += int((targets != IGNORE).sum())
        results[label] = {"loss": loss_sum / count, "tokens": count}
    Path(spec["result"]).write_text(json.dumps({"chats": len(chats), "scored": len(encoded), "results": results}))


def assistant_labels(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> tuple[list, list] | None:
    """The chat as the template renders it, labels on the last (assistant) turn's answer and its
    end-of-turn token, nothing after; None for a chat with no answer or a prompt that is no prefix."""
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]  # SmolLM2: eos is <|im_end|>
    if ids[: len(prompt_ids)] != prompt_ids or not ends or ends[-1] < len(prompt_ids):
        return None
    end = ends[-1] + 1
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) : end] + [IGNORE] * (len(ids) - end)
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(t != IGNORE for t in labels) else None


def evaluate_all(runs: list[dict[str, Any]], job: dict[str, Any], data: dict[str, Any], work: Path,
                 threads: int) -> dict[str, Any]:
    spec = {"model": job["model"], "eval": str(data["files"]["eval"]), "max_length": job["max_length"],
            "threads": threads, "adapters": [(run["label"], run["adapter"]) for run in runs],
            "result": str(work / "eval.json")}
    log = work / "eval.log"
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, __file__, "--eval-child", json.dumps(spec)], stdout=out,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=vs_peft.child_env(threads))
    if proc.returncode != 0:
        sys.exit(f"evaluator failed (exit {proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


# --------------------------------------------------------------------------------------------------
# The parent


def job_of(recipe: Any, steps: int) -> dict[str, Any]:
    """The quickstart's settings that both sides take, from the recipe."""
    from lorafam.modeling import resolve_model_path

    t, a = recipe.train, recipe.adapter
    return {"model": resolve_model_path(recipe.model.name), "model_name": recipe.model.name, "steps": steps,
            "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": t.lr, "schedule": t.schedule,
            "warmup_steps": t.warmup_steps, "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
            "seed": t.seed, "eval_batch_size": t.eval_batch_size or t.batch_size, "max_length": recipe.data.max_length,
            "r": a.r, "alpha": a.alpha, "dropout": a.dropout, "target_modules": list(a.target_modules)}


def write_recipe(work: Path, data: dict[str, Any], steps: int) -> Path:
    """recipes/quickstart.yaml with the exported files as data.train / data.eval and --steps."""
    raw = yaml.safe_load(RECIPE.read_text())
    raw["data"] |= {"train": str(data["files"]["train"]), "eval": str(data["files"]["eval"])}
    raw["data"].pop("eval_split", None)  # the held-out rows are data.eval now
    raw["train"]["max_steps"] = steps
    path = work / "quickstart.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--trl-set {item}: expected FIELD=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def describe_precision(run: dict[str, Any]) -> str:
    return {"bf16": "bf16 autocast", "no": "fp32", "fp16": "fp16 autocast"}.get(run["precision"], run["precision"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lorafam", nargs="*", choices=LORAFAM_CONFIGS, default=["shipped", "packed"],
                        help="lorafam configurations (none: TRL only); packed-half: packed at half the micro-batch")
    parser.add_argument("--trl", nargs="*", choices=list(TRL_CONFIGS), default=["default"],
                        help="TRL configurations (none: lorafam only); no-ckpt: gradient checkpointing off")
    parser.add_argument("--lorafam-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `lorafam train --set` for every lorafam run")
    parser.add_argument("--trl-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="extra SFTConfig field for every TRL run (value parsed as YAML)")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (the quickstart's 120)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: every core")
    parser.add_argument("--eval-rows", type=int, help="the first N held-out chats (default: all of them)")
    parser.add_argument("--rounds", type=int, default=1, help="runs per configuration; even rounds go in reverse order")
    parser.add_argument("--order", choices=["lorafam-first", "trl-first"], default="lorafam-first")
    parser.add_argument("--work", type=Path, help="keep data, recipes, logs and adapters here (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "vs_trl.json")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    parser.add_argument("--eval-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        return trl_child(json.loads(args.trl_child))
    if args.eval_child:
        return eval_child(json.loads(args.eval_child))
    if not args.lorafam and not args.trl:
        parser.error("nothing to run: give --lorafam and/or --trl configurations")

    from lorafam.recipe import load_recipe  # this checkout's: vs_peft put it first on sys.path

    machine = vs_peft.describe_machine()
    machine |= {name: metadata.version(name) for name in ("trl", "accelerate", "datasets")}
    print(f"trl {machine['trl']} · accelerate {machine['accelerate']} · datasets {machine['datasets']} · "
          f"{args.threads} threads per run", flush=True)
    recipe = load_recipe(RECIPE)
    job = job_of(recipe, args.steps)
    parse_sets(args.trl_set)  # a malformed item fails now, not after the lorafam runs
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = export_data(recipe, work, args.eval_rows)
        print(f"data: {data['train_chats']} train chats, {data['eval_chats']} of {data['heldout_total']} held-out chats "
              f"(lorafam's split of {recipe.data.train}, seed {recipe.train.seed}; {data['empty_dropped']} chats with "
              f"an empty answer left out, as lorafam does) in {work}; lorafam prepares the "
              f"files {'into the same rows as' if data['same_as_alias'] else 'DIFFERENTLY from'} the alias", flush=True)
        if not data["same_as_alias"]:
            print("warning: the exported files do not reproduce lorafam's own split; the comparison is off")
        print(f"job: {job['model_name']}, {args.steps} steps x {job['batch_size']} x grad_accum {job['grad_accum']}, "
              f"lr {job['lr']} {job['schedule']} warmup {job['warmup_steps']}, LoRA r {job['r']} alpha {job['alpha']} "
              f"dropout {job['dropout']} on {', '.join(job['target_modules'])}, max_length {job['max_length']}", flush=True)
        recipe_path = write_recipe(work, data, args.steps)

        runs = run_all(args, recipe, recipe_path, job, data, work)
        template = template_check(data, runs, job["model"])
        print("evaluating every adapter and the base (fp32, plain transformers + PEFT) ...", flush=True)
        evaluated = evaluate_all(runs, job, data, work, args.threads)
        table = report(runs, evaluated, machine, args)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    data_facts = {k: v for k, v in data.items() if k not in ("lorafam_rows", "files")}
    vs_peft.write_json(args.json, {"machine": machine, "settings": settings, "job": job, "data": data_facts,
                                   "template_check": template, "runs": runs, "evaluator": evaluated, "table": table})


def run_all(args: argparse.Namespace, recipe: Any, recipe_path: Path, job: dict[str, Any], data: dict[str, Any],
            work: Path) -> list[dict[str, Any]]:
    """Every configuration once per round, one process at a time; even rounds in reverse (A B B A)."""
    lorafam = [("lorafam", n) for n in args.lorafam]
    trl = [("trl", n) for n in args.trl]
    sides = lorafam + trl if args.order == "lorafam-first" else trl + lorafam
    trl_sets = parse_sets(args.trl_set)
    runs = []
    for round_no in range(1, args.rounds + 1):
        for tool, name in sides if round_no % 2 else sides[::-1]:
            print(f"{tool} {name} (round {round_no}/{args.rounds}) ...", flush=True)
            if tool == "lorafam":
                run = run_lorafam(name, lorafam_sets(name, recipe) + args.lorafam_set, recipe_path, work,
                                  str(round_no), args.threads)
            else:
                run = run_trl(name, TRL_CONFIGS[name] | trl_sets, job, data, work, str(round_no), args.threads)
            # A configuration changed by --lorafam-set / --trl-set says so in the table.
            changed = "+set" if (args.lorafam_set if tool == "lorafam" else args.trl_set) else ""
            run |= {"config": name + changed, "label": f"{tool} {name}{changed} #{round_no}", "round": round_no}
            runs.append(run)
            print(f"  wall {run['wall_s']:.1f} s to the adapter ({run['exit_s']:.1f} s to exit), loop "
                  f"{run['loop_s']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB, {describe_precision(run)}, "
                  f"own eval loss {run['own_eval_loss']:.4f}", flush=True)
    return runs


def template_check(data: dict[str, Any], runs: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    """Both tools' tokenized train rows, compared; a warning line when the token ids differ."""
    trl_rows = next((run["rows"] for run in runs if run["tool"] == "trl" and run.get("rows")), None)
    if trl_rows is None:
        print("template check: no unpacked TRL run, so no TRL rows to compare")
        return None
    from transformers import AutoTokenizer

    newline = AutoTokenizer.from_pretrained(model)("\n", add_special_tokens=False)["input_ids"]
    theirs = [(r["input_ids"], r["labels"]) for r in map(json.loads, Path(trl_rows).read_text().splitlines())]
    check = compare_rows(data["lorafam_rows"], theirs, newline[-1] if newline else -1)
    print(f"template check: {check['lorafam_rows']} lorafam train rows, {check['trl_rows']} TRL rows; "
          f"{check['same_ids']}/{check['compared']} with the same token ids, {check['same_labels']} with the same labels, "
          f"{check['labels_differ_by_final_newline']} differing only in TRL's label on the newline after <|im_end|>")
    if check["same_ids"] != check["compared"] or check["lorafam_rows"] != check["trl_rows"]:
        print(f"warning: the two tools tokenize the chats differently (first differing row: {check['first_ids_diff']}); "
              "they do not train on the same tokens")
    return check


def report(runs: list[dict[str, Any]], evaluated: dict[str, Any], machine: dict[str, Any],
           args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per configuration: medians over its rounds, the evaluator's mean loss."""
    from lorafam.hardware import cpu_line

    losses = evaluated["results"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['tool']} {run['config']}", []).append(run)
    trl_wall = next((statistics.median(r["wall_s"] for r in g) for k, g in groups.items() if k.startswith("trl")), None)
    base = losses["base"]["loss"]
    print(f"\n{machine['cpu']}, {cpu_line()} · {args.threads} threads · {args.steps} steps · evaluator: "
          f"{evaluated['scored']} held-out chats, {losses['base']['tokens']} assistant tokens, fp32")
    print(f"{'':22}{'precision':>15}{'wall s':>9}{'loop s':>9}{'peak RSS MB':>13}{'eval loss':>11}{'own eval':>10}"
          f"{'wall / TRL':>12}")
    print(f"{'base (no adapter)':22}{'fp32':>15}{'':>9}{'':>9}{'':>13}{base:>11.4f}")
    table = []
    for label, group in groups.items():
        row = {"label": label, "precision": describe_precision(group[0]), "runs": len(group),
               "wall_s": statistics.median(r["wall_s"] for r in group),
               "loop_s": statistics.median(r["loop_s"] for r in group),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in group),
               "eval_loss": statistics.mean(losses[r["label"]]["loss"] for r in group),
               "own_eval_loss": statistics.mean(r["own_eval_loss"] for r in group)}
        row["wall_over_trl"] = row["wall_s"] / trl_wall if trl_wall else None
        table.append(row)
        ratio = f"{row['wall_over_trl']:.2f}" if row["wall_over_trl"] else "-"
        print(f"{label:22}{row['precision']:>15}{row['wall_s']:>9.1f}{row['loop_s']:>9.1f}{row['peak_rss_mb']:>13.0f}"
              f"{row['eval_loss']:>11.4f}{row['own_eval_loss']:>10.4f}{ratio:>12}")
    print("wall: process start to adapter written (median over rounds); loop: training steps as each tool reports them "
          "(lorafam metrics.jsonl, TRL train_runtime); peak RSS: each process's own; eval loss: the one fp32 evaluator "
          "(mean over rounds); own eval: each tool's own figure (its labels, its precision)")
    for run in runs:
        if run["tool"] == "trl":
            facts = ", ".join(f"{k} {v}" for k, v in run["trl_facts"].items())
            print(f"TRL ran with: {facts}")
            break
    for run in runs:
        if run["tool"] == "lorafam":
            print(f"lorafam ran with: mixed_precision {run['precision']} ({run['precision_reason']})")
            break
    return table


if __name__ == "__main__":
    main()
