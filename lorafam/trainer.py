"""The training loop: set-up, one optimizer step, and the loop around it, each read top to bottom.

One optimizer step is the mean loss over *all* of that step's label units (tokens whose next token
is labelled; examples for classifiers), over every micro-batch and every process: the step's units
are counted before any backward pass and summed across processes, and each micro-batch
contributes its loss *sum* divided by that total. So batch 8 x 1, batch 4 x grad_accum 2 and
2 processes x batch 4 train the same adapter up to float rounding, whatever the examples' lengths
(dividing each micro-batch's *mean* by grad_accum does not: shorter micro-batches would weigh
more). The variant's own loss terms (AdaLoRA's penalty) are added once per step.

Which examples a step sees depends only on the seed and the step number: each epoch is a seeded
permutation cut into global batches (batch_size x grad_accum x processes), the last partial one
dropped; a step's global batch is split across processes, then into micro-batches. A resumed run
therefore needs nothing but the step to take exactly the batches the uninterrupted run would.

What differs between the main run and a variant's preparatory pass (LoRA-drop's probe run) is the
``Pass`` handed to the loop: both checkpoint and answer signals (a preparatory pass into its own
folder under prepare/); the main pass (``MainPass``) also evaluates and samples. What differs
between one process, DDP, FSDP2 and DeepSpeed is the ``Engine`` (lorafam.engine); the loop does
not know which it runs under.

Surviving interruptions: a checkpoint holds everything the next step depends on (adapter, variant
state, optimizer, scheduler, RNG states), so a resumed run takes the same steps an uninterrupted
one would. SIGINT/SIGTERM stop at the end of the current step with a checkpoint; a non-finite loss
stops the run (or skips the step, ``train.on_nan: skip``) instead of training on it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorafam.adapters import Variant
from lorafam.adapters.dropout import keyed, mix
from lorafam.checkpoint import Checkpoint, checkpoint_name, load_checkpoint, restore_rng
from lorafam.data import PreparedData, check_packing_support
from lorafam.distributed import all_reduce_max, all_reduce_sum, gathered, is_partitioned
from lorafam.engine import Engine
from lorafam.errors import LorafamError
from lorafam.evaluate import evaluate, generate_sample
from lorafam.hardware import Precision, choose_precision
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.quant import keep_training_layout
from lorafam.recipe import Recipe
from lorafam.run import RunFolder
from lorafam.tasks import Task


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
    """SIGINT or SIGTERM: a checkpoint of the finished step was written (none under DeepSpeed);
    exit 128 + signal number."""

    status = "interrupted"

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint (none under DeepSpeed): the run cannot be resumed"
        super().__init__(f"interrupted by {name} after step {step}; {saved}", step, checkpoint)
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

    def agreed(self) -> int | None:
        """The signal, once any process got one: every process must stop after the same step."""
        local = torch.tensor(self.signum or 0)
        return int(all_reduce_max(local)) or None

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------------
# Which examples each step sees


@dataclass(frozen=True)
class BatchLayout:
    """batch_size x grad_accum x processes: how one optimizer step's examples are laid out."""

    batch_size: int
    grad_accum: int
    processes: int = 1
    #: Keep each pass's last, partial global batch: a preparatory phase's one pass over its sample
    #: must see every example once. The main run drops it, so each of its steps is a full batch.
    partial_last: bool = False

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def steps_per_epoch(self, n_examples: int) -> int:
        """Global batches per pass (the last partial one dropped unless ``partial_last``); 1 for tiny data."""
        whole, rest = divmod(n_examples, self.global_batch)
        return max(1, whole + int(self.partial_last and rest > 0))

    def micro_batches(self, n_examples: int, seed: int, step: int, rank: int,
                      lengths: Sequence[int] | None = None) -> list[list[int]]:
        """Example indices of this process's micro-batches in optimizer step ``step`` (1-based).

        With ``lengths`` (each example's tokens) the process's examples go into its micro-batches
        shortest first, so each micro-batch is padded to about its own rows' length. Which examples
        make the step does not change, and a step does not depend on how they are split (its loss is
        divided by the whole step's label count; dropout masks follow the example), so this moves
        only float rounding, and saves the padding of a short row batched with a long one.
        """
        epoch, index = divmod(step - 1, self.steps_per_epoch(n_examples))
        order = _permutation(n_examples, seed + epoch)
        step_examples = order[index * self.global_batch : (index + 1) * self.global_batch]
        per_process = self.batch_size * self.grad_accum
        mine = list(step_examples[rank * per_process : (rank + 1) * per_process])
        if lengths is not None and self.grad_accum > 1:
            mine.sort(key=lambda i: lengths[i])
        batches = [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.grad_accum)]
        # Fewer examples than one global batch (a small preparatory sample): fewer micro-batches,
        # possibly none for this process (see Session.batches).
        return [b for b in batches if b]


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist())


