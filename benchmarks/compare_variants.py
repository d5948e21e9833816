"""Every registered variant on its own recipe (recipes/<variant>.yaml), side by side.

    python benchmarks/compare_variants.py [--steps N] [--set key=value ...] [--out DIR]

Runs `lorafam train` once per variant (same data, same seed; each recipe's own hyperparameters)
and prints a leaderboard: trainable parameters, eval loss before and after, and wall time
relative to plain LoRA. The seed of the coming `lorafam compare`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafam.adapters import VARIANTS

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="override train.max_steps for every recipe")
    parser.add_argument("--set", action="append", default=[], help="extra --set for every run")
    parser.add_argument("--out", default="runs/compare", help="parent folder of the run folders")
    parser.add_argument("--variants", nargs="*", default=sorted(VARIANTS))
    args = parser.parse_args()

    results = []
    for name in args.variants:
        recipe = ROOT / "recipes" / f"{name}.yaml"
        run_dir = Path(args.out) / name
        cmd = [sys.executable, "-m", "lorafam", "train", str(recipe), "--overwrite", "--set", f"output_dir={run_dir}"]
        if args.steps:
            cmd += ["--set", f"train.max_steps={args.steps}"]
        for item in args.set:
            cmd += ["--set", item]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            results.append({"variant": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        info = json.loads((run_dir / "run.json").read_text())
        results.append(
            {
                "variant": name,
                "trainable": info["trainable_params"],
                "before": info["eval_before"]["loss"],
                "after": info["eval_after"]["loss"],
                "seconds": seconds,
            }
        )
        print(json.dumps(results[-1]), flush=True)

    lora_seconds = next((r["seconds"] for r in results if r["variant"] == "lora" and "seconds" in r), None)
    table = Table(title="eval loss on the held-out split (lower is better)")
    for col in ("variant", "trainable params", "eval loss before", "eval loss after", "change", "time vs lora"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in sorted(results, key=lambda r: r.get("after", float("inf"))):
        if "error" in r:
            table.add_row(r["variant"], "error", " ".join(r["error"]), "", "", "")
            continue
        ratio = f"{r['seconds'] / lora_seconds:.2f}x" if lora_seconds else ""
        table.add_row(
            r["variant"], f"{r['trainable']:,}", f"{r['before']:.4f}", f"{r['after']:.4f}",
            f"{r['after'] - r['before']:+.4f}", ratio,
        )
    Console().print(table)
    (Path(args.out) / "leaderboard.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
