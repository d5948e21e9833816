"""The `lorafam` command: train, merge, eval, inspect.

Every command turns a LorafamError (bad input) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shlex
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
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint in output_dir (as train.resume: auto).")
    ] = False,
) -> None:
    """Fine-tune the recipe's model with its adapter; writes the run folder (output_dir)."""
    import random

    import torch

    from lorafam.card import write_run_card
    from lorafam.checkpoint import discard_after, find_latest_checkpoint
    from lorafam.data import prepare_data
    from lorafam.modeling import head_modules, load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.run import ADAPTER_WEIGHTS, CHECKPOINTS, METRICS, RUN_INFO, adapt, check_output_dir, read_run_info
    from lorafam.run import save_adapter, save_run_files, write_json
    from lorafam.trainer import TrainingStopped
    from lorafam.trainer import train as run_training

    spec = load_recipe(recipe, set or [])
    resume = resume or spec.train.resume == "auto"
    if resume and overwrite:
        raise LorafamError("--overwrite starts over and --resume continues: pass one of them")
    run_dir = check_output_dir(spec, overwrite, resume)
    resume_command = shlex.join(["lorafam", "train", str(recipe), *(f"--set={item}" for item in set or []), "--resume"])
    checkpoint, previous = None, {}
    if resume:
        previous = read_run_info(run_dir)
        if previous.get("status") == "complete" and (run_dir / ADAPTER_WEIGHTS).is_file():
            out.print(f"{run_dir} already holds this run, finished ({previous.get('steps')} steps); nothing to resume", soft_wrap=True)
            return
        checkpoint = find_latest_checkpoint(run_dir, lambda line: err.print(line, markup=False, soft_wrap=True))
        if checkpoint is None:
            out.print(f"no complete checkpoint in {run_dir / CHECKPOINTS}; starting from step 0", soft_wrap=True)
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed)
    # Seeded before anything random (a fresh classification head, the adapter's init), so a run
    # is a function of its recipe, also when several run in one process.
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)
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
    if run_dir.exists() and checkpoint is None:
        if overwrite:
            shutil.rmtree(run_dir)
        else:  # a fresh run of the same recipe: clear the old run's outputs
            for name in (ADAPTER_WEIGHTS, "adapter_config.json", METRICS):
                (run_dir / name).unlink(missing_ok=True)
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    info: dict[str, Any] = {
        "label_names": data.label_names,
        "trainable_params": trainable,
        "total_params": total,
        "data_report": data.report,
        "status": "training",
    }
    if checkpoint is not None:
        info["resumed_from"] = [*previous.get("resumed_from", []), checkpoint.step]
        discard_after(run_dir, checkpoint.step)
    save_run_files(run_dir, spec, tokenizer, info)

    def fit(dataset: Any, steps: int | None, phase: str) -> Any:
        subset = dataclasses.replace(data, train=dataset, eval=None)
        return run_training(spec, model, variant, tokenizer, subset, run_dir, out, phase=phase, steps=steps)

    if checkpoint is not None and previous.get("prepare"):
        prepared = previous["prepare"]  # decided before the interruption: rebuild, do not re-decide
        variant.restore(prepared)
    else:
        prepared = variant.prepare(fit, data.train, spec.train.seed)
    if prepared:
        info["prepare"] = prepared
        trainable, total = variant.parameter_counts()
        info["trainable_params"] = trainable
        write_json(run_dir / RUN_INFO, info)  # a resumed run rebuilds the same structure from it
        out.print(param_line(trainable, total) + " (after prepare)")
    try:
        result = run_training(spec, model, variant, tokenizer, data, run_dir, out, resume=checkpoint)
    except TrainingStopped as stopped:
        write_json(run_dir / RUN_INFO, info | {"status": stopped.status, "stopped_at_step": stopped.step})
        hint = f"; resume with: {resume_command}" if stopped.status == "interrupted" else ""
        err.print(f"error: {stopped}{hint}", markup=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None
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
        "skipped_steps": result.skipped_steps,
    }
    write_json(run_dir / RUN_INFO, info)
    write_run_card(run_dir, spec, info)  # README.md model card, from the final run.json
    if result.skipped_steps:
        out.print(f"skipped {result.skipped_steps} of {result.steps} optimizer steps for a non-finite loss (train.on_nan: skip)", soft_wrap=True)
    if _report_line(data.report):
        out.print(f"data rows left out or cut: {_report_line(data.report)} (counts in {run_dir / RUN_INFO})", soft_wrap=True)
    out.print(f"saved adapter to {run_dir} ({result.steps} steps in {result.seconds:.0f} s)")


def _report_line(report: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items() if k not in ("read", "kept") and v)