def layout_of(recipe: Recipe, processes: int = 1) -> BatchLayout:
    return BatchLayout(recipe.train.batch_size, recipe.train.grad_accum, processes)


def total_steps(recipe: Recipe, n_train: int, processes: int = 1) -> int:
    cfg = recipe.train
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * layout_of(recipe, processes).steps_per_epoch(n_train)))


# --------------------------------------------------------------------------------------------------
# What a pass does besides training


class Pass:
    """A variant's preparatory pass (LoRA-drop's probe run, GLoRA's supernet), and the interface of
    every pass.

    One pass over its data (the last, partial global batch kept, so each example is seen once), a
    warmup in proportion to its length, metrics rows tagged with its name; no eval and no samples.
    Like the main run it checkpoints every ``train.save_every`` steps and on SIGINT/SIGTERM, into
    its own folder (``folder``: the run's prepare/<name>/), and goes on from ``resume``, so a run
    killed inside a long preparatory pass loses only the steps since its last checkpoint.
    ``MainPass`` is the run itself.
    """

    partial_last = True
    last_checkpoint: Path | None = None

    def __init__(self, name: str, folder: RunFolder | None = None, resume: Checkpoint | None = None):
        self.name, self.folder, self.resume = name, folder, resume
        self.stop: StopRequests | None = None

    def steps(self, recipe: Recipe, n_examples: int, processes: int) -> int:
        """One pass over ``n_examples`` in global batches."""
        return max(1, math.ceil(n_examples / layout_of(recipe, processes).global_batch))

    def warmup(self, recipe: Recipe, steps: int) -> int | None:
        """A short pass gets a warmup in proportion, or its first steps would run at lr ~0."""
        return min(recipe.train.warmup_steps, steps // 10)

    def wants_checkpoints(self, recipe: Recipe) -> bool:
        return self.folder is not None and bool(recipe.train.save_every)

    def announce(self, console: Console, engine: Engine) -> None:
        """Printed once the pass is set up."""

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A metrics row as logged (and as printed, ``line_prefix`` in front)."""
        return row | {"phase": self.name}

    @property
    def line_prefix(self) -> str:
        return f"{self.name} "

    def begin(self, s: "Session", console: Console) -> tuple["TrainResult", int]:
        """The result to fill and the first step to take."""
        if self.resume is None:
            return TrainResult(steps=s.steps, eval_before=None, eval_after=None), 1
        return self.resumed(s, console)

    def resumed(self, s: "Session", console: Console) -> tuple["TrainResult", int]:
        """The state ``resume`` holds put back: adapter, variant state, optimizer, scheduler, RNGs."""
        resume = self.resume
        s.engine.check_resumable()
        if resume.state.get("total_steps") != s.steps or resume.state.get("processes", 1) != s.engine.num_processes:
            raise LorafamError(
                f"checkpoint {resume.path} was written for {resume.state.get('total_steps')} steps on "
                f"{resume.state.get('processes', 1)} process(es); this run has {s.steps} on {s.engine.num_processes}"
            )
        load_checkpoint(resume, s.variant, s.optimizer, s.scheduler, model=s.loss_model)
        self.last_checkpoint = resume.path
        result = TrainResult(  # what the summary reports from before the interruption
            steps=s.steps,
            eval_before=resume.state.get("eval_before"),
            eval_after=None,
            sample_before=resume.state.get("sample_before"),
            final_train_loss=resume.state.get("final_train_loss"),
            skipped_steps=resume.state.get("skipped_steps", 0),
        )
        console.print(f"resuming {self.line_prefix}from {resume.path} (step {resume.step}/{s.steps})", soft_wrap=True)
        restore_rng(resume)  # last, so nothing between here and the first step draws from it
        return result, resume.step + 1

    def keeps_row(self, row: dict[str, Any]) -> bool:
        """Which rows of metrics.jsonl from before stay: all but this pass's own past its checkpoint
        (a pass run again after a kill logs them again)."""
        return row.get("phase") != self.name or row.get("step", 0) <= (self.resume.step if self.resume is not None else 0)

    def evaluate(self, s: "Session") -> dict[str, float] | None:
        return None

    def sample(self, s: "Session") -> str | None:
        return None

    def stop_requests(self) -> AbstractContextManager[Any]:
        if self.folder is None:
            return nullcontext()
        self.stop = StopRequests()
        return self.stop

    def after_step(self, s: "Session", step: int, result: "TrainResult") -> None:
        """Checkpoints every ``train.save_every`` steps and on a signal, after each optimizer step."""
        if self.folder is None:
            return
        cfg = s.recipe.train
        if cfg.save_every and step % cfg.save_every == 0 and step != s.steps:
            self.last_checkpoint = self.checkpoint(s, step, result)
        signum = self.stop.agreed() if self.stop is not None else None
        if signum is not None:
            if s.engine.checkpoints and (self.last_checkpoint is None or self.last_checkpoint.name != checkpoint_name(step)):
                self.last_checkpoint = self.checkpoint(s, step, result)
            raise TrainingInterrupted(signum, step, self.last_checkpoint)

    def checkpoint(self, s: "Session", step: int, result: "TrainResult") -> Path:
        state = {
            "total_steps": s.steps,
            "processes": s.engine.num_processes,
            "global_batch": s.layout.global_batch,
            "eval_before": result.eval_before,
            "sample_before": result.sample_before,
            "final_train_loss": result.final_train_loss,
            "skipped_steps": result.skipped_steps,
        }
        return self.folder.save_checkpoint(step, s.variant, s.optimizer, s.scheduler, state, s.recipe.train.keep_last, s.loss_model)


class MainPass(Pass):
    """The run itself: evaluates and samples before and after, checkpoints every ``train.save_every``
    steps into the run folder, stops with a checkpoint on SIGINT/SIGTERM, and resumes from ``resume``."""

    partial_last = False

    def __init__(self, folder: RunFolder, tokenizer: Any, resume: Checkpoint | None = None):
        super().__init__("main", folder, resume)
        self.tokenizer = tokenizer

    def steps(self, recipe: Recipe, n_examples: int, processes: int) -> int:
        return total_steps(recipe, n_examples, processes)

    def warmup(self, recipe: Recipe, steps: int) -> int | None:
        return None  # the recipe's

    def announce(self, console: Console, engine: Engine) -> None:
        console.print(f"engine: {engine.name} on {engine.num_processes} process(es)", soft_wrap=True)
        if engine.held:
            console.print(f"frozen weights: {engine.held.numel / 1e6:.1f}M held in {str(engine.held.dtype).removeprefix('torch.')} "
                          "through the steps, back in fp32 for evals and at the end (train.frozen_weights: hold)", soft_wrap=True)

    def row(self, row: dict[str, Any]) -> dict[str, Any]:
        return row

    @property
    def line_prefix(self) -> str:
        return ""

    def begin(self, s: "Session", console: Console) -> tuple["TrainResult", int]:
        if self.resume is not None:
            return self.resumed(s, console)
        result = TrainResult(steps=s.steps, eval_before=self.evaluate(s), eval_after=None, sample_before=self.sample(s))
        if result.eval_before:
            console.print(f"eval before: {s.task.format_metrics(result.eval_before)}")
        if result.sample_before is not None:
            console.print(f"sample before: {result.sample_before!r}")
        return result, 1

    def keeps_row(self, row: dict[str, Any]) -> bool:
        # Every preparatory pass's rows; main rows up to the checkpoint (the steps after it are taken again).
        return "phase" in row or row.get("step", 0) <= (self.resume.step if self.resume is not None else 0)

    def evaluate(self, s: "Session") -> dict[str, float] | None:
        if s.data.eval is None:
            return None
        cfg = s.recipe.train
        # In fp32 the weights as loaded; in the training precision the held ones compute the same.
        with s.engine.exact_weights() if cfg.eval_precision == "fp32" else nullcontext():
            return evaluate(
                s.loss_model, s.task, s.data.eval, s.collate, cfg.eval_batch_size or cfg.batch_size,
                cfg.eval_max_batches, eval_autocast(s), s.engine.process_index, s.engine.num_processes,
            )

    def sample(self, s: "Session") -> str | None:
        if not s.task.generates or not s.recipe.train.sample_prompt:
            return None
        with s.engine.autocast():
            return generate_sample(s.model, self.tokenizer, s.recipe.train.sample_prompt, s.recipe.train.sample_max_new_tokens)


# --------------------------------------------------------------------------------------------------
# Set-up


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile, in place, every repeated block of ``model`` (its ``_no_split_modules`` classes:
    the decoder layers) with the adapter layers inside; returns how many.

    In place (``Module.compile``), so module paths and hence saved keys stay as they are; regional,
    so the compiler builds one graph for all layers of a class instead of one for the whole model.
    A model that names no such blocks is compiled whole. A block whose adapters change structure
    later (LoRA-drop after its probe run) is simply traced again.
    """
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks or [model]:
        block.compile()
    return len(blocks) or 1


@dataclass
class Session:
    """Everything one optimizer step needs, built once by ``set_up``."""

    recipe: Recipe
    task: Task
    engine: Engine
    loss_model: torch.nn.Module  # the task's loss module around the model, as the engine prepared it
    model: torch.nn.Module  # the transformers model itself (generation, saving)
    variant: Variant
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    data: PreparedData
    collate: Any
    layout: BatchLayout
    steps: int
    # The adapter's tensors DeepSpeed ZeRO-3 partitioned: gathered whole around the variant's hook.
    partitioned: list[torch.Tensor] = field(default_factory=list)
    # Adapter dropout keys each row by (this, step, example index): its masks follow the example,
    # whatever the layout (lorafam.adapters.dropout). A pass has its own.
    dropout_seed: int = 0
    # Each training row's tokens, for BatchLayout.micro_batches to group rows of like length.
    lengths: Sequence[int] | None = None

    def batches(self, step: int) -> list[tuple[dict[str, torch.Tensor], int, list[int]]]:
        """This process's micro-batches of ``step``, collated and on the device, each with its
        number of real (unpadded) tokens and its rows' dropout keys. A process left without
        examples (data smaller than one global batch) still takes part in the step's gradient
        synchronisation, with one example that counts for nothing (tokens -1)."""
        seed, rank = self.recipe.train.seed, self.engine.process_index
        indices = self.layout.micro_batches(len(self.data.train), seed, step, rank, self.lengths)
        placeholder = not indices
        if placeholder:
            indices = [self.layout.micro_batches(len(self.data.train), seed, step, 0, self.lengths)[0][:1]]
        device = self.engine.device
        out = []
        for idx in indices:
            rows = [self.data.train[i] for i in idx]
            tokens = -1 if placeholder else sum(self.task.row_tokens(r) for r in rows)
            keys = self.task.row_keys([mix(self.dropout_seed, step, i) for i in idx])
            out.append(({k: v.to(device) for k, v in self.collate(rows).items()}, tokens, keys))
        return out


def set_up(
    recipe: Recipe, model: torch.nn.Module, variant: Variant, tokenizer: Any, data: PreparedData,
    this: Pass, steps: int | None, engine: Engine, console: Console,
) -> Session:
    cfg = recipe.train
    task = recipe.task
    layout = dataclasses.replace(layout_of(recipe, engine.num_processes), partial_last=this.partial_last)
    engine.check(recipe, variant, checkpoints_wanted=this.wants_checkpoints(recipe))
    if steps is None:  # a preparatory pass without a step count makes one pass over its data
        steps = this.steps(recipe, len(data.train), layout.processes)
    # bitsandbytes would repack 4-bit weights for CPU inference on the first eval pass, after which
    # backward passes no gradient through them (lorafam.quant.keep_training_layout). A no-op walk
    # over the modules when the base is not quantized.
    keep_training_layout(model)
    if recipe.data.packing:  # examples of a packed row must not see each other: check this model
        check_packing_support(model)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with a frozen embedding (no need to force input grads).
        # transformers renamed the switch (the old name warns from 5.x on); older 5.x have only that.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        compile_blocks(model)
    optimizer = make_optimizer(variant.param_groups(cfg.lr, cfg.weight_decay), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps, warmup=this.warmup(recipe, steps))
    # The loss module probes the model in fp32 (lorafam.tasks.causal_lm): before any weight is held.
    loss_module = task.loss_module(model)
    engine.hold_frozen_weights(model, variant, recipe, this.folder.path if this.folder else None)  # until engine.free
    this.announce(console, engine)
    loss_model, optimizer = engine.prepare(loss_module, optimizer, recipe, layout)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Session(
        recipe, task, engine, loss_model, model, variant, optimizer, scheduler, trainable, data,
        task.collator(tokenizer), layout, steps,
        [t for t in variant.live_tensors().values() if is_partitioned(t)], mix(cfg.seed, this.name),
        [task.row_tokens(row) for row in data.train] if layout.grad_accum > 1 else None,
    )


# --------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepOutcome:
    loss: float  # mean over the step's label units, all processes
    extras: dict[str, float]  # the variant's loss terms
    hook_logs: dict[str, float]  # what the variant's after_step returned
    tokens: int  # input tokens processed by all processes
    nonfinite: str | None  # why the step was not taken, if it was not


def optimizer_step(s: Session, step: int, skip_nonfinite: bool) -> StepOutcome:
    """Micro-batches (forward, backward), clip, optimizer step, the variant's hook, lr schedule.

    With a non-finite loss or gradient the optimizer step is not taken; ``skip_nonfinite`` says
    whether the loop goes on (then the schedules still advance) or stops, leaving the state as it
    was before this step.
    """
    engine, task = s.engine, s.task
    micro_batches = s.batches(step)
    # Count first: each micro-batch's backward must already know the whole step's denominator.
    local_units = sum(task.label_count(b) for b, tokens, _ in micro_batches if tokens >= 0)
    total_units = float(all_reduce_sum(torch.tensor(float(local_units), dtype=torch.float64)))
    # Every process's gradients are averaged by data parallelism, hence the process count.
    weight = engine.num_processes / total_units if total_units > 0 else 0.0

    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for i, (batch, batch_tokens, keys) in enumerate(micro_batches):
        counts = batch_tokens >= 0
        last = i == len(micro_batches) - 1
        # Forward and backward under the rows' keys: a recomputation in backward draws the same masks.
        with engine.micro_batch(s.loss_model, last), engine.autocast(), keyed(keys, s.recipe.data.max_length):
            out = s.loss_model(**batch)
            objective = out["loss_sum"] * (weight if counts else 0.0)
            if counts:
                loss_sum += out["loss_sum"].detach().double().cpu()
                tokens += batch_tokens
            if last:
                # The variant's terms belong to the step, not to each micro-batch.
                extras = s.variant.extra_losses()
                objective = objective + sum(extras.values()) if extras else objective
                # The step's loss is complete before its last backward pass (under DeepSpeed, that
                # pass also takes the optimizer step): a non-finite one stops the run untouched.
                totals = all_reduce_sum(torch.tensor([float(loss_sum), float(tokens)], dtype=torch.float64))
                loss = float(totals[0]) / total_units if total_units > 0 else 0.0
                extras_logged = {name: float(value.detach()) for name, value in extras.items()}
                nonfinite = nonfinite_reason(loss, extras_logged, None)
                if nonfinite and not skip_nonfinite:
                    return StepOutcome(loss, extras_logged, {}, int(totals[1]), nonfinite)
                if nonfinite:
                    objective = engine.poison(objective)
            engine.backward(objective)

    nonfinite = engine.step(s.optimizer, s.loss_model, s.trainable, s.recipe.train.max_grad_norm, nonfinite)
    if nonfinite and not skip_nonfinite:
        return StepOutcome(loss, extras_logged, {}, int(totals[1]), nonfinite)
    # Skipped or not, the schedules advance by a step.
    with gathered(s.partitioned):  # ZeRO-3: the hook sees whole tensors (read-only)
        hook_logs = s.variant.after_step(step, s.steps)  # it may read the gradients: zero them after
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, extras_logged, hook_logs, int(totals[1]), nonfinite)


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


