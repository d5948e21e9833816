"""Peak memory and step time of one recipe under several batch layouts of the same global batch.

    python benchmarks/layout_memory.py                                   # quickstart: 8x1 against 4x2, 20 steps
    python benchmarks/layout_memory.py --layouts 8x1 4x2 2x4 --steps 30
    python benchmarks/layout_memory.py --recipe recipes/dora.yaml --steps 10

A layout is batch_size x grad_accum. lorafam's steps do not depend on the layout (the loss is
divided by the whole step's label count, and adapter dropout masks follow the example;
tests/test_distributed.py), so a smaller micro-batch with more accumulation trains the same adapter
with less activation memory: this measures what that costs in time and saves in peak RSS on the real
CLI, and how far the adapters and logged losses of the layouts are apart (float rounding).

Each layout runs `lorafam train` in its own process (peak RSS = run.json's peak_memory, which
includes loading, the eval passes and the sample generation), in rounds ordered A B, B A, so a
change in the machine's load hits both alike. Step time is compared step by step: the same step
trains on the same examples under every layout, so the paired ratio of step_seconds (median over
steps and rounds) is the cost of the layout itself. The eval passes are capped at one batch
(train.eval_max_batches=1) because they do not depend on the layout. Not a test: the figures depend
on the machine, printed with its CPU flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorafam.hardware import cpu_line  # noqa: E402


def run(recipe: str, layout: tuple[int, int], steps: int, sets: list[str], out: Path) -> dict:
    batch, accum = layout
    overrides = [f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.grad_accum={accum}",
                 "train.log_every=1", "train.eval_max_batches=1", f"output_dir={out}", *sets]
    command = [sys.executable, "-m", "lorafam", "train", recipe, "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return read_run(out)


def read_run(out: Path) -> dict:
    """A finished run's peak RSS, step times and losses by step, and its adapter file."""
    info = json.loads((out / "run.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = {row["step"]: row["step_seconds"] for row in rows if "step_seconds" in row}
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    return {"rss": info["peak_memory"]["rss_bytes"], "seconds": seconds, "losses": losses,
            "adapter": out / "adapter_model.safetensors"}


def adapter_difference(a: Path, b: Path) -> float:
    """The largest ||a - b|| / ||a|| over the tensors of two adapter files (as tests/test_distributed.py)."""
    from safetensors.torch import load_file

    first, second = load_file(a), load_file(b)
    return max(float((first[k].double() - second[k].double()).norm() / first[k].double().norm().clamp_min(1e-30)) for k in first)


def loss_difference(a: dict[int, float], b: dict[int, float]) -> float:
    """The largest relative difference between two runs' logged losses at the same step."""
    return max(abs(a[step] - b[step]) / abs(a[step]) for step in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--layouts", nargs="+", default=["8x1", "4x2"], help="batch_size x grad_accum, same product")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs every layout (order reversed every other round)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    layouts = [tuple(int(n) for n in item.split("x")) for item in args.layouts]
    if len({b * a for b, a in layouts}) != 1:
        parser.error("every layout must have the same global batch (batch_size x grad_accum)")

    results: dict[tuple[int, int], list[dict]] = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for layout in layouts if r % 2 == 0 else layouts[::-1]:
                out = Path(tmp) / f"{layout[0]}x{layout[1]}-{r}"
                results[layout].append(run(args.recipe, layout, args.steps, args.sets, out))
                print(f"round {r + 1}: {layout[0]}x{layout[1]} peak RSS {results[layout][-1]['rss'] / 1e9:.2f} GB", flush=True)

        print(f"\n{args.recipe}, {args.steps} steps, {args.rounds} rounds · {cpu_line()}")
        print_comparison("layout", {f"{b}x{a}": results[(b, a)] for b, a in layouts})


def print_comparison(column: str, results: dict[str, list[dict]]) -> None:
    """A markdown table of runs (``read_run``'s, per round) against the first entry's: the worst
    peak RSS, the step time paired step by step (the same step trains on the same examples in every
    configuration) and over all steps, and how far the first round's adapter and losses are."""
    reference = next(iter(results))
    print(f"| {column} | peak RSS (GB), worst round | step time vs {reference}, paired median | "
          f"all steps' time vs {reference} | adapter vs {reference}, rel. | losses vs {reference}, rel. |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        ratios = [
            run_["seconds"][step] / base["seconds"][step]
            for run_, base in zip(runs, results[reference])
            for step in run_["seconds"]
            if step > 1 and step in base["seconds"]  # step 1 pays the first-call warm-up
        ]
        total = sum(s for run_ in runs for step, s in run_["seconds"].items() if step > 1)
        reference_total = sum(s for run_ in results[reference] for step, s in run_["seconds"].items() if step > 1)
        diff = adapter_difference(results[reference][0]["adapter"], runs[0]["adapter"])
        loss_diff = loss_difference(results[reference][0]["losses"], runs[0]["losses"])
        print(f"| {name} | {max(r_['rss'] for r_ in runs) / 1e9:.2f} | {statistics.median(ratios):.3f} | "
              f"{total / reference_total:.3f} | {diff:.1e} | {loss_diff:.1e} |")


if __name__ == "__main__":
    main()
