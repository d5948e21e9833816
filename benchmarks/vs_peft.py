"""lorafam vs PEFT: step time and peak RSS for every variant both implement, side by side.

    python benchmarks/vs_peft.py                          # every variant, both shapes, minutes each on 2 cores
    python benchmarks/vs_peft.py --shapes 60m --variants lora dora vera   # the 58.5M Llama at 8 x 256 only
    python benchmarks/vs_peft.py --shapes custom --hidden 768 --layers 12 --batch 4 --length 512
    python benchmarks/vs_peft.py --precision bf16         # bf16 autocast on both sides
    python benchmarks/vs_peft.py --cli                    # lorafam side = `lorafam train` end to end
    python benchmarks/vs_peft.py --threads 1 --clock cpu  # steadier on a machine busy with other work

Each side of a comparison (lorafam's variant, PEFT's, the frozen-base floor) runs in its own
subprocess, so its peak RSS is its own. The processes stay up side by side and take turns on the
CPU, one command at a time, in rounds ordered A B B A (A B C C B A for more sides), so a change in
the machine's load hits every side alike; a side's step time is the median of its timed steps
after warm-up, and the spread is the min..max of the per-round ratios.

Two shapes by default, each its own table (``--shapes``): ``small``, a 19.5M-parameter Llama at
batch 4 x 128, and ``60m``, a 58.5M one at 8 x 256, where the output head is a third of the linear
work (the shape where lorafam's fp32 step was once 17% behind: issue 23). ``custom`` takes the
--hidden/--layers/--intermediate/--batch/--length flags. Every table is printed under the CPU's
flags (AVX-512, AVX512_BF16, AMX: whether bf16 is native), since the ratios differ between CPUs.

Both sides run the same plain loop on the same model (random Llama built from a config, saved to a
folder and loaded by each side as a user would), the same random token batches (labels = inputs,
no padding), AdamW at one lr, clipping at 1.0, adapters on every linear layer but the head:

* lorafam: ``lorafam.modeling.load_model`` + ``build_variant(config).apply(model)``, optimizer over
  ``variant.param_groups``, the loss through the causal-LM task's loss module (labelled positions
  only, the head in chunks) + ``variant.extra_losses()``, ``variant.after_step`` after the step
  (what lorafam's trainer calls);
* PEFT: ``from_pretrained`` + ``get_peft_model``; LoRA+ and LoRA-FA through PEFT's own optimizer
  factories (PEFT's LoRA-FA also preconditions B's gradient, which lorafam's does not: see
  lorafam/adapters/lora_fa.py), AdaLoRA with ``update_and_allocate`` each step; QLoRA with
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=False)``;
* floor: the frozen base's forward and backward alone, the gradient reaching every layer through
  one trainable scalar on the embeddings' output: what any adapter costs at least.

``--cli`` replaces the lorafam library side by `lorafam train` on a generated recipe (word-level
data that fills every row, so a row's tokens are known), timed from metrics.jsonl's tokens_per_s;
it keeps the recipe defaults lorafam ships (train.mixed_precision from recipes/quickstart.yaml
unless --precision is given, anything else through --cli-set), against PEFT's fp32 eager loop
(or --precision). Not a test: the numbers depend on the machine, printed with its CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: The lorafam checkout a side imports: this one, not whichever is installed; a child may be pointed
#: at another checkout (benchmarks/dora_speed.py --baseline-root) to time two versions side by side.
LORAFAM_ROOT = Path(os.environ.get("VS_PEFT_LORAFAM_ROOT", ROOT))
sys.path.insert(0, str(LORAFAM_ROOT))

#: Variants PEFT also implements, plus QLoRA (LoRA on an NF4 base): name -> lorafam adapter keys.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"variant": "lora"},
    "rslora": {"variant": "lora", "rslora": True},
    "dora": {"variant": "dora"},
    "vera": {"variant": "vera", "r": 256},  # the paper's (and both libraries') default rank
    "adalora": {"variant": "adalora"},
    "lora_plus": {"variant": "lora_plus", "lr_ratio": 16.0},
    "lora_fa": {"variant": "lora_fa"},
    "qlora": {"variant": "lora"},
}
QUANTIZED = {"qlora"}
PROTOCOL = "@@vs_peft "  # prefix of the lines a child answers with; anything else on stdout is noise


# --------------------------------------------------------------------------------------------------
# The machine


def cpu_facts() -> dict[str, Any]:
    """CPU model and the flags that decide whether bf16 is native (AVX512_BF16, AMX) or emulated."""
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted}, "native_bf16": native_bf16}


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "lorafam_commit": commit.stdout.strip() or "unknown", "python": platform.python_version()}


# --------------------------------------------------------------------------------------------------
# Model, tokenizer and data


def make_model_folder(folder: Path, args: argparse.Namespace) -> Path:
    """A random Llama from a config, saved with a word-level tokenizer over its whole vocabulary
    (token i is the word ``w{i}``), so generated text tokenizes to exactly one token per word."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), args.vocab)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(256, args.length), tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_batches(vocab: int, batch: int, length: int, count: int = 4) -> list[dict[str, Any]]:
    """The same ``count`` random batches for every side (full rows: no padding, labels = inputs)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def target_suffixes(model: Any) -> list[str]:
    """Every linear layer's name but the output head's: what lorafam's 'all-linear' adapts."""
    import torch

    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head})


