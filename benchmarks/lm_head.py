"""The labelled-only LM head against full logits: step time and peak memory, side by side.

    python benchmarks/lm_head.py [--steps 12] [--batch-size 8] [--eval-batch-size 32]

Same model (the packaged SmolLM2 + LoRA as in recipes/quickstart.yaml), same batches of the
packaged chatterbot data, fp32, two CPU threads. Each configuration runs in its own child process
(peak RSS is per process): "labelled" is lorafam's CausalLMLoss as it trains (head and
cross-entropy on the labelled positions only, chunked); "full" is the same module forced onto the
model's own forward (vocabulary-wide logits for every position), the way the loss was computed
before. Train steps alternate A B B A across repeats; medians after a warm-up step. Also one eval
pass at the eval batch size, where the full path materialises (batch x seq x vocab) fp32 logits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(mode: str, steps: int, batch_size: int, eval_batch_size: int) -> dict:
    import resource

    import torch

    from lorafam.adapters import build_variant
    from lorafam.adapters.lora import LoRAConfig
    from lorafam.data import make_collator, prepare_data
    from lorafam.evaluate import evaluate
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.tasks import get_task

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed)
    model = load_model(spec.model)
    build_variant(LoRAConfig(variant="lora", r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])).apply(model)
    task = get_task("causal-lm")
    loss_model = task.loss_module(model)
    loss_model.split_head = mode == "labelled"
    collate = make_collator(tokenizer, "causal-lm")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, labelled, positions = [], 0, 0
    loss_model.train()
    for step in range(steps + 1):
        batch = collate([data.train[i] for i in range(step * batch_size, (step + 1) * batch_size)])
        start = time.perf_counter()
        out = loss_model(**batch)
        (out["loss_sum"] / out["count"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - start)
            labelled += int(out["count"])
            positions += batch["input_ids"].numel()
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    metrics = evaluate(loss_model, task, data.eval, collate, eval_batch_size)
    eval_seconds = time.perf_counter() - start
    return {
        "mode": mode, "step_seconds": times, "labelled_fraction": labelled / positions,
        "train_peak_rss": train_rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "eval_seconds": eval_seconds, "eval_loss": metrics["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="A B B A blocks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.eval_batch_size)))
        return

    from lorafam.hardware import cpu_flags

    flags = cpu_flags() or set()
    order = ["labelled", "full", "full", "labelled"] * args.repeats
    runs: dict[str, list[dict]] = {"labelled": [], "full": []}
    for mode in order:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--eval-batch-size", str(args.eval_batch_size)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {}
    for mode, results in runs.items():
        summary[mode] = {
            "median_step_seconds": statistics.median(t for r in results for t in r["step_seconds"]),
            "train_peak_rss_gb": max(r["train_peak_rss"] for r in results) / 1e9,
            "peak_rss_gb": max(r["peak_rss"] for r in results) / 1e9,
            "eval_seconds": statistics.median(r["eval_seconds"] for r in results),
            "eval_loss": results[0]["eval_loss"],
            "labelled_fraction": results[0]["labelled_fraction"],
        }
    a, b = summary["labelled"], summary["full"]
    print(f"CPU bf16: {'native' if flags & {'avx512_bf16', 'amx_bf16'} else 'not native'}; avx512f: {'avx512f' in flags}")
    print(f"labelled positions: {a['labelled_fraction']:.1%} of the batch")
    print("| | labelled-only head | full logits | labelled / full |")
    print("|---|---|---|---|")
    for key, label in [("median_step_seconds", "train step (s, median)"), ("train_peak_rss_gb", "peak RSS after training steps (GB)"),
                       ("eval_seconds", f"eval pass at batch {args.eval_batch_size} (s)"), ("peak_rss_gb", "peak RSS with eval (GB)")]:
        print(f"| {label} | {a[key]:.3f} | {b[key]:.3f} | {a[key] / b[key]:.2f} |")
    print(f"eval loss: {a['eval_loss']:.6f} vs {b['eval_loss']:.6f}")
    Path("runs").mkdir(exist_ok=True)
    Path("runs/lm_head.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