# --------------------------------------------------------------------------------------------------
# The loop


def train(
    recipe: Recipe,
    model: torch.nn.Module,
    variant: Variant,
    tokenizer: Any,
    data: PreparedData,
    folder: RunFolder | Path,
    console: Console,
    phase: str = "main",
    steps: int | None = None,
    resume: Checkpoint | None = None,
    precision: Precision | None = None,
    on_row: Any = None,
) -> TrainResult:
    """Train ``variant``'s parameters on ``data.train``: set up a pass, run the loop, free the engine.

    ``phase`` other than "main" is a variant's preparatory pass (see Variant.prepare): same loop,
    its own step count (None: one pass over the data), no eval or samples, its checkpoints under
    prepare/<phase>/, metrics rows tagged with the phase. ``resume`` continues from a checkpoint of this run
    (lorafam.checkpoint.find_latest_checkpoint). ``on_row`` gets every metrics row too (experiment
    trackers). Every process runs this function; only the main one writes ``folder``.
    Raises TrainingInterrupted on SIGINT/SIGTERM and TrainingDiverged on a non-finite loss.
    """
    engine = Engine.create(precision or choose_precision(recipe.train.mixed_precision), variant.leaves_parameters_unused)
    if not isinstance(folder, RunFolder):
        folder = RunFolder(Path(folder), writes=engine.is_main_process)
    this = MainPass(folder, tokenizer, resume) if phase == "main" else Pass(phase, folder.phase(phase), resume)
    torch.manual_seed(recipe.train.seed)
    try:
        s = set_up(recipe, model, variant, tokenizer, data, this, steps, engine, console)
        return fit(s, this, folder, console, on_row)
    finally:
        engine.free()  # the next pass prepares anew