# --------------------------------------------------------------------------------------------------
# One side, inside its own process


def build_lorafam(spec: dict[str, Any]):
    """lorafam's way: load through lorafam, inject the variant, optimizer over its param groups.
    Returns (model, optimizer, trainable params, after-step hook, extra-loss hook)."""
    import torch

    from lorafam.adapters import VARIANTS as REGISTRY
    from lorafam.adapters import build_variant
    from lorafam.modeling import load_model
    from lorafam.recipe import ModelConfig
    from lorafam.tasks import get_task

    name = spec["variant"]
    quantized = name in QUANTIZED
    model = load_model(ModelConfig(name=spec["model"], quantization="nf4" if quantized else None,
                                   compute_dtype=spec["compute_dtype"]))
    keys = {"r": spec["r"], "alpha": spec["alpha"], "target_modules": target_suffixes(model)} | VARIANTS[name]
    if keys["variant"] == "adalora":
        keys["init_r"] = keys.pop("r")
    config = REGISTRY[keys["variant"]].Config(**keys)
    variant = build_variant(config).apply(model)
    optimizer = torch.optim.AdamW(variant.param_groups(spec["lr"], 0.0))
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    class MeanLoss(torch.nn.Module):
        """model(**batch)'s interface over the trainer's loss module: the mean over the labelled positions."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = get_task("causal-lm").loss_module(model)

        def forward(self, labels: torch.Tensor, **inputs: Any) -> Any:
            out = self.inner(labels=labels, **inputs)
            return SimpleNamespace(loss=out["loss_sum"] / out["count"])

    return MeanLoss(), optimizer, trainable, lambda step: variant.after_step(step, spec["total_steps"]), variant.extra_losses


def build_peft(spec: dict[str, Any]):
    """PEFT's way, as its documentation shows it, with the same ranks, alpha and targets."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.optimizers import create_lorafa_optimizer, create_loraplus_optimizer
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    name, r, alpha, lr = spec["variant"], spec["r"], spec["alpha"], spec["lr"]
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if name in QUANTIZED:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, spec["compute_dtype"]),
        )
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kwargs)
    if name in QUANTIZED:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_suffixes(model)
    if name == "vera":
        config = VeraConfig(r=VARIANTS["vera"]["r"], target_modules=targets, projection_prng_key=0, d_initial=0.1)
    elif name == "adalora":
        config = AdaLoraConfig(init_r=r, target_r=max(1, round(r * 2 / 3)), lora_alpha=alpha, target_modules=targets,
                               tinit=0, tfinal=0, deltaT=1, total_step=spec["total_steps"])
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                            use_rslora=name == "rslora", use_dora=name == "dora")
    model = get_peft_model(model, config)
    if name == "lora_plus":
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0)
    elif name == "lora_fa":
        optimizer = create_lorafa_optimizer(model, r=r, lora_alpha=alpha, lr=lr)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    # AdaLoRA's orthogonality penalty is added inside PEFT's forward; its allocation is this call.
    after = (lambda step: model.base_model.update_and_allocate(step)) if name == "adalora" else (lambda step: None)
    return model, optimizer, trainable, after, lambda: {}


