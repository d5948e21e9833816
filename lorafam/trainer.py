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

What differs between the main run and a variant's preparatory phase (LoRA-drop's probe run) is
``Phase``: the main run evaluates, samples, checkpoints and answers signals; a phase does none of it.

Surviving interruptions: a checkpoint holds everything the next step depends on (adapter, variant
state, optimizer, scheduler, RNG states), so a resumed run takes the same steps an uninterrupted
one would. SIGINT/SIGTERM stop at the end of the current step with a checkpoint; a non-finite loss
stops the run (or skips the step, ``train.on_nan: skip``) instead of training on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorafam.adapters import Variant
from lorafam.adapters.dropout import keyed, mix
from lorafam.checkpoint import Checkpoint, checkpoint_name, load_checkpoint, restore_rng, save_checkpoint
from lorafam.data import PreparedData, check_packing_support, make_collator
from lorafam.distributed import all_reduce_max, all_reduce_sum, gathered, is_partitioned
from lorafam.errors import LorafamError
from lorafam.evaluate import evaluate, generate_sample
from lorafam.hardware import Precision, check_process_count, choose_precision, process_group
from lorafam.optim import make_optimizer, make_scheduler
from lorafam.quant import keep_training_layout
from lorafam.recipe import Recipe
from lorafam.run import METRICS, write_text
from lorafam.tasks import Task, get_task


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

    def micro_batches(self, n_examples: int, seed: int, step: int, rank: int) -> list[list[int]]:
        """Example indices of this process's micro-batches in optimizer step ``step`` (1-based)."""
        epoch, index = divmod(step - 1, self.steps_per_epoch(n_examples))
        order = _permutation(n_examples, seed + epoch)
        step_examples = order[index * self.global_batch : (index + 1) * self.global_batch]
        per_process = self.batch_size * self.grad_accum
        mine = step_examples[rank * per_process : (rank + 1) * per_process]
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


def phase_steps(recipe: Recipe, n_examples: int, processes: int = 1) -> int:
    """One pass over ``n_examples`` in global batches."""
    return max(1, math.ceil(n_examples / layout_of(recipe, processes).global_batch))


# --------------------------------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class Phase:
    """The main run, or a variant's preparatory run (``name`` tags its metrics rows)."""

    name: str = "main"

    @property
    def is_main(self) -> bool:
        return self.name == "main"


def make_accelerator(precision: Precision) -> Accelerator:
    """The Accelerator for one training phase, on the CPU when there is no accelerator."""
    from accelerate.utils import InitProcessGroupKwargs

    from accelerate.state import AcceleratorState

    cpu, backend = process_group()
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else None
    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # precision: a second run in the same process (the Python API, a notebook) starts its own. The
    # process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=cpu, kwargs_handlers=handlers)
    check_process_count(accelerator.num_processes)
    return accelerator


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


