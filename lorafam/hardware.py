"""What this machine runs well: the device, the process count, and the precision to train in.

``train.mixed_precision: auto`` (the default) picks bf16 autocast only where the hardware runs bf16
natively: a CUDA device that supports it, or a CPU with AMX or AVX512_BF16. Elsewhere bf16 is
emulated and slower than fp32 (measured on an AVX-512 CPU without AVX512_BF16: a LoRA step 2.9x
slower under bf16 autocast than in fp32), so auto picks fp32. fp16 is never picked automatically:
it needs loss scaling and only pays on GPUs without bf16; ask for it with ``fp16``.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafam.errors import LorafamError

#: CPU flags (Linux /proc/cpuinfo names) that mean native bf16 matrix arithmetic.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class Precision:
    """The autocast mode a run trains in and why: recorded in run.json, printed at start."""

    mixed_precision: str  # "no" | "bf16" | "fp16"
    requested: str | None
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        return {"mixed_precision": self.mixed_precision, "requested": self.requested, "reason": self.reason}


#: Bounds on oneDNN's shape-keyed caches (``bound_kernel_caches``): environment variables, so a
#: user's own setting wins. ideep's LRU cache of matmul computations (PyTorch issue 27971) and
#: oneDNN's cache of compiled primitives. 128 leaves room for the shapes of a few micro-batches (a
#: LoRA micro-batch needs ~30, counted by hand); at 2 every call rebuilds them, 2.7x slower.
KERNEL_CACHE_BOUNDS = {"LRU_CACHE_CAPACITY": "1", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}


def bound_kernel_caches() -> None:
    """Keep oneDNN's per-shape caches small, before the process's first bf16 matmul on the CPU.

    PyTorch runs bf16 matmuls on the CPU through oneDNN, which caches what it builds for each
    input shape: by default 1024 entries of ideep's (which keep the weights repacked for that
    shape) and 1024 compiled primitives. A run with dynamic padding meets a new sequence length
    nearly every micro-batch, so under bf16 the caches grew ~8 MB a step and took the quickstart's
    peak RSS above its fp32 peak (issue 23; an fp32 run's memory did not grow). With these bounds the
    resident memory stays flat from step to step (benchmarks/precision_memory.py). Both are read
    once, at their first use: set after that, they change nothing.
    """
    for name, value in KERNEL_CACHE_BOUNDS.items():
        os.environ.setdefault(name, value)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where they cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return None


def use_cpu() -> bool:
    """True when no accelerator is available, so Accelerate must be told to run on the CPU.

    Accelerate needs ``cpu=True`` to form a multi-process CPU group (gloo) under torchrun or
    ``accelerate launch --multi_gpu``; without it each process silently trains alone.
    """
    if torch.cuda.is_available():
        return False
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def launched_engine() -> str | None:
    """"fsdp" or "deepspeed" under an ``accelerate launch`` with such a config, else None.

    Read from what the launcher exports, so it is known before any Accelerator exists (the model is
    loaded first, and a 4-bit base must be loaded in a layout the engine can shard).
    """
    for engine in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{engine.upper()}", "false").lower() == "true":
            return engine
    return None


def process_group() -> tuple[bool, str | None]:
    """``(cpu, backend)`` for Accelerate's PartialState / Accelerator on this machine.

    Without an accelerator the processes need ``cpu=True`` to form a gloo group (see ``use_cpu``),
    except under DeepSpeed: Accelerate drops DeepSpeed when told ``cpu=True``, so its CPU processes
    ask for gloo by name instead (without it Accelerate sees one process and DeepSpeed two).
    """
    if not use_cpu():
        return False, None
    if launched_engine() == "deepspeed":
        return False, "gloo"
    return True, None


def join_processes() -> Any:
    """This process's place in the launch (Accelerate's PartialState): joins the process group under a
    multi-process launch; refuses a launch whose processes did not form one."""
    from accelerate import PartialState

    cpu, backend = process_group()
    state = PartialState(cpu=cpu, **({"backend": backend} if backend else {}))
    check_process_count(state.num_processes)
    return state


def choose_precision(requested: str | None) -> Precision:
    """Resolve ``train.mixed_precision``: explicit choices win; ``auto`` asks the hardware;
    ``None`` takes what ``accelerate launch`` was configured with."""
    if requested is None:
        launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        return Precision(launched, None, f"from accelerate launch's config ({launched})")
    if requested != "auto":
        return Precision(requested, requested, "set in the recipe")
    native, reason = native_bf16()
    return Precision("bf16" if native else "no", "auto", reason)


def native_bf16() -> tuple[bool, str]:
    """Whether this machine runs bf16 natively (not emulated), and why: the rule behind
    ``train.mixed_precision: auto`` and ``model.compute_dtype: auto``."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name()} runs bf16 natively"
        return False, "this GPU has no native bf16 (set fp16 to use loss-scaled fp16)"
    if not use_cpu():
        return False, "bf16 support of this accelerator is not known; fp32"
    flags = cpu_flags()
    if flags is None:
        return False, f"CPU features unknown on {platform.system()}; fp32"
    native = [f for f in NATIVE_BF16_CPU_FLAGS if f in flags]
    if native:
        return True, f"the CPU has {'/'.join(native)} (native bf16)"
    return False, "the CPU has no AMX or AVX512_BF16, so bf16 would be emulated (slower than fp32)"


def cpu_line() -> str:
    """The CPU facts a speed or memory figure depends on, for benchmark output: the vector and bf16
    flags, and whether bf16 is native here (``native_bf16``'s reason)."""
    flags = cpu_flags() or set()
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{shown} · bf16: {native_bf16()[1]}"


def check_process_count(num_processes: int) -> None:
    """Fail loudly where a launcher asked for several processes but this one trains alone.

    ``accelerate launch --cpu --num_processes N`` (or a config with ``use_cpu: true``) starts one
    process on a CPU-only machine: it sets MASTER_ADDR for the group it never forms.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and num_processes != world:
        raise LorafamError(
            f"the launcher started {world} processes but they did not form one group "
            f"({num_processes} process here); on a CPU-only machine launch with "
            "`accelerate launch --config_file configs/ddp.yaml` or torchrun"
        )
    if num_processes == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ and os.environ.get(
        "ACCELERATE_USE_CPU", ""
    ).lower() in ("1", "true", "yes"):
        raise LorafamError(
            "accelerate launch --cpu (use_cpu: true) starts a single process, whatever --num_processes "
            "says; for several CPU processes use `accelerate launch --config_file configs/ddp.yaml "
            "--num_processes N -m lorafam train RECIPE` (lorafam runs it on the CPU with gloo)"
        )