def build_floor(spec: dict[str, Any]):
    """The frozen base, trained through one scalar gain on the embeddings' output: forward and the
    full backward through every layer, no adapter arithmetic, next to no optimizer work."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.requires_grad_(False)
    gain = torch.nn.Parameter(torch.ones(()))
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: output * gain)
    optimizer = torch.optim.AdamW([gain], lr=spec["lr"])
    return model, optimizer, [gain], lambda step: None, lambda: {}


def child(spec: dict[str, Any]) -> None:
    """Build one side, warm it up, then run timed steps on command: one JSON line in, one out."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)  # as lorafam's CLI does; here for every side alike
    import peft  # noqa: F401  every side imports the same libraries, so their baselines match
    import lorafam.adapters  # noqa: F401

    build = {"lorafam": build_lorafam, "peft": build_peft, "floor": build_floor}[spec["side"]]
    torch.manual_seed(0)
    model, optimizer, trainable, after_step, extra_losses = build(spec)
    model.train()
    batches = token_batches(spec["vocab"], spec["batch"], spec["length"])
    precision = spec["precision"]
    step_no = 0

    def step() -> tuple[float, float, float]:
        """One optimizer step: (wall seconds, CPU seconds of this process, loss)."""
        nonlocal step_no
        step_no += 1
        batch = batches[step_no % len(batches)]
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
            extras = extra_losses()
            total = loss + sum(extras.values()) if extras else loss
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        after_step(step_no)
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        return time.perf_counter() - start, time.process_time() - cpu_start, value

    for _ in range(spec["warmup"]):
        step()
    trainable_count = sum(p.numel() for p in trainable)
    answer({"ready": True, "trainable": trainable_count, "lorafam": str(Path(lorafam.adapters.__file__).parent.parent)})
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "steps":
            results = [step() for _ in range(command["n"])]
            answer({"wall": [r[0] for r in results], "cpu": [r[1] for r in results], "loss": results[-1][2]})
        else:
            answer({"peak_rss": peak_rss_bytes()})
            return


def answer(message: dict[str, Any]) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def peak_rss_bytes() -> int:
    """The process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------
# The parent: start the sides, take turns, collect


def child_env(threads: int, root: Path = ROOT) -> dict[str, str]:
    return os.environ | {
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(root),
        "VS_PEFT_LORAFAM_ROOT": str(root),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
    }


class Side:
    """One running child process."""

    def __init__(self, label: str, spec: dict[str, Any], threads: int, clock: str = "wall"):
        self.label, self.clock, self.times, self.loss, self.peak_rss = label, clock, [], None, None
        # stderr to a file, not a pipe: a chatty library would fill an unread pipe and stall the child.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, env=child_env(threads, Path(spec.get("root", ROOT))),
        )
        ready = self.read()
        self.trainable, self.lorafam_path = ready["trainable"], ready["lorafam"]

    def read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        self.proc.wait()
        self.stderr.seek(0)
        sys.exit(f"{self.label} failed (exit {self.proc.returncode}):\n{self.stderr.read()[-4000:]}")

    def send(self, command: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def steps(self, n: int) -> float:
        reply = self.send({"cmd": "steps", "n": n})
        self.times.extend(reply[self.clock])
        self.loss = reply["loss"]
        return sum(reply[self.clock])

    def close(self) -> None:
        self.peak_rss = self.send({"cmd": "exit"})["peak_rss"]
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_group(specs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Start every side (one at a time, so none warms up while another is timed), then ``rounds``
    rounds of A B .. B A, ``steps`` steps per turn. Each side's ``round_s`` holds its seconds per
    round, for per-round ratios between sides."""
    sides: list[Side] = []
    try:
        for label, spec in specs.items():
            sides.append(Side(label, spec, args.threads, args.clock))
        round_s: dict[str, list[float]] = {s.label: [] for s in sides}
        for i in range(args.rounds):
            totals = {s.label: 0.0 for s in sides}
            for side in sides + sides[::-1]:
                totals[side.label] += side.steps(args.steps)
            for label, total in totals.items():
                round_s[label].append(total)
            per_step = ", ".join(f"{label} {total / (2 * args.steps):.3f}" for label, total in totals.items())
            print(f"  round {i + 1}/{args.rounds} s/step: {per_step}", flush=True)
        for side in sides:
            side.close()
    finally:
        for side in sides:
            side.kill()
    return {
        s.label: {"step_s": statistics.median(s.times), "steps": len(s.times), "round_s": round_s[s.label],
                  "loss": s.loss, "peak_rss": s.peak_rss, "trainable": s.trainable, "lorafam_path": s.lorafam_path}
        for s in sides
    }