def uses_deepspeed(accelerator: Accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP and DeepSpeed ZeRO-3, where no process holds whole parameters."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def sharded_state(accelerator: Accelerator) -> str | None:
    """What of the training state no single process holds whole, or None (one process, DDP).

    DeepSpeed partitions the optimizer state at ZeRO-1, also the gradients at ZeRO-2 (a process's
    ``p.grad`` is gone after the backward pass), also the parameters at ZeRO-3.
    """
    if shards_parameters(accelerator):
        return "parameters"
    if not uses_deepspeed(accelerator):
        return None
    return "gradients and optimizer state" if accelerator.state.deepspeed_plugin.zero_stage == 2 else "optimizer state"


def engine_name(accelerator: Accelerator) -> str:
    """How the processes share the work: 'single process', 'DDP (gloo)', 'FSDP2', 'DeepSpeed ZeRO-2'."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return f"FSDP{2 if accelerator.is_fsdp2 else 1}"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.num_processes == 1:
        return "single process"
    backend = accelerator.state.backend or "?"
    return f"DDP ({backend})"


@dataclass
class Session:
    """Everything one optimizer step needs, built once by ``set_up``."""

    recipe: Recipe
    task: Task
    accelerator: Accelerator
    loss_model: torch.nn.Module  # the task's loss module around the model, as Accelerate prepared it
    model: torch.nn.Module  # the transformers model itself (generation, saving)
    variant: Variant
    optimizer: Any
    scheduler: Any
    trainable: list[torch.nn.Parameter]
    data: PreparedData
    collate: Any
    layout: BatchLayout
    steps: int
    # DeepSpeed takes the optimizer step itself, inside the step's last backward pass.
    deepspeed: bool = False
    # The adapter's tensors DeepSpeed ZeRO-3 partitioned: gathered whole around the variant's hook.
    partitioned: list[torch.Tensor] = field(default_factory=list)
    # Adapter dropout keys each row by (this, step, example index): its masks follow the example,
    # whatever the layout (lorafam.adapters.dropout). A phase has its own.
    dropout_seed: int = 0

    def batches(self, step: int) -> list[tuple[dict[str, torch.Tensor], int, list[int]]]:
        """This process's micro-batches of ``step``, collated and on the device, each with its
        number of real (unpadded) tokens and its rows' dropout keys. A process left without
        examples (data smaller than one global batch) still takes part in the step's gradient
        synchronisation, with one example that counts for nothing (tokens -1)."""
        seed, rank = self.recipe.train.seed, self.accelerator.process_index
        indices = self.layout.micro_batches(len(self.data.train), seed, step, rank)
        placeholder = not indices
        if placeholder:
            indices = [self.layout.micro_batches(len(self.data.train), seed, step, 0)[0][:1]]
        device = self.accelerator.device
        out = []
        for idx in indices:
            rows = [self.data.train[i] for i in idx]
            tokens = -1 if placeholder else sum(len(r["input_ids"]) for r in rows)
            keys = [mix(self.dropout_seed, step, i) for i in idx]
            out.append(({k: v.to(device) for k, v in self.collate(rows).items()}, tokens, keys))
        return out


def set_up(
    recipe: Recipe, model: torch.nn.Module, variant: Variant, tokenizer: Any, data: PreparedData,
    phase: Phase, steps: int | None, accelerator: Accelerator, console: Console,
) -> Session:
    cfg = recipe.train
    task = get_task(recipe.model.task)
    layout = layout_of(recipe, accelerator.num_processes)
    if not phase.is_main:
        layout = dataclasses.replace(layout, partial_last=True)
    sharded = sharded_state(accelerator)
    if sharded and not variant.supports_sharding:
        raise LorafamError(
            f"adapter.variant: {variant.name} cannot train with sharded {sharded} ({engine_name(accelerator)}): "
            f"{variant.sharding_reason}; launch it with data parallelism (configs/ddp.yaml) instead"
        )
    deepspeed = uses_deepspeed(accelerator)
    if deepspeed and phase.is_main and cfg.save_every:
        raise LorafamError(
            f"train.save_every: lorafam writes no checkpoints under DeepSpeed ({engine_name(accelerator)}), whose "
            "optimizer state is partitioned across the processes; unset it (a run then cannot be resumed), or "
            "launch with configs/ddp.yaml or configs/fsdp2.yaml, which checkpoint and resume"
        )
    if steps is None:  # a preparatory phase without a step count makes one pass over its data
        n = len(data.train)
        steps = total_steps(recipe, n, layout.processes) if phase.is_main else phase_steps(recipe, n, layout.processes)
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
    # A short preparatory phase gets a warmup in proportion, or its first steps would run at lr ~0.
    warmup = None if phase.is_main else min(cfg.warmup_steps, steps // 10)
    scheduler = make_scheduler(optimizer, cfg, steps, warmup=warmup)
    if phase.is_main:
        console.print(f"engine: {engine_name(accelerator)} on {accelerator.num_processes} process(es)", soft_wrap=True)
    # The scheduler stays outside Accelerate: prepared, it would step once per process per
    # optimizer step (it assumes each process's data loader is a shard of one epoch), silently
    # shortening the schedule under several processes.
    if deepspeed:
        configure_deepspeed(accelerator, recipe, layout)
    loss_model, optimizer = accelerator.prepare(task.loss_module(model), optimizer)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return Session(
        recipe, task, accelerator, loss_model, model, variant, optimizer, scheduler, trainable, data,
        make_collator(tokenizer, recipe.model.task), layout, steps, deepspeed,
        [t for t in variant.live_tensors().values() if is_partitioned(t)], mix(cfg.seed, phase.name),
    )


def configure_deepspeed(accelerator: Accelerator, recipe: Recipe, layout: BatchLayout) -> None:
    """Make DeepSpeed's config say what the recipe says, before Accelerate hands it to DeepSpeed.

    The step layout and the clipping are the recipe's: DeepSpeed checks train_batch_size = micro
    batch x accumulation x processes, and clips inside its own optimizer step. A launch config that
    sets one of them to another value is refused rather than silently overruled. The optimizer and
    the lr schedule are the recipe's too, so a DeepSpeed config must not bring its own.
    """
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise LorafamError(
                f"the DeepSpeed config has a {section!r} section, but lorafam builds the optimizer and lr "
                "schedule from the recipe's train: keys; remove that section from the DeepSpeed config"
            )
    wanted = {
        "train_micro_batch_size_per_gpu": (layout.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (layout.grad_accum, "train.grad_accum"),
        "train_batch_size": (layout.global_batch, "global batch (batch_size x grad_accum x processes)"),
        "gradient_clipping": (recipe.train.max_grad_norm or 0.0, "train.max_grad_norm"),
    }
    # What the launch asked for: the plugin's own fields keep it (lorafam only writes the config
    # dict); the batch sizes can only come from a DeepSpeed config file.
    launched = {"gradient_accumulation_steps": plugin.gradient_accumulation_steps, "gradient_clipping": plugin.gradient_clipping}
    for key, (value, source) in wanted.items():
        given = launched.get(key, config.get(key, "auto"))
        if given not in ("auto", None) and float(given) != float(value):
            raise LorafamError(
                f"the DeepSpeed config sets {key}: {given}, but the recipe's {source} is {value}; lorafam lays "
                f"out each step from the recipe: remove {key} from the DeepSpeed config (or set it to auto)"
            )
        config[key] = value


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
    was before this step. Under DeepSpeed the engine clips and steps inside the last backward pass
    (see ``deepspeed_step``); the outcome is the same.
    """
    accelerator, task = s.accelerator, s.task
    micro_batches = s.batches(step)
    # Count first: each micro-batch's backward must already know the whole step's denominator.
    local_units = sum(task.label_count(b) for b, tokens, _ in micro_batches if tokens >= 0)
    total_units = float(all_reduce_sum(torch.tensor(float(local_units), dtype=torch.float64)))
    # Every process's gradients are averaged by data parallelism, hence the process count.
    weight = accelerator.num_processes / total_units if total_units > 0 else 0.0

    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for i, (batch, batch_tokens, keys) in enumerate(micro_batches):
        counts = batch_tokens >= 0
        last = i == len(micro_batches) - 1
        # Forward and backward under the rows' keys: a recomputation in backward draws the same masks.
        with gradient_sync(s, last), accelerator.autocast(), keyed(keys, s.recipe.data.max_length):
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
                if nonfinite and s.deepspeed:
                    # DeepSpeed discards a step whose gradients are not finite, with everything its
                    # engine accumulated over the step's micro-batches; that is the only way to
                    # drop them, so this step's gradients are made NaN on purpose.
                    objective = objective * float("nan")
            if s.deepspeed:  # the step's loss is already normalised: the engine must not divide again
                accelerator.backward(objective, scale_wrt_gas=False)
            else:
                accelerator.backward(objective)

    if s.deepspeed:
        nonfinite = deepspeed_step(s, nonfinite)
    else:
        grad_norm = None
        if s.recipe.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(s.trainable, s.recipe.train.max_grad_norm)
        nonfinite = nonfinite or nonfinite_reason(loss, extras_logged, grad_norm)
        if nonfinite:  # no update from this batch (and no gradients for the hook to read)
            s.optimizer.zero_grad(set_to_none=True)
        else:
            s.optimizer.step()
    if nonfinite and not skip_nonfinite:
        return StepOutcome(loss, extras_logged, {}, int(totals[1]), nonfinite)
    # Skipped or not, the schedules advance by a step.
    with gathered(s.partitioned):  # ZeRO-3: the hook sees whole tensors (read-only)
        hook_logs = s.variant.after_step(step, s.steps)  # it may read the gradients: zero them after
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, extras_logged, hook_logs, int(totals[1]), nonfinite)