@app.command()
@user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged model.")],
    requantize: Annotated[
        str | None,
        typer.Option(help="Save the merged model quantized with bitsandbytes: nf4, fp4 or int8."),
    ] = None,
) -> None:
    """Fold the adapter into the base weights; writes a plain transformers model folder."""
    from lorafam.merge import merge_run

    result = merge_run(run_dir, output, requantize=requantize)
    if result.requantize_max_logit_diff is not None:
        out.print(
            f"re-quantized to {requantize}: max abs logit difference vs the float merge "
            f"{result.requantize_max_logit_diff:.4g} (fixed probe batch)"
        )
    out.print(f"merged model written to {result.path}")


@app.command(name="eval")
@user_errors
def eval_command(
    target: Annotated[Path, typer.Argument(help="A run folder (evaluates its adapter) or a recipe (evaluates the base model).")],
    set: SetOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Loss and perplexity (causal LM) or accuracy (classification) on the eval split."""
    from accelerate import Accelerator

    from lorafam.data import make_collator, prepare_data
    from lorafam.evaluate import evaluate
    from lorafam.merge import load_adapted
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.recipe import load_recipe
    from lorafam.run import is_run_folder, open_run

    # A folder, or a missing path that is no YAML file, was meant as a run folder: open_run says what is wrong.
    if is_run_folder(target) or target.is_dir() or (not target.exists() and target.suffix not in (".yaml", ".yml")):
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
    # Same device and autocast as training, so the numbers match the eval printed by `train`.
    accelerator = Accelerator(mixed_precision=spec.train.mixed_precision)
    if next(model.parameters()).device != accelerator.device:  # (4-bit models refuse .to)
        model = model.to(accelerator.device)
    metrics = evaluate(
        model, data.eval, make_collator(tokenizer, spec.model.task), spec.model.task,
        spec.train.eval_batch_size or spec.train.batch_size, spec.train.eval_max_batches,
        accelerator.autocast,
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
    memory_report: list[str] = []
    if spec.model.quantization is not None:  # measured before adapt() wraps the linears
        from lorafam.quant import double_quant, estimate_weight_memory, memory_lines

        dq = double_quant(spec.model)
        memory_report = memory_lines(estimate_weight_memory(model, spec.model.quantization, dq), spec.model.quantization, dq)
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
    listed = sum(sum(counts) for counts in groups.values())
    for path, module in variant.saved_modules.items():
        head = sum(p.numel() for p in module.parameters())
        listed += head
        table.add_row(f"{path} (trained in full)", "", "1", f"{head:,}")
    if trainable > listed:  # parameters no single layer owns, e.g. LoRA-drop's shared pairs
        table.add_row("shared across layers", "", "", f"{trainable - listed:,}")
    out.print(table)
    # A finished run reports what training decided (e.g. final ranks); a recipe, what it plans.
    for line in run_report or variant.report():
        out.print(line, markup=False)
    out.print(param_line(trainable, total))
    for line in memory_report:
        out.print(line, markup=False)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the GGUF, Modelfile and model card.")],
    format: Annotated[str, typer.Option("--format", help="File format: gguf (llama.cpp, Ollama, LM Studio).")] = "gguf",
    quant: Annotated[
        str, typer.Option(help="GGUF tensor type of the weight matrices: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0.")
    ] = "f16",
) -> None:
    """Merge the adapter and write one GGUF file (+ Ollama Modelfile, model card)."""
    from lorafam.export import export_run

    result = export_run(run_dir, output, fmt=format, quant=quant)
    types = ", ".join(f"{count} {name}" for name, count in sorted(result.tensor_types.items()))
    out.print(f"GGUF written to {result.gguf_path} ({result.size_bytes / 2**20:.1f} MiB; tensors: {types})", soft_wrap=True)
    out.print(f"Ollama: ollama create NAME -f {result.folder / 'Modelfile'}", soft_wrap=True)
    for note in result.notes:
        out.print(f"note: this file {note}", markup=False, soft_wrap=True)
    if result.modelfile_warning:
        err.print(f"warning: {result.modelfile_warning}", markup=False, soft_wrap=True)


def flush_denormals() -> None:
    """Treat subnormal floats as zero on CPU.

    Adapter factors start tiny (AdaLoRA's P, Q ~ N(0, 0.02^2) with Lambda = 0; B = 0 in LoRA), so
    early gradients and Adam's second moments fall into the subnormal range, where x86 arithmetic
    is ~100x slower. Measured: 20 AdaLoRA steps on a tiny Llama took 34.8 s without this and 2.7 s
    with it, same loss to the last digit. Values below 1.2e-38 carry no signal for training.
    """
    import torch

    torch.set_flush_denormal(True)


def quiet_libraries() -> None:
    """Our progress bar and lines are the output; the libraries' loading bars are noise here."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main() -> None:
    flush_denormals()
    quiet_libraries()
    app()