def round_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """a's time over b's, round by round (both from one run_group)."""
    return [x / y for x, y in zip(a["round_s"], b["round_s"])]


def spec_for(side: str, variant: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "side": side, "variant": variant, "model": str(folder), "vocab": args.vocab, "batch": args.batch,
        "length": args.length, "r": args.r, "alpha": args.alpha or 2 * args.r, "lr": args.lr,
        "precision": args.precision or "fp32", "compute_dtype": compute_dtype(args),
        "threads": args.threads, "warmup": args.warmup,
        # AdaLoRA's schedule needs the run's length; never reached, so it allocates on every step.
        "total_steps": args.warmup + 2 * args.rounds * args.steps + 1000,
    }


def compute_dtype(args: argparse.Namespace) -> str:
    """NF4 layers compute in bf16 under --precision bf16, else in fp32 (both sides alike)."""
    return "bfloat16" if args.precision == "bf16" else "float32"


# --------------------------------------------------------------------------------------------------
# --cli: `lorafam train` end to end


def cli_child(recipe: str, sets: list[str]) -> None:
    """`lorafam train RECIPE` through the console script's own entry point, then this process's peak RSS."""
    from lorafam.cli import main as lorafam_main

    sys.argv = ["lorafam", "train", recipe, *(f"--set={s}" for s in sets)]
    try:
        lorafam_main()
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    answer({"peak_rss": peak_rss_bytes()})


def shipped_precision() -> str | None:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text()).get("train", {}).get("mixed_precision")


