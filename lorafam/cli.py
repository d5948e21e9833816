"""The `lorafam` command: train, merge, eval, inspect.

Every command turns a LorafamError (bad input) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.table import Table

from lorafam.errors import LorafamError

app = typer.Typer(
    name="lorafam",
    help="Fine-tune Hugging Face models with the LoRA family, from a YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set train.lr=1e-4 (value parsed as YAML)."),
]


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input -> one line on stderr, exit 2, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LorafamError as e:
            err.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def param_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.4f}%)"


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe.")],
    set: SetOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different run already in output_dir.")] = False,
) -> None:
    """Fine-tune the recipe's model with its adapter; writes the run folder (output_dir)."""
    from lorafam.data import prepare_data
    from lorafam.modeling import head_modules, load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.run import CHECKPOINTS, check_output_dir, adapt, save_adapter, save_run_files, write_json, RUN_INFO
    from lorafam.trainer import train as run_training

    spec = load_recipe(recipe, set or [])
    run_dir = check_output_dir(spec, overwrite)
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed)
    model = load_model(spec.model, data.label_names)
    variant = adapt(model, spec, head_modules(model, spec.model.task))
    trainable, total = variant.parameter_counts()

    out.print(f"model {spec.model.name} ({type(model).__name__}) · adapter {variant.name} · {len(variant.layers)} layers adapted")
    out.print(param_line(trainable, total))
    out.print(
        f"data: {data.format}, {len(data.train)} train / {len(data.eval) if data.eval is not None else 0} eval examples"
        + (f" ({_report_line(data.report)})" if _report_line(data.report) else "")
    )

    # Everything is validated: only now do we touch the disk.
    if run_dir.exists():
        if overwrite:
            shutil.rmtree(run_dir)
        else:  # a fresh run of the same recipe: clear the old run's outputs
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    info: dict[str, Any] = {
        "label_names": data.label_names,
        "trainable_params": trainable,
        "total_params": total,
        "data_report": data.report,
        "status": "training",
    }
    save_run_files(run_dir, spec, tokenizer, info)

    def fit(dataset: Any, steps: int, phase: str) -> Any:
        subset = dataclasses.replace(data, train=dataset, eval=None)
        return run_training(spec, model, variant, tokenizer, subset, run_dir, out, phase=phase, steps=steps)

    prepared = variant.prepare(fit, data.train, spec.train.seed)
    if prepared:
        info["prepare"] = prepared
        trainable, _ = variant.parameter_counts()
        info["trainable_params"] = trainable
        out.print(param_line(trainable, total) + " (after prepare)")
    result = run_training(spec, model, variant, tokenizer, data, run_dir, out)
    save_adapter(run_dir, variant, spec)
    artifacts = variant.write_artifacts(run_dir)
    info |= {
        "status": "complete",
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "final_train_loss": result.final_train_loss,
        "sample_before": result.sample_before,
        "sample_after": result.sample_after,
        "artifacts": [str(p.relative_to(run_dir)) for p in artifacts],
        "report": variant.report(),
    }
    write_json(run_dir / RUN_INFO, info)
    out.print(f"saved adapter to {run_dir} ({result.steps} steps in {result.seconds:.0f} s)")


def _report_line(report: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items() if k not in ("read", "kept") and v)


@app.command()
@user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged model.")],
) -> None:
    """Fold the adapter into the base weights; writes a plain transformers model folder."""
    from lorafam.merge import merge_run

    path = merge_run(run_dir, output)
    out.print(f"merged model written to {path}")


@app.command(name="eval")
@user_errors
def eval_command(
    target: Annotated[Path, typer.Argument(help="A run folder (evaluates its adapter) or a recipe (evaluates the base model).")],
    set: SetOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Loss and perplexity (causal LM) or accuracy (classification) on the eval split."""
    from lorafam.data import make_collator, prepare_data
    from lorafam.evaluate import evaluate
    from lorafam.merge import load_adapted
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.run import is_run_folder, open_run

    if is_run_folder(target):
        run = open_run(target)
        spec, label_names = run.recipe, run.label_names
        if set:
            raise LorafamError("eval RUN_DIR takes no --set: the run's recipe is fixed; eval a recipe instead")
        model, _ = load_adapted(run)
        what = f"adapter in {target}"
    else:
        spec, label_names = load_recipe(target, set or []), None
        model = None
        what = f"base model {spec.model.name}"
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed, label_names)
    if data.eval is None:
        raise LorafamError("the recipe has no eval data: set data.eval or data.eval_split")
    if model is None:
        model = load_model(spec.model, data.label_names)
    metrics = evaluate(
        model, data.eval, make_collator(tokenizer, spec.model.task), spec.model.task,
        spec.train.eval_batch_size or spec.train.batch_size, spec.train.eval_max_batches,
    )
    if json_output:
        sys.stdout.write(json.dumps(metrics) + "\n")
    else:
        out.print(f"{what} on {len(data.eval)} eval examples")
        for key, value in metrics.items():
            out.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


@app.command()
@user_errors
def inspect(
    target: Annotated[Path, typer.Argument(help="A recipe or a run folder.")],
    set: SetOption = None,
) -> None:
    """Adapted modules and trainable parameters, from the model config alone (meta device, no weights)."""
    from lorafam.modeling import build_meta_model, head_modules
    from lorafam.recipe import load_recipe
    from lorafam.run import adapt, is_run_folder, open_run

    run_report: list[str] = []
    prepared = None
    if is_run_folder(target):
        run = open_run(target)
        spec, label_names, prepared = run.recipe, run.label_names, run.info.get("prepare")
        run_report = run.info.get("report") or []
    else:
        spec, label_names = load_recipe(target, set or []), None
    model = build_meta_model(spec.model, label_names)
    variant = adapt(model, spec, head_modules(model, spec.model.task), prepared)
    trainable, total = variant.parameter_counts()

    table = Table(title=f"{variant.name} on {spec.model.name}")
    table.add_column("module")
    table.add_column("shape (out x in)")
    table.add_column("layers", justify="right")
    table.add_column("trainable params", justify="right")
    groups: dict[tuple[str, str], list[int]] = {}
    for path, layer in variant.layers.items():
        params = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer."))
        key = (path.rsplit(".", 1)[-1], f"{layer.out_features} x {layer.in_features}")
        groups.setdefault(key, []).append(params)
    for (name, shape), counts in groups.items():
        table.add_row(name, shape, str(len(counts)), f"{sum(counts):,}")
    for path, module in variant.saved_modules.items():
        table.add_row(f"{path} (trained in full)", "", "1", f"{sum(p.numel() for p in module.parameters()):,}")
    out.print(table)
    # A finished run reports what training decided (e.g. final ranks); a recipe, what it plans.
    for line in run_report or variant.report():
        out.print(line, markup=False)
    out.print(param_line(trainable, total))


def main() -> None:
    app()
