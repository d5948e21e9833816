"""The training loop: one function, read top to bottom.

Per optimizer step: grad-accum micro-steps (forward, task loss + the variant's extra loss terms,
backward), clip, optimizer step, the variant's step hook, lr schedule, log, eval, checkpoint.
The variant is reached only through its interface (lorafam.adapters.base.Variant).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorafam.adapters import Variant
from lorafam.checkpoint import save_checkpoint
from lorafam.data import PreparedData, make_collator
from lorafam.evaluate import evaluate, generate_sample
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.recipe import Recipe
from lorafam.run import METRICS


@dataclass
class TrainResult:
    steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    sample_before: str | None = None
    sample_after: str | None = None
    final_train_loss: float | None = None
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def total_steps(recipe: Recipe, n_train: int) -> int:
    cfg = recipe.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def micro_batch_indices(n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[list[int]]:
    """Endless micro-batches of example indices: a fresh seeded permutation each epoch.

    Deterministic from (seed, epoch), so a resumed run can skip to the exact same position, and each
    process of a multi-process run takes its own slice of the same permutation.
    """
    epoch = 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        order = order[rank::world]
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def train(
    recipe: Recipe,
    model: torch.nn.Module,
    variant: Variant,
    tokenizer: Any,
    data: PreparedData,
    run_dir: Path,
    console: Console,
    phase: str = "main",
    steps: int | None = None,
) -> TrainResult:
    """Train ``variant``'s parameters on ``data.train``.

    ``phase`` other than "main" is a variant's preparatory run (see Variant.prepare): same loop,
    its own step count, no eval, samples or checkpoints, metrics rows tagged with the phase.
    """
    cfg = recipe.train
    task = recipe.model.task
    main = phase == "main"
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    collate = make_collator(tokenizer, task)
    steps = steps or total_steps(recipe, len(data.train))
    eval_batch = cfg.eval_batch_size or cfg.batch_size

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen embedding (no need to force input grads).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(variant.param_groups(cfg.lr, cfg.weight_decay), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    def run_eval() -> dict[str, float] | None:
        if data.eval is None or not main:
            return None
        return evaluate(model, data.eval, collate, task, eval_batch, cfg.eval_max_batches, accelerator.autocast)

    def sample() -> str | None:
        if task != "causal-lm" or not cfg.sample_prompt or not main:
            return None
        with accelerator.autocast():
            return generate_sample(accelerator.unwrap_model(model), tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)

    result = TrainResult(steps=steps, eval_before=run_eval(), eval_after=None, sample_before=sample())
    if result.eval_before:
        console.print(f"eval before: {format_metrics(result.eval_before)}")
    if result.sample_before is not None:
        console.print(f"sample before: {result.sample_before!r}")

    metrics_file = (run_dir / METRICS).open("w" if main else "a")
    batches = micro_batch_indices(len(data.train), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    progress = make_progress(console, steps)
    task_id = progress.add_task("train", total=steps, loss=float("nan"), lr=cfg.lr, tps=0.0)
    start, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    model.train()
    with progress:
        for step in range(1, steps + 1):
            # --- grad-accum micro-steps. DDP syncs gradients only on the last one (no_sync before).
            step_loss, extras_logged = 0.0, {}
            for micro in range(cfg.grad_accum):
                batch = collate([data.train[i] for i in next(batches)])
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else nullcontext()
                with sync, accelerator.autocast():
                    loss = model(**batch).loss
                    extras = variant.extra_losses()
                    total = loss + sum(extras.values()) if extras else loss
                    accelerator.backward(total / cfg.grad_accum)
                step_loss += loss.item() / cfg.grad_accum
                for name, value in extras.items():
                    extras_logged[name] = extras_logged.get(name, 0.0) + value.item() / cfg.grad_accum
                window_tokens += int(batch["attention_mask"].sum())

            # --- optimizer step, then the variant's hook (it may read gradients: zero them after).
            if cfg.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            hook_logs = variant.after_step(step, steps)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # --- log
            lr = optimizer.param_groups[0]["lr"]
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
            progress.update(task_id, advance=1, loss=step_loss, lr=lr, tps=tokens_per_s)
            result.final_train_loss = step_loss
            if step % cfg.log_every == 0 or step == steps:
                row = {"step": step, "loss": step_loss, "lr": lr, "tokens_per_s": tokens_per_s}
                row |= {} if main else {"phase": phase}
                row |= {k: v for k, v in extras_logged.items()} | hook_logs
                write_metrics(metrics_file, row)
                result.history.append(row)
                if not console.is_terminal:
                    console.print(f"{'' if main else phase + ' '}step {step}/{steps}  loss {step_loss:.4f}  lr {lr:.3g}  tok/s {tokens_per_s:.0f}")
                window_tokens, window_start = 0, time.perf_counter()

            # --- eval and checkpoint
            if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                metrics = run_eval()
                if metrics:
                    write_metrics(metrics_file, {"step": step} | {f"eval_{k}": v for k, v in metrics.items()})
                    console.print(f"step {step} eval: {format_metrics(metrics)}")
            if main and cfg.save_every and step % cfg.save_every == 0 and step != steps:
                save_checkpoint(run_dir, step, variant, optimizer, scheduler, {"total_steps": steps})

    result.eval_after = run_eval()
    if result.eval_after:
        write_metrics(metrics_file, {"step": steps} | {f"eval_{k}": v for k, v in result.eval_after.items()})
        console.print(f"eval after:  {format_metrics(result.eval_after)}")
    metrics_file.close()
    result.sample_after = sample()
    if result.sample_after is not None:
        console.print(f"sample after: {result.sample_after!r}")
    result.seconds = time.perf_counter() - start
    return result


def write_metrics(handle: Any, row: dict[str, Any]) -> None:
    handle.write(json.dumps(row) + "\n")
    handle.flush()


def format_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in ("loss", "perplexity", "accuracy") if k in metrics]
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def make_progress(console: Console, steps: int) -> Progress:
    return Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