def fit(s: Session, this: Pass, folder: RunFolder, console: Console, on_row: Any = None) -> TrainResult:
    """The loop: for each step, the optimizer step, then log, eval, checkpoint; eval after."""
    cfg, steps = s.recipe.train, s.steps
    result, first_step = this.begin(s, console)  # eval and sample before, or the resumed state
    s.loss_model.train()  # (draws nothing from the RNG that begin may have restored)
    progress = make_progress(console, steps)
    task_id = progress.add_task("train", total=steps, completed=first_step - 1, loss=float("nan"), lr=cfg.lr, tps=0.0)
    start, window_tokens, window_steps, window_start = time.perf_counter(), 0, 0, time.perf_counter()
    with folder.metrics(on_row, this.keeps_row) as metrics, progress, this.stop_requests():
        for step in range(first_step, steps + 1):
            outcome = optimizer_step(s, step, skip_nonfinite=cfg.on_nan == "skip")
            if outcome.nonfinite and cfg.on_nan == "stop":
                where = f"last good checkpoint: {this.last_checkpoint}" if this.last_checkpoint else (
                    "no checkpoint was written yet" + ("" if cfg.save_every else " (train.save_every is not set)")
                )
                raise TrainingDiverged(
                    f"{outcome.nonfinite} at step {step}/{steps}; stopped before the optimizer step (train.on_nan: stop); "
                    f"{where}; lower train.lr, check the data, or set train.on_nan: skip",
                    step, this.last_checkpoint,
                )
            if outcome.nonfinite:
                result.skipped_steps += 1
                console.print(f"step {step}: {outcome.nonfinite}; optimizer step skipped (train.on_nan: skip)", soft_wrap=True)
            else:
                result.final_train_loss = outcome.loss

            # --- log
            window_tokens, window_steps = window_tokens + outcome.tokens, window_steps + 1
            lr = s.optimizer.param_groups[0]["lr"]
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
            progress.update(task_id, advance=1, loss=outcome.loss, lr=lr, tps=tokens_per_s)
            if step % cfg.log_every == 0 or step == steps or outcome.nonfinite:
                row = {"step": step, "loss": None if outcome.nonfinite else outcome.loss, "lr": lr,
                       "tokens_per_s": tokens_per_s, "step_seconds": elapsed / window_steps}
                row |= {"skipped": True} if outcome.nonfinite else {}
                row = this.row(row) | outcome.extras | outcome.hook_logs
                metrics.write(row)
                result.history.append(row)
                if not console.is_terminal:
                    console.print(f"{this.line_prefix}step {step}/{steps}  loss {outcome.loss:.4f}  lr {lr:.3g}  tok/s {tokens_per_s:.0f}")
                window_tokens, window_steps, window_start = 0, 0, time.perf_counter()

            # --- eval, checkpoint, signals
            if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                evaluated = this.evaluate(s)
                if evaluated:
                    metrics.write({"step": step} | {f"eval_{k}": v for k, v in evaluated.items()})
                    console.print(f"step {step} eval: {s.task.format_metrics(evaluated)}")
            this.after_step(s, step, result)

        result.eval_after = this.evaluate(s)
        if result.eval_after:
            metrics.write({"step": steps} | {f"eval_{k}": v for k, v in result.eval_after.items()})
            console.print(f"eval after:  {s.task.format_metrics(result.eval_after)}")
    result.sample_after = this.sample(s)
    if result.sample_after is not None:
        console.print(f"sample after: {result.sample_after!r}")
    result.seconds = time.perf_counter() - start
    return result


def eval_autocast(s: Session) -> Any:
    """Eval runs in fp32 unless the recipe asks for the training precision (``train.eval_precision``):
    a bf16 eval moves the loss by as much as the gap between some variants."""
    return s.engine.accelerator.autocast if s.recipe.train.eval_precision == "train" else nullcontext


# --------------------------------------------------------------------------------------------------
# Progress


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
