"""The training loop: one function, read top to bottom.

Per optimizer step: grad-accum micro-steps (forward, task loss + the variant's extra loss terms,
backward), clip, optimizer step, the variant's step hook, lr schedule, log, eval, checkpoint.
The variant is reached only through its interface (lorafam.adapters.base.Variant).

Surviving interruptions: a checkpoint holds everything the next step depends on (adapter, variant
state, optimizer, scheduler, RNG states, data position), so a resumed run takes the same steps an
uninterrupted one would. SIGINT/SIGTERM stop at the end of the current step with a checkpoint; a
non-finite loss stops the run (or skips the step, ``train.on_nan: skip``) instead of training on it.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import sys
import threading
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
from lorafam.checkpoint import Checkpoint, checkpoint_name, load_checkpoint, restore_rng, save_checkpoint
from lorafam.data import PreparedData, make_collator
from lorafam.evaluate import evaluate, generate_sample
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.quant import keep_training_layout
from lorafam.recipe import Recipe
from lorafam.errors import LorafamError
from lorafam.run import METRICS, write_text


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
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss (train.on_nan: skip)


class TrainingStopped(Exception):
    """The run stopped before its last step; ``exit_code`` is what the CLI exits with."""

    exit_code = 1
    status = "stopped"

    def __init__(self, message: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM: a checkpoint of the finished step was written; exit 128 + signal number."""

    status = "interrupted"

    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} after step {step}; checkpoint saved to {checkpoint}", step, checkpoint)
        self.exit_code = 128 + signum


class TrainingDiverged(TrainingStopped):
    """A NaN/inf loss or gradient under ``train.on_nan: stop``."""

    status = "diverged"


