"""LoRA vs QLoRA: peak memory and step time on the same model and batch, side by side.

    python benchmarks/qlora_memory.py                      # random ~110M Llama (no download)
    python benchmarks/qlora_memory.py --model smollm2-135m # any model.name lorafam accepts
    python benchmarks/qlora_memory.py --steps 10 --batch 8 --length 256

Each configuration runs in its own subprocess, so one's peak cannot hide the other's. Memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU it is the process's peak RSS (VmHWM) above its
RSS just before the model is loaded (torch allocations are invisible to tracemalloc), reported for
loading and, after resetting the peak, for training. Both
configurations load through ``lorafam.modeling.load_model`` (the recipe path), wrap q/k/v/o in a
rank-8 LoRA, and train under bf16 autocast with AdamW. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def random_model_folder(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux >= 4.0), so loading's transient peak (a 4-bit
    load reads the float weights first) does not count as training memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> dict:
    from lorafam.adapters.lora import LoRA
    from lorafam.modeling import load_model
    from lorafam.recipe import ModelConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    baseline = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quantization = "nf4" if args.worker == "qlora" else None
    model = load_model(ModelConfig(name=args.model, quantization=quantization))
    if quantization is None:
        model.to(device)  # a 4-bit model is placed by from_pretrained itself
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    config = LoRA.Config(variant="lora", r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    variant = LoRA(config).apply(model)
    model.train()
    optimizer = torch.optim.AdamW(variant.trainable_parameters(), lr=1e-4)
    load_peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - baseline
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=g).to(device)

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocator, optimizer state, first-call kernels
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - baseline
    return {"weights": weight_bytes, "load_peak": load_peak, "peak": peak, "step_s": seconds,
            "loss": losses[-1], "device": device}


def run_child(args: argparse.Namespace, which: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--model", args.model,
           "--steps", str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{which} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model.name (default: a random ~110M Llama)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--worker", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = random_model_folder(Path(tmp))
            label = "random Llama (768 x 8 layers, vocab 32000)"
        else:
            label = args.model
        lora, qlora = run_child(args, "lora"), run_child(args, "qlora")
    mb = 1024**2
    peak_kind = "cuda max_memory_allocated" if lora["device"] == "cuda" else "peak RSS above pre-load RSS"
    print(f"model: {label} · batch {args.batch} x {args.length} tokens · {args.steps} timed steps · "
          f"device {lora['device']} · bf16 autocast · LoRA r=8 on q/k/v/o")
    print(f"{'':26}{'LoRA (fp32 base)':>18}{'QLoRA (nf4+dq)':>18}{'QLoRA / LoRA':>15}")
    rows = [
        ("weights (MB)", lora["weights"] / mb, qlora["weights"] / mb),
        ("peak while loading (MB)", lora["load_peak"] / mb, qlora["load_peak"] / mb),
        ("peak while training (MB)", lora["peak"] / mb, qlora["peak"] / mb),
        ("step time (s)", lora["step_s"], qlora["step_s"]),
    ]
    for name, a, b in rows:
        print(f"{name:26}{a:>18.3f}{b:>18.3f}{b / a:>15.2f}")
    print(f"final loss: LoRA {lora['loss']:.4f} · QLoRA {qlora['loss']:.4f}   (peak memory = {peak_kind})")


if __name__ == "__main__":
    main()
