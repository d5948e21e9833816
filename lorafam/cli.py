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


# --------------------------------------------------------------------------------------------------
# lorafam analyze: the papers' own analyses (logic in lorafam/analyze.py)

analyze_app = typer.Typer(
    help="The papers' own analyses of trained adapters: subspace, decomposition, amplification, ranks.",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")

RunArgument = Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")]
OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="Folder for the PNG and JSON files (default: RUN/analysis).")
]
ModuleOption = Annotated[str | None, typer.Option("--module", help="Only adapted modules with this name, e.g. q_proj.")]
LayerOption = Annotated[int | None, typer.Option("--layer", help="Only this block index, e.g. 3.")]


def _print_analysis(result: Any) -> None:
    if result.table is not None:
        out.print(result.table)
    for line in result.notes:
        out.print(line, markup=False, soft_wrap=True)
    for path in result.files:
        out.print(f"wrote {path}", markup=False, soft_wrap=True)


@analyze_app.command("subspace")
@user_errors
def analyze_subspace(
    run_a: RunArgument,
    run_b: Annotated[
        Path | None, typer.Argument(help="A second run to compare with (e.g. r=64 against r=8); omitted: compare RUN_A's update with W.")
    ] = None,
    module: ModuleOption = None,
    layer: LayerOption = None,
    matrix: Annotated[str, typer.Option("--matrix", help="A: input side (A's right-singular vectors); B: output side (B's left-singular vectors).")] = "A",
    base_directions: Annotated[
        int | None, typer.Option("--base-directions", help="One run: how many of W's top directions to compare with (default 10% of its smaller side).")
    ] = None,
    output: OutputOption = None,
) -> None:
    """LoRA paper 7.2: subspace similarity phi(i, j) of two runs' A (or B) matrices; heatmap + JSON."""
    from lorafam.analyze import subspace

    _print_analysis(subspace(run_a, run_b, module=module, layer=layer, side=matrix, output=output, base_directions=base_directions))


@analyze_app.command("decomposition")
@user_errors
def analyze_decomposition(run: RunArgument, module: ModuleOption = None, layer: LayerOption = None, output: OutputOption = None) -> None:
    """DoRA paper 3.2: magnitude and direction change of the merged weights over the run's checkpoints."""
    from lorafam.analyze import decomposition

    _print_analysis(decomposition(run, module=module, layer=layer, output=output,
                                  warn=lambda line: err.print(line, markup=False, soft_wrap=True)))


@analyze_app.command("amplification")
@user_errors
def analyze_amplification(
    run: RunArgument,
    module: ModuleOption = None,
    layer: LayerOption = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Directions to project on (default: the adapter's rank).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Random direction draws to average.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random directions.")] = 0,
    output: OutputOption = None,
) -> None:
    """LoRA paper 7.3: how much Delta W amplifies directions of W; table + JSON."""
    from lorafam.analyze import amplification

    _print_analysis(amplification(run, module=module, layer=layer, output=output, rank=rank, samples=samples, seed=seed))


@analyze_app.command("ranks")
@user_errors
def analyze_ranks(run: RunArgument, output: OutputOption = None) -> None:
    """What the variant decided in training (AdaLoRA's ranks, LoRA-drop's kept layers), as heatmaps."""
    from lorafam.analyze import ranks

    _print_analysis(ranks(run, output=output))


# --------------------------------------------------------------------------------------------------
# lorafam chat / generate (logic in lorafam/chat.py)

TargetArgument = Annotated[
    str, typer.Argument(help="A run folder (its adapter), a recipe .yaml (its base model), a model folder, or a packaged alias.")
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Longest answer, in tokens.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the smallest token set with this much probability.")]
SystemOption = Annotated[str | None, typer.Option("--system", help="A system message put first in the conversation.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Seed for sampling (temperature > 0).")]


@app.command()
@user_errors
def chat(
    target: TargetArgument,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy (deterministic).")] = 0.7,
    top_p: TopP = 0.9,
    max_new_tokens: MaxNewTokens = 256,
    system: SystemOption = None,
    seed: SeedOption = None,
    show_prompt: Annotated[bool, typer.Option("--show-prompt", help="Print each prompt's token count on stderr.")] = False,
) -> None:
    """Chat with a run's adapted model (or a base or merged model), streaming the answers."""
    from lorafam.chat import Settings, chat as run_chat, open_target

    settings = Settings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed).check()
    interactive = sys.stdin.isatty()

    def read() -> str | None:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    loaded = open_target(target)
    run_chat(loaded, settings, read, write, lambda line: err.print(line, markup=False, soft_wrap=True), system, show_prompt)


@app.command(name="generate")
@user_errors
def generate_command(
    target: TargetArgument,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help='JSONL file, one {"prompt": ...} per line.')] = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object per prompt on stdout.")] = False,
    compare_base: Annotated[bool, typer.Option("--compare-base", help="Also answer with the adapter disabled (the base model).")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy (deterministic).")] = 0.0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNewTokens = 128,
    system: SystemOption = None,
    seed: SeedOption = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as is, without the chat template.")] = False,
) -> None:
    """One-shot generation for scripts: answers to --prompt or each prompt of --file."""
    from lorafam.chat import Settings, answer_prompts, open_target, read_prompts

    if (prompt is None) == (file is None):
        raise LorafamError("give exactly one of --prompt TEXT or --file prompts.jsonl")
    settings = Settings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed).check()
    prompts = [prompt] if prompt is not None else read_prompts(file)
    loaded = open_target(target)
    rows = answer_prompts(loaded, prompts, settings, system=system, raw=raw, compare_base=compare_base)
    for row in rows:
        if json_output:
            sys.stdout.write(json.dumps(row) + "\n")
        elif compare_base:
            from rich.text import Text  # plain text: a prompt like "[b]" is not rich markup

            table = Table(title=Text(row["prompt"]), show_lines=True)
            table.add_column("base")
            table.add_column(Text(f"adapted ({target})"))
            table.add_row(*(Text(row[k] or "(nothing before end of text)") for k in ("base_output", "output")))
            out.print(table)
        else:
            if len(rows) > 1:
                out.print(f"### {row['prompt']}", markup=False, soft_wrap=True)
            out.print(row["output"], markup=False, soft_wrap=True)
