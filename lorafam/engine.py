"""The Engine: what differs between one process, DDP, FSDP2 and DeepSpeed, behind one small interface.

The training loop (lorafam.trainer) asks the engine to prepare the model and optimizer, to run a
micro-batch's backward pass (synchronising gradients on the step's last one only), and to take the
optimizer step or say why it was not taken. Only this module, the launch configs (configs/) and
the gathering helpers (lorafam.distributed) know which of these runs underneath.

Under DeepSpeed the engine takes the optimizer step itself, inside the step's last backward pass,
clips to its own ``gradient_clipping`` (set from the recipe) and discards a step whose gradient norm
is not finite; lorafam writes no checkpoints there (the optimizer state is partitioned).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from lorafam.errors import LorafamError
from lorafam.frozen_weights import HeldWeights, holdable_weights, own_the_rest, uncopied_frozen_weights
from lorafam.hardware import Precision, bound_kernel_caches, check_process_count, process_group

if TYPE_CHECKING:
    from lorafam.adapters import Variant
    from lorafam.recipe import Recipe
    from lorafam.trainer import BatchLayout


@dataclass
class Engine:
    """An Accelerator for one training phase, and what it means for a step."""

    accelerator: Accelerator
    # train.frozen_weights where it applies (set by ``prepare`` and ``hold_frozen_weights``):
    # recast: autocast keeps no copy of the frozen fp32 weights between forward and backward;
    # hold: they are held in the autocast dtype, their fp32 values here (lorafam.frozen_weights).
    uncopied_frozen_weights: bool = False
    held: HeldWeights | None = None

    @classmethod
    def create(cls, precision: Precision, unused_parameters: bool = False) -> "Engine":
        """The engine for one training phase, on the CPU when there is no accelerator.

        ``unused_parameters``: a step may leave some trainable parameters without a gradient (they
        keep none, as on one process), so DDP must look for them instead of waiting.
        """
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        bound_kernel_caches()  # the CLI did it at start; a caller of lorafam.api may not have
        cpu, backend = process_group()
        handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
        if unused_parameters:
            handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
        # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
        # precision: a second run in the same process (the Python API, a notebook) starts its own. The
        # process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=cpu, kwargs_handlers=handlers or None)
        check_process_count(accelerator.num_processes)
        return cls(accelerator)

    # ----------------------------------------------------------------------------------------------
    # What this engine is
    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def checkpoints(self) -> bool:
        """Whether lorafam can write (and so resume) checkpoints of this engine's runs."""
        return not self.deepspeed

    def shards_parameters(self) -> bool:
        """True under FSDP and DeepSpeed ZeRO-3, where no process holds whole parameters."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return True
        return self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def sharded_state(self) -> str | None:
        """What of the training state no single process holds whole, or None (one process, DDP).

        DeepSpeed partitions the optimizer state at ZeRO-1, also the gradients at ZeRO-2 (a process's
        ``p.grad`` is gone after the backward pass), also the parameters at ZeRO-3.
        """
        if self.shards_parameters():
            return "parameters"
        if not self.deepspeed:
            return None
        return "gradients and optimizer state" if self.accelerator.state.deepspeed_plugin.zero_stage == 2 else "optimizer state"

    @property
    def name(self) -> str:
        """How the processes share the work: 'single process', 'DDP (gloo)', 'FSDP2', 'DeepSpeed ZeRO-2'."""
        from accelerate.utils import DistributedType

        accelerator = self.accelerator
        if accelerator.distributed_type == DistributedType.FSDP:
            return f"FSDP{2 if accelerator.is_fsdp2 else 1}"
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        if accelerator.num_processes == 1:
            return "single process"
        return f"DDP ({accelerator.state.backend or '?'})"

    # ----------------------------------------------------------------------------------------------
    # Set-up
    def check(self, recipe: "Recipe", variant: "Variant", checkpoints_wanted: bool) -> None:
        """Refuse, before any work, what this engine cannot do for the recipe and variant."""
        sharded = self.sharded_state()
        if sharded and not variant.supports_sharding:
            raise LorafamError(
                f"adapter.variant: {variant.name} cannot train with sharded {sharded} ({self.name}): "
                f"{variant.sharding_reason}; launch it with data parallelism (configs/ddp.yaml) instead"
            )
        if checkpoints_wanted and not self.checkpoints:
            raise LorafamError(
                f"train.save_every: lorafam writes no checkpoints under DeepSpeed ({self.name}), whose "
                "optimizer state is partitioned across the processes; unset it (a run then cannot be resumed), or "
                "launch with configs/ddp.yaml or configs/fsdp2.yaml, which checkpoint and resume"
            )

    def check_resumable(self) -> None:
        if not self.checkpoints:
            raise LorafamError(
                "--resume: lorafam writes no checkpoints under DeepSpeed, so it resumes none; start the run "
                "over (--overwrite), or resume it where it was written (configs/ddp.yaml, configs/fsdp2.yaml)"
            )

    def prepare(self, loss_module: torch.nn.Module, optimizer: Any, recipe: "Recipe", layout: "BatchLayout") -> tuple[Any, Any]:
        """The loss module and optimizer wrapped for this engine.

        The scheduler stays outside Accelerate: prepared, it would step once per process per
        optimizer step (it assumes each process's data loader is a shard of one epoch), silently
        shortening the schedule under several processes.
        """
        if self.deepspeed:
            configure_deepspeed(self.accelerator, recipe, layout)
        # Where the recipe asks for it (train.frozen_weights: recast, memory for time), and not under
        # FSDP or DeepSpeed, which hold and cast the weights themselves, nor under torch.compile,
        # whose graphs would break at the function mode, nor with gradient checkpointing: its blocks
        # keep no copies anyway, and their recomputation in backward (outside the mode) must save
        # what the forward saved.
        cfg = recipe.train
        self.uncopied_frozen_weights = cfg.frozen_weights == "recast" and not (
            self.deepspeed or self.shards_parameters() or cfg.compile or cfg.gradient_checkpointing
        )
        return self.accelerator.prepare(loss_module, optimizer)

    def hold_frozen_weights(self, model: torch.nn.Module, variant: "Variant", recipe: "Recipe", folder: Path | None) -> int:
        """Under mixed precision and train.frozen_weights: hold (the default), hold the model's frozen
        linear weights in the autocast dtype until ``free`` (their fp32 values in a file in
        ``folder``); how many elements are held. Not under FSDP or DeepSpeed, which place the weights
        themselves."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.accelerator.mixed_precision)
        if dtype is None or recipe.train.frozen_weights != "hold" or self.deepspeed or self.shards_parameters():
            return 0
        params = holdable_weights(model, variant.weights_kept_as_loaded())
        if params:
            # On the run's disk (the nearest folder of its path that exists yet), not a tmpfs /tmp.
            near = next((f for f in [folder, *folder.parents] if f.is_dir()), None) if folder else None
            self.held = HeldWeights(params, dtype, near)
            own_the_rest(model, params)
        return self.held.numel if self.held else 0

    def exact_weights(self) -> AbstractContextManager[None]:
        """Inside: every weight as loaded (an fp32 eval), the held ones brought back from their file."""
        return self.held.originals() if self.held else nullcontext()

    def free(self) -> None:
        """Drop Accelerate's references and give back the held weights: the next phase prepares anew."""
        if self.held is not None:
            self.held.release()
            self.held = None
        self.accelerator.free_memory()

    # ----------------------------------------------------------------------------------------------
    # One optimizer step
    @contextmanager
    def autocast(self) -> Iterator[None]:
        """The run's mixed precision (the frozen weights recast in backward where the recipe asks)."""
        # Only when autocasting: the mode sees every torch call, which an fp32 run need not pay for.
        uncopied = self.uncopied_frozen_weights and self.accelerator.mixed_precision != "no"
        with self.accelerator.autocast(), uncopied_frozen_weights(self.device.type, uncopied):
            yield

    @contextmanager
    def micro_batch(self, loss_model: torch.nn.Module, last: bool) -> Iterator[None]:
        """Gradients are synchronised across processes on the step's last micro-batch only.

        DDP and FSDP skip the synchronisation inside ``no_sync``. DeepSpeed reads Accelerate's
        ``sync_gradients`` flag instead, which also marks where its optimizer step falls: left True, the
        engine would step after every micro-batch.
        """
        self.accelerator.sync_gradients = last
        try:
            with nullcontext() if last else self.accelerator.no_sync(loss_model):
                yield
        finally:
            self.accelerator.sync_gradients = True  # Accelerate's flag is shared by every later phase and run

    def poison(self, objective: torch.Tensor) -> torch.Tensor:
        """A step to drop whole (a non-finite loss under train.on_nan: skip): DeepSpeed discards a step
        whose gradients are not finite, with everything its engine accumulated over the step's
        micro-batches, and that is the only way to drop them, so they are made NaN on purpose.
        Elsewhere the step is simply not taken (``step``)."""
        return objective * float("nan") if self.deepspeed else objective

    def backward(self, objective: torch.Tensor) -> None:
        if self.deepspeed:  # the step's loss is already normalised: the engine must not divide again
            self.accelerator.backward(objective, scale_wrt_gas=False)
        else:
            self.accelerator.backward(objective)

    def step(self, optimizer: Any, loss_model: Any, trainable: list[torch.nn.Parameter], max_grad_norm: float | None,
             nonfinite: str | None) -> str | None:
        """Clip and take the optimizer step; None when it was applied, else why it was not.

        ``nonfinite`` says the step's loss already was not finite (the step is not taken).
        """
        if self.deepspeed:
            return self._deepspeed_step(optimizer, loss_model, nonfinite)
        grad_norm = None
        if max_grad_norm is not None:
            grad_norm = self.accelerator.clip_grad_norm_(trainable, max_grad_norm)
        nonfinite = nonfinite or (f"gradient norm is {float(grad_norm)}" if grad_norm is not None and not math.isfinite(float(grad_norm)) else None)
        if nonfinite:  # no update from this batch (and no gradients for the hook to read)
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        return nonfinite

    def _deepspeed_step(self, optimizer: Any, loss_model: Any, nonfinite: str | None) -> str | None:
        """What became of the optimizer step DeepSpeed took inside the last backward pass."""
        discarded = optimizer.step_was_skipped
        grad_norm = loss_model.get_global_grad_norm()
        applied_anyway = not discarded and (nonfinite or (grad_norm is not None and not math.isfinite(float(grad_norm))))
        if applied_anyway:  # DeepSpeed configured not to check (bf16.check_grad_overflow: false)
            raise LorafamError(
                f"{nonfinite or f'gradient norm is {grad_norm}'} at a DeepSpeed step that was applied anyway, so the "
                "adapter is no longer usable; do not set bf16.check_grad_overflow: false in the DeepSpeed config"
            )
        if nonfinite:  # a non-finite loss under train.on_nan: skip, its gradients made NaN on purpose
            return nonfinite
        return f"gradient norm is {grad_norm} (DeepSpeed discarded this step's gradients)" if discarded else None


def configure_deepspeed(accelerator: Accelerator, recipe: "Recipe", layout: "BatchLayout") -> None:
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
