"""Peak memory and step time of the quickstart in fp32 and in bf16, and of bf16 as another checkout ran it.

    python benchmarks/precision_memory.py                                   # bf16 (hold, copy) and fp32, 40 steps, 2 rounds
    python benchmarks/precision_memory.py --modes hold copy recast          # every train.frozen_weights
    git worktree add /tmp/before <commit>                                   # a checkout to compare with
    python benchmarks/precision_memory.py --baseline-root /tmp/before       # + bf16 as that checkout trains it
    python benchmarks/precision_memory.py --recipe recipes/dora.yaml --steps 20

Issue 23 asked that a bf16 run hold no fp32 and bf16 copy of its frozen weights at once, and peak no
higher than the same run in fp32 on the same CPU, at the same or better speed. The bf16
configurations differ in train.frozen_weights (hold: the default; copy: autocast's own way;
recast: see lorafam.frozen_weights). Each configuration
runs `lorafam train` in its own process (peak RSS = run.json's peak_memory: loading, the capped eval
passes, every step), in rounds ordered A B C, C B A, so a change in the machine's load hits each
alike. Step time is compared step by step against the first bf16 configuration: the same step
trains on the same examples in every configuration, so the paired ratio of step_seconds (median
over steps and rounds) is the configuration's own cost. The adapter columns say how far each
configuration's adapter is from the reference's (0: bitwise equal). Not a test: the figures depend
on the machine, printed with its CPU flags.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layout_memory import print_comparison, read_run  # noqa: E402

from lorafam.hardware import cpu_line  # noqa: E402


def run(recipe: str, root: Path, precision: str, steps: int, sets: list[str], out: Path) -> dict:
    """`lorafam train` from the checkout at ``root`` (its own code on PYTHONPATH)."""
    overrides = [f"train.max_steps={steps}", f"train.mixed_precision={precision}", "train.log_every=1",
                 "train.eval_max_batches=1", "train.sample_prompt=null", f"output_dir={out}", *sets]
    command = [sys.executable, "-m", "lorafam", "train", str(ROOT / recipe), "--overwrite"]
    for item in overrides:
        command += ["--set", item]
    # From the checkout itself: `python -m` puts the working directory first on sys.path.
    subprocess.run(command, check=True, cwd=root, stdout=subprocess.DEVNULL, env=os.environ | {"PYTHONPATH": str(root)})
    return read_run(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs every configuration (order reversed every other round)")
    parser.add_argument("--baseline-root", type=Path, help="another lorafam checkout: adds its bf16 run")
    parser.add_argument("--modes", nargs="+", default=["hold", "copy"], choices=["hold", "copy", "recast"],
                        help="train.frozen_weights of the bf16 configurations, the first the reference")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    configs = {f"bf16 {mode}": (ROOT, "bf16", [f"train.frozen_weights={mode}"]) for mode in args.modes}
    configs["fp32"] = (ROOT, "no", [])
    if args.baseline_root:
        configs = {"bf16 (baseline)": (args.baseline_root.resolve(), "bf16", [])} | configs

    results: dict[str, list[dict]] = {name: [] for name in configs}
    names = list(configs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                root, precision, sets = configs[name]
                out = Path(tmp) / f"{name.replace(' ', '-').strip('()')}-{r}"
                results[name].append(run(args.recipe, root, precision, args.steps, args.sets + sets, out))
                print(f"round {r + 1}: {name} peak RSS {results[name][-1]['rss'] / 1e9:.2f} GB", flush=True)

        print(f"\n{args.recipe}, {args.steps} steps, {args.rounds} rounds, eval capped at 1 batch · {cpu_line()}")
        print_comparison("configuration", results)

if __name__ == "__main__":
    main()