def run_cli(variant: str, folder: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One `lorafam train` of warmup + timed steps; step time from metrics.jsonl's tokens_per_s
    (every row is full: batch x length tokens per step)."""
    import yaml

    rows = (args.warmup + args.rounds * 2 * args.steps) * args.batch + 16
    rng = random.Random(0)
    data = work / f"{variant}-data.jsonl"
    with data.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(f"w{rng.randrange(3, args.vocab)}" for _ in range(args.length + 8))}) + "\n")
    adapter = {"r": args.r, "alpha": args.alpha or 2 * args.r, "dropout": 0.0, "target_modules": "all-linear"} | VARIANTS[variant]
    if adapter["variant"] == "adalora":
        adapter["init_r"] = adapter.pop("r")
    model = {"name": str(folder), "task": "causal-lm"}
    if variant in QUANTIZED:
        model |= {"quantization": "nf4", "compute_dtype": compute_dtype(args)}
    steps = args.warmup + args.rounds * 2 * args.steps
    train = {"max_steps": steps, "batch_size": args.batch, "lr": args.lr, "schedule": "constant", "optimizer": "adamw",
             "max_grad_norm": 1.0, "log_every": 1, "eval_max_batches": 1, "seed": 0}
    precision = {"fp32": "no", "bf16": "bf16"}[args.precision] if args.precision else shipped_precision()
    if precision is not None:
        train["mixed_precision"] = precision
    recipe = {"model": model, "adapter": adapter, "data": {"train": str(data), "format": "text", "max_length": args.length,
              "eval_split": 0.02}, "train": train, "output_dir": str(work / f"run-{variant}")}
    path = work / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.run([sys.executable, __file__, "--cli-child", str(path), *sum((["--cli-set", s] for s in args.cli_set), [])],
                          capture_output=True, text=True, env=child_env(args.threads))
    reply = [line for line in proc.stdout.splitlines() if line.startswith(PROTOCOL)]
    if proc.returncode != 0 or not reply:
        sys.exit(f"lorafam train ({variant}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
    metrics = [json.loads(line) for line in (work / f"run-{variant}" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [m for m in metrics if "tokens_per_s" in m and m.get("phase") is None and m["step"] > args.warmup]
    times = [m["step_seconds"] for m in train_rows]  # seconds per step over each logging window
    return {"step_s": statistics.median(times), "steps": len(times), "loss": train_rows[-1]["loss"],
            "peak_rss": json.loads(reply[-1][len(PROTOCOL):])["peak_rss"], "mixed_precision": precision or "(unset)"}


def cli_group(variant: str, folder: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """PEFT's loop brackets the CLI run (PEFT turns, CLI run, PEFT turns): a whole training run cannot
    take turns step by step, so this is A B A at the scale of runs."""
    peft = Side("peft", spec_for("peft", variant, folder, args), args.threads, args.clock)
    try:
        before = sum(peft.steps(args.steps) for _ in range(args.rounds))
        cli = run_cli(variant, folder, work, args)
        after = sum(peft.steps(args.steps) for _ in range(args.rounds))
        peft.close()
    finally:
        peft.kill()
    peft_result = {"step_s": statistics.median(peft.times), "steps": len(peft.times), "loss": peft.loss,
                   "peak_rss": peft.peak_rss, "trainable": peft.trainable,
                   "drift_after_over_before": after / before}
    return {"lorafam": cli, "peft": peft_result}


# --------------------------------------------------------------------------------------------------
# Report


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}..{max(values):.2f}" if values else "-"


def add_common_args(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """Model, batch and loop options shared with benchmarks/dora_speed.py (which passes its own defaults)."""
    d = {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 32000, "batch": 4, "length": 128, "rounds": 3} | defaults
    parser.add_argument("--hidden", type=int, default=d["hidden"])
    parser.add_argument("--layers", type=int, default=d["layers"])
    parser.add_argument("--intermediate", type=int, default=d["intermediate"])
    parser.add_argument("--vocab", type=int, default=d["vocab"])
    parser.add_argument("--model", type=Path, help="an existing model folder made by this script (skips building one)")
    parser.add_argument("--batch", type=int, default=d["batch"])
    parser.add_argument("--length", type=int, default=d["length"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, help="default 2r")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="autocast on both sides; default fp32 (--cli: the lorafam side keeps the shipped default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the rounds")
    parser.add_argument("--rounds", type=int, default=d["rounds"], help="A B B A rounds")
    parser.add_argument("--steps", type=int, default=1, help="steps per turn")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time steps by the wall clock (default), or by the process's CPU time: steadier on a "
                        "machine shared with other work, but blind to waiting (use with --threads 1)")


def describe_machine() -> dict[str, Any]:
    """CPU facts and library versions, printed and returned for the JSON."""
    machine = cpu_facts() | versions()
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["flags"].items())
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores; {flags}; bf16 {'native' if machine['native_bf16'] else 'emulated'})")
    print(f"torch {machine['torch']} · transformers {machine['transformers']} · peft {machine['peft']} · lorafam {machine['lorafam_commit']}")
    return machine


def describe_setup(folder: Path, args: argparse.Namespace) -> int:
    """Print the model and loop settings; returns the model's parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).parameters())
    print(f"model: random Llama {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"intermediate {args.intermediate}, vocab {args.vocab}) · batch {args.batch} x {args.length} tokens · "
          f"r {args.r} on every linear · AdamW lr {args.lr}, clip 1.0 · {args.threads} threads · "
          f"{args.precision or 'fp32'}{' (PEFT side; lorafam: `lorafam train`)' if getattr(args, 'cli', False) else ''} · "
          f"warm-up {args.warmup}, {args.rounds} rounds x {args.steps} step(s) per turn · {args.clock} clock", flush=True)
    return n_params


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")


#: The model and batch shapes ``--shapes`` names; ``custom`` takes the command line's flags.
SHAPES: dict[str, dict[str, int]] = {
    "small": {"hidden": 256, "layers": 4, "intermediate": 688, "batch": 4, "length": 128},
    "60m": {"hidden": 512, "layers": 8, "intermediate": 1408, "batch": 8, "length": 256},
}