class StopRequests:
    """SIGINT/SIGTERM -> a flag the loop checks after each step (a second signal stops at once).

    Handlers can only be installed from the main thread; elsewhere signals keep their defaults.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # asked twice: the user does not want to wait for the step
            sys.stderr.write(f"{signal.Signals(signum).name} again: stopping now, without a checkpoint of this step\n")
            raise SystemExit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def total_steps(recipe: Recipe, n_train: int) -> int:
    cfg = recipe.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum))


def phase_steps(recipe: Recipe, n_examples: int) -> int:
    """One pass over ``n_examples`` at the recipe's batch size and accumulation."""
    return max(1, math.ceil(n_examples / (recipe.train.batch_size * recipe.train.grad_accum)))


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
    resume: Checkpoint | None = None,
) -> TrainResult:
    """Train ``variant``'s parameters on ``data.train``.

    ``phase`` other than "main" is a variant's preparatory run (see Variant.prepare): same loop,
    its own step count, no eval, samples or checkpoints, metrics rows tagged with the phase.
    ``resume`` continues from a checkpoint (lorafam.checkpoint.find_latest_checkpoint) of this run.
    Raises TrainingInterrupted on SIGINT/SIGTERM and TrainingDiverged on a non-finite loss.
    """
    cfg = recipe.train
    task = recipe.model.task
    main = phase == "main"
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    torch.manual_seed(cfg.seed)
    collate = make_collator(tokenizer, task)
    if steps is None:  # a preparatory phase without a step count makes one pass over its data
        steps = total_steps(recipe, len(data.train)) if main else phase_steps(recipe, len(data.train))
    eval_batch = cfg.eval_batch_size or cfg.batch_size

    # bitsandbytes would repack 4-bit weights for CPU inference on the first eval pass, after which
    # backward passes no gradient through them (lorafam.quant.keep_training_layout). A no-op walk
    # over the modules when the base is not quantized.
    keep_training_layout(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen embedding (no need to force input grads).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(variant.param_groups(cfg.lr, cfg.weight_decay), cfg)
    # A short preparatory phase gets a warmup in proportion, or its first steps would run at lr ~0.
    scheduler = make_scheduler(optimizer, cfg, steps, warmup=None if main else min(cfg.warmup_steps, steps // 10))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    first_step, micro_batches, last_checkpoint = 1, 0, None
    if resume is not None:
        if resume.state.get("total_steps") != steps or resume.state.get("processes", 1) != accelerator.num_processes:
            raise LorafamError(
                f"checkpoint {resume.path} was written for {resume.state.get('total_steps')} steps on "
                f"{resume.state.get('processes', 1)} process(es); this run has {steps} on {accelerator.num_processes}"
            )
        load_checkpoint(resume, variant, optimizer, scheduler)
        first_step, micro_batches, last_checkpoint = resume.step + 1, resume.state["micro_batches"], resume.path

    def run_eval() -> dict[str, float] | None:
        if data.eval is None or not main:
            return None
        return evaluate(model, data.eval, collate, task, eval_batch, cfg.eval_max_batches, accelerator.autocast)

    def sample() -> str | None:
        if task != "causal-lm" or not cfg.sample_prompt or not main:
            return None
        with accelerator.autocast():
            return generate_sample(accelerator.unwrap_model(model), tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)

    if resume is not None:  # what the summary reports from before the interruption
        result = TrainResult(
            steps=steps,
            eval_before=resume.state.get("eval_before"),
            eval_after=None,
            sample_before=resume.state.get("sample_before"),
            final_train_loss=resume.state.get("final_train_loss"),
            skipped_steps=resume.state.get("skipped_steps", 0),
        )
        console.print(f"resuming from {resume.path} (step {resume.step}/{steps})", soft_wrap=True)
    else:
        result = TrainResult(steps=steps, eval_before=run_eval(), eval_after=None, sample_before=sample())
        if result.eval_before:
            console.print(f"eval before: {format_metrics(result.eval_before)}")
        if result.sample_before is not None:
            console.print(f"sample before: {result.sample_before!r}")

    def checkpoint(step: int) -> Path:
        state = {
            "total_steps": steps,
            "processes": accelerator.num_processes,
            "micro_batches": micro_batches,
            "eval_before": result.eval_before,
            "sample_before": result.sample_before,
            "final_train_loss": result.final_train_loss,
            "skipped_steps": result.skipped_steps,
        }
        return save_checkpoint(run_dir, step, variant, optimizer, scheduler, state, cfg.keep_last)

    if main:  # rows past the checkpoint were logged by steps the resumed run takes again
        truncate_metrics(run_dir / METRICS, resume.step if resume is not None else 0)
    metrics_file = (run_dir / METRICS).open("a")
    batches = micro_batch_indices(len(data.train), cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes)
    batches = itertools.islice(batches, micro_batches, None)  # the resumed run's exact data position
    progress = make_progress(console, steps)
    task_id = progress.add_task("train", total=steps, completed=first_step - 1, loss=float("nan"), lr=cfg.lr, tps=0.0)
    start, window_tokens, window_start = time.perf_counter(), 0, time.perf_counter()
    model.train()
    if resume is not None:
        restore_rng(resume)  # last, so nothing between here and the first step draws from it
    with progress, (StopRequests() if main else nullcontext()) as stop:
        for step in range(first_step, steps + 1):
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
            micro_batches += cfg.grad_accum

            # --- optimizer step, then the variant's hook (it may read gradients: zero them after).
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            nonfinite = nonfinite_reason(step_loss, extras_logged, grad_norm)
            if nonfinite and cfg.on_nan == "stop":
                where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else (
                    "no checkpoint was written yet" + ("" if cfg.save_every else " (train.save_every is not set)")
                )
                metrics_file.close()
                raise TrainingDiverged(
                    f"{nonfinite} at step {step}/{steps}; stopped before the optimizer step (train.on_nan: stop); "
                    f"{where}; lower train.lr, check the data, or set train.on_nan: skip",
                    step, last_checkpoint,
                )
            if nonfinite:  # skip: no update from this batch; the schedules still advance by a step
                optimizer.zero_grad(set_to_none=True)
                result.skipped_steps += 1
                console.print(f"step {step}: {nonfinite}; optimizer step skipped (train.on_nan: skip)", soft_wrap=True)
            else:
                optimizer.step()
            hook_logs = variant.after_step(step, steps)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # --- log
            lr = optimizer.param_groups[0]["lr"]
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
            progress.update(task_id, advance=1, loss=step_loss, lr=lr, tps=tokens_per_s)
            if not nonfinite:
                result.final_train_loss = step_loss
            if step % cfg.log_every == 0 or step == steps or nonfinite:
                row = {"step": step, "loss": None if nonfinite else step_loss, "lr": lr, "tokens_per_s": tokens_per_s}
                row |= {"skipped": True} if nonfinite else {}
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
                last_checkpoint = checkpoint(step)
            if stop is not None and stop.signum is not None:
                if last_checkpoint is None or last_checkpoint.name != checkpoint_name(step):
                    last_checkpoint = checkpoint(step)
                metrics_file.close()
                raise TrainingInterrupted(stop.signum, step, last_checkpoint)

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


def nonfinite_reason(loss: float, extras: dict[str, float], grad_norm: Any) -> str | None:
    """What is NaN/inf this step ("loss is nan", ...), or None when all is finite."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    for name, value in extras.items():
        if not math.isfinite(value):
            return f"{name} is {value}"
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        return f"gradient norm is {float(grad_norm)}"
    return None


def truncate_metrics(path: Path, through_step: int) -> None:
    """Drop main-phase rows after ``through_step`` (and a half-written last line); keep phase rows."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a kill mid-write
        if "phase" in row or row.get("step", 0) <= through_step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


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