@contextmanager
def gradient_sync(s: Session, last: bool) -> Iterator[None]:
    """Gradients are synchronised across processes on the step's last micro-batch only.

    DDP and FSDP skip the synchronisation inside ``no_sync``. DeepSpeed reads Accelerate's
    ``sync_gradients`` flag instead, which also marks where its optimizer step falls: left True, the
    engine would step after every micro-batch.
    """
    s.accelerator.sync_gradients = last
    try:
        with nullcontext() if last else s.accelerator.no_sync(s.loss_model):
            yield
    finally:
        s.accelerator.sync_gradients = True  # Accelerate's flag is shared by every later phase and run


def deepspeed_step(s: Session, nonfinite: str | None) -> str | None:
    """What became of the optimizer step DeepSpeed took inside the last backward pass: None when it
    was applied, else why it was not.

    The engine clips to its gradient_clipping (the recipe's max_grad_norm, see configure_deepspeed)
    and discards a step whose gradient norm is not finite, with the gradients it accumulated.
    """
    discarded = s.optimizer.step_was_skipped
    grad_norm = s.loss_model.get_global_grad_norm()
    applied_anyway = not discarded and (nonfinite or (grad_norm is not None and not math.isfinite(float(grad_norm))))
    if applied_anyway:  # DeepSpeed configured not to check (bf16.check_grad_overflow: false)
        raise LorafamError(
            f"{nonfinite or f'gradient norm is {grad_norm}'} at a DeepSpeed step that was applied anyway, so the "
            "adapter is no longer usable; do not set bf16.check_grad_overflow: false in the DeepSpeed config"
        )
    if nonfinite:  # a non-finite loss under train.on_nan: skip, its gradients made NaN on purpose
        return nonfinite
    return f"gradient norm is {grad_norm} (DeepSpeed discarded this step's gradients)" if discarded else None


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
    run_dir: Path,
    console: Console,
    phase: str = "main",
    steps: int | None = None,
    resume: Checkpoint | None = None,
    precision: Precision | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``variant``'s parameters on ``data.train``.

    ``phase`` other than "main" is a variant's preparatory run (see Variant.prepare): same loop,
    its own step count, no eval, samples or checkpoints, metrics rows tagged with the phase.
    ``resume`` continues from a checkpoint (lorafam.checkpoint.find_latest_checkpoint) of this run.
    ``on_row`` gets every metrics.jsonl row too (experiment trackers).
    Only the main process writes files; every process runs this function.
    Raises TrainingInterrupted on SIGINT/SIGTERM and TrainingDiverged on a non-finite loss.
    """
    cfg = recipe.train
    this = Phase(phase)
    accelerator = make_accelerator(precision or choose_precision(cfg.mixed_precision))
    torch.manual_seed(cfg.seed)
    try:
        s = set_up(recipe, model, variant, tokenizer, data, this, steps, accelerator, console)
        return _loop(s, this, tokenizer, run_dir, console, resume, on_row)
    finally:
        accelerator.free_memory()  # drop Accelerate's references: the next phase prepares anew


def _loop(
    s: Session, phase: Phase, tokenizer: Any, run_dir: Path, console: Console, resume: Checkpoint | None,
    on_row: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    cfg, accelerator, steps = s.recipe.train, s.accelerator, s.steps
    writes = accelerator.is_main_process  # a preparatory phase logs its rows too, tagged with its name
    first_step, last_checkpoint = 1, None
    if resume is not None:
        if s.deepspeed:
            raise LorafamError(
                "--resume: lorafam writes no checkpoints under DeepSpeed, so it resumes none; start the run "
                "over (--overwrite), or resume it where it was written (configs/ddp.yaml, configs/fsdp2.yaml)"
            )
        if resume.state.get("total_steps") != steps or resume.state.get("processes", 1) != accelerator.num_processes:
            raise LorafamError(
                f"checkpoint {resume.path} was written for {resume.state.get('total_steps')} steps on "
                f"{resume.state.get('processes', 1)} process(es); this run has {steps} on {accelerator.num_processes}"
            )
        load_checkpoint(resume, s.variant, s.optimizer, s.scheduler, model=s.loss_model)
        first_step, last_checkpoint = resume.step + 1, resume.path

    def run_eval() -> dict[str, float] | None:
        if s.data.eval is None or not phase.is_main:
            return None
        return evaluate(
            s.loss_model, s.task, s.data.eval, s.collate, cfg.eval_batch_size or cfg.batch_size,
            cfg.eval_max_batches, eval_autocast(s), accelerator.process_index, accelerator.num_processes,
        )

    def sample() -> str | None:
        if not s.task.generates or not cfg.sample_prompt or not phase.is_main:
            return None
        with accelerator.autocast():
            return generate_sample(s.model, tokenizer, cfg.sample_prompt, cfg.sample_max_new_tokens)

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
            "global_batch": s.layout.global_batch,
            "eval_before": result.eval_before,
            "sample_before": result.sample_before,
            "final_train_loss": result.final_train_loss,
            "skipped_steps": result.skipped_steps,
        }
        return save_checkpoint(run_dir, step, s.variant, s.optimizer, s.scheduler, state, cfg.keep_last,
                               model=s.loss_model, writes=accelerator.is_main_process)

    if writes and phase.is_main:  # rows past the checkpoint were logged by steps the resumed run takes again
        truncate_metrics(run_dir / METRICS, resume.step if resume is not None else 0)
    progress = make_progress(console, steps)
    task_id = progress.add_task("train", total=steps, completed=first_step - 1, loss=float("nan"), lr=cfg.lr, tps=0.0)
    start, window_tokens, window_steps, window_start = time.perf_counter(), 0, 0, time.perf_counter()
    s.loss_model.train()
    if resume is not None:
        restore_rng(resume)  # last, so nothing between here and the first step draws from it
    with metrics_log(run_dir / METRICS, writes, on_row) as metrics, progress, (StopRequests() if phase.is_main else nullcontext()) as stop:
        for step in range(first_step, steps + 1):
            outcome = optimizer_step(s, step, skip_nonfinite=cfg.on_nan == "skip")
            if outcome.nonfinite and cfg.on_nan == "stop":
                where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else (
                    "no checkpoint was written yet" + ("" if cfg.save_every else " (train.save_every is not set)")
                )
                raise TrainingDiverged(
                    f"{outcome.nonfinite} at step {step}/{steps}; stopped before the optimizer step (train.on_nan: stop); "
                    f"{where}; lower train.lr, check the data, or set train.on_nan: skip",
                    step, last_checkpoint,
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
                row |= {} if phase.is_main else {"phase": phase.name}
                row |= outcome.extras | outcome.hook_logs
                metrics.write(row)
                result.history.append(row)
                if not console.is_terminal:
                    console.print(
                        f"{'' if phase.is_main else phase.name + ' '}step {step}/{steps}  loss {outcome.loss:.4f}  "
                        f"lr {lr:.3g}  tok/s {tokens_per_s:.0f}"
                    )
                window_tokens, window_steps, window_start = 0, 0, time.perf_counter()

            # --- eval and checkpoint
            if cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                evaluated = run_eval()
                if evaluated:
                    metrics.write({"step": step} | {f"eval_{k}": v for k, v in evaluated.items()})
                    console.print(f"step {step} eval: {format_metrics(evaluated)}")
            if phase.is_main and cfg.save_every and step % cfg.save_every == 0 and step != steps:
                last_checkpoint = checkpoint(step)
            signum = stop.agreed() if stop is not None else None
            if signum is not None:
                if not s.deepspeed and (last_checkpoint is None or last_checkpoint.name != checkpoint_name(step)):
                    last_checkpoint = checkpoint(step)
                raise TrainingInterrupted(signum, step, last_checkpoint)

        result.eval_after = run_eval()
        if result.eval_after:
            metrics.write({"step": steps} | {f"eval_{k}": v for k, v in result.eval_after.items()})
            console.print(f"eval after:  {format_metrics(result.eval_after)}")
    result.sample_after = sample()
    if result.sample_after is not None:
        console.print(f"sample after: {result.sample_after!r}")
    result.seconds = time.perf_counter() - start
    return result


def eval_autocast(s: Session) -> Any:
    """Eval runs in fp32 unless the recipe asks for the training precision (``train.eval_precision``):
    a bf16 eval moves the loss by as much as the gap between some variants."""
    return s.accelerator.autocast if s.recipe.train.eval_precision == "train" else nullcontext


# --------------------------------------------------------------------------------------------------
# Metrics file and progress


class _MetricsLog:
    def __init__(self, handle: Any, on_row: Callable[[dict[str, Any]], None] | None):
        self.handle = handle
        self.on_row = on_row

    def write(self, row: dict[str, Any]) -> None:
        if self.handle is not None:
            write_metrics(self.handle, row)
        if self.on_row is not None:
            self.on_row(row)


@contextmanager
def metrics_log(path: Path, writes: bool, on_row: Callable[[dict[str, Any]], None] | None = None) -> Iterator[_MetricsLog]:
    """metrics.jsonl opened for appending (closed on every path out), or no file where this
    process writes none; every row also goes to ``on_row``."""
    if not writes:
        yield _MetricsLog(None, on_row)
        return
    with path.open("a") as handle:
        yield _MetricsLog(handle, on_row)


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