def run_shape(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """Every variant at one shape: the groups, then the table (under the CPU's flags)."""
    from lorafam.hardware import cpu_line

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or make_model_folder(Path(tmp) / "model", args)
        n_params = describe_setup(folder, args)
        if not args.no_floor and not args.cli:
            print("floor ...", flush=True)
            results["floor"] = run_group({"floor": spec_for("floor", "lora", folder, args),
                                          "peft": spec_for("peft", "lora", folder, args)}, args)
        for variant in args.variants:
            print(f"{variant} ...", flush=True)
            if args.cli:
                results[variant] = cli_group(variant, folder, Path(tmp), args)
            else:
                results[variant] = run_group({"lorafam": spec_for("lorafam", variant, folder, args),
                                              "peft": spec_for("peft", variant, folder, args)}, args)

    floor = results.get("floor", {}).get("floor", {}).get("step_s")
    mb = 1024**2
    print(f"\n{args.shape}: {n_params / 1e6:.1f}M Llama, batch {args.batch} x {args.length}, {args.precision or 'fp32'}"
          f"{' (lorafam: `lorafam train`)' if args.cli else ''} · {machine['cpu']}, {cpu_line()}")
    head = f"{'':10}{'lorafam s/step':>15}{'PEFT s/step':>13}{'ratio':>7}{'round ratios':>14}{'lorafam RSS MB':>16}{'PEFT RSS MB':>13}{'RSS ratio':>10}"
    print(head + (f"{'lorafam / floor':>16}" if floor else ""))
    table = []
    for variant, pair in results.items():
        if variant == "floor":
            f, p = pair["floor"], pair["peft"]
            print(f"{'floor':10}{f['step_s']:>15.3f}{'':>13}{'':>7}{'':>14}{f['peak_rss'] / mb:>16.0f}"
                  f"   (PEFT LoRA in the same rounds: {p['step_s']:.3f} s/step, {p['step_s'] / f['step_s']:.2f}x the floor)")
            continue
        ours, theirs = pair["lorafam"], pair["peft"]
        ratio = ours["step_s"] / theirs["step_s"]
        rounds = round_ratios(ours, theirs) if "round_s" in ours else []
        row = {"variant": variant, "lorafam_step_s": ours["step_s"], "peft_step_s": theirs["step_s"], "ratio": ratio,
               "round_ratios": rounds, "lorafam_peak_rss_mb": ours["peak_rss"] / mb, "peft_peak_rss_mb": theirs["peak_rss"] / mb,
               "rss_ratio": ours["peak_rss"] / theirs["peak_rss"]}
        table.append(row)
        line = (f"{variant:10}{ours['step_s']:>15.3f}{theirs['step_s']:>13.3f}{ratio:>7.2f}{spread(rounds):>14}"
                f"{row['lorafam_peak_rss_mb']:>16.0f}{row['peft_peak_rss_mb']:>13.0f}{row['rss_ratio']:>10.2f}")
        print(line + (f"{ours['step_s'] / floor:>16.2f}" if floor else ""))
    print("ratio = lorafam / PEFT median step time (< 1: lorafam faster); round ratios: min..max over the A B B A rounds;"
          " RSS = each process's peak resident set")
    if args.cli:
        used = sorted({pair["lorafam"]["mixed_precision"] for pair in results.values()})
        drift = [pair["peft"]["drift_after_over_before"] for pair in results.values()]
        print(f"lorafam side: `lorafam train` with train.mixed_precision {', '.join(used)}; PEFT side {args.precision or 'fp32'}, "
              f"its turns after the CLI run over those before: {spread(drift)} (machine drift)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("child", "cli_child", "shapes")}
    return {"shape": args.shape, "settings": settings, "model_params": n_params, "table": table, "raw": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--shapes", nargs="+", choices=[*SHAPES, "custom"], default=list(SHAPES),
                        help="model and batch shapes, one table each (custom: the --hidden ... --length flags)")
    parser.add_argument("--no-floor", action="store_true", help="skip the frozen-base floor")
    add_common_args(parser)
    parser.add_argument("--cli", action="store_true", help="time `lorafam train` (metrics.jsonl) instead of the library loop")
    parser.add_argument("--cli-set", action="append", default=[], metavar="KEY=VALUE", help="extra --set for `lorafam train`")
    parser.add_argument("--json", type=Path, default=ROOT / "runs" / "vs_peft.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.cli_child:
        return cli_child(args.cli_child, args.cli_set)
    if args.cli and args.clock == "cpu":
        parser.error("--cli times `lorafam train` from its tokens_per_s, a wall-clock figure: drop --clock cpu")
    if args.model and args.shapes != ["custom"]:
        parser.error("--model is a folder of one shape: give its --hidden ... flags with --shapes custom")

    machine = describe_machine()
    shapes = []
    for shape in args.shapes:
        shaped = argparse.Namespace(**(vars(args) | SHAPES.get(shape, {}) | {"shape": shape}))
        shapes.append(run_shape(shaped, machine))
    write_json(args.json, {"machine": machine, "shapes": shapes})


if __name__ == "__main__":
    main()
