"""The `lorafam` command: train, merge, eval, inspect, compare, export, analyze, chat, generate.

Every command turns a LorafamError (bad input) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import shlex
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
            # Under a multi-process launch every process meets the same bad input: one line will do.
            if _is_main_process():
                err.print(f"error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", 2)) from None

    return wrapper


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
    from lorafam import api
    from lorafam.trainer import TrainingStopped

    try:
        api.train(recipe, set or [], resume=resume, overwrite=overwrite, console=out,
                  warn=lambda line: err.print(line, markup=False, soft_wrap=True))
    except TrainingStopped as stopped:
        command = shlex.join(["lorafam", "train", str(recipe), *(f"--set={item}" for item in set or []), "--resume"])
        hint = f"; resume with: {command}" if stopped.status == "interrupted" else ""
        if _is_main_process():
            err.print(f"error: {stopped}{hint}", markup=False, soft_wrap=True)
        raise typer.Exit(stopped.exit_code) from None


def _is_main_process() -> bool:
    from lorafam.distributed import rank

    return rank() == 0


@app.command()
@user_errors
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the merged model.")],
    requantize: Annotated[
        str | None,
        typer.Option(help="Save the merged model quantized with bitsandbytes: nf4, fp4 or int8."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Reload the written folder with plain transformers and check its logits against the adapted "
            "model (holds the model in fp32 for it; --no-verify skips it for very large models and writes the same files).",
        ),
    ] = True,
) -> None:
    """Fold the adapter into the base weights; writes a plain transformers model folder and checks it."""
    from lorafam.merge import merge_run

    result = merge_run(run_dir, output, requantize=requantize, verify=verify)
    if result.bias_flags:
        out.print(f"merged config: {', '.join(result.bias_flags)} switched on, so the biases the adapter added load", soft_wrap=True)
    if result.check is not None:
        check = result.check
        out.print(
            f"checked: reloaded with transformers, max abs logit difference vs the adapted model "
            f"{check.max_logit_diff:.3g} (tolerance {check.tolerance:.3g}; {check.saved_dtype} weights, "
            f"fp32 logits on a fixed probe batch of {check.tokens} tokens)",
            soft_wrap=True,
        )
    else:
        out.print("not checked (--no-verify)")
    if result.requantize_max_logit_diff is not None:
        out.print(
            f"re-quantized to {requantize}: max abs logit difference vs the float merge "
            f"{result.requantize_max_logit_diff:.4g} (fixed probe batch)",
            soft_wrap=True,
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
    from lorafam import api

    result = api.evaluate(target, set or [])
    if json_output:
        sys.stdout.write(json.dumps(result.metrics) + "\n")
    else:
        out.print(f"{result.what} on {result.examples} eval examples ({result.precision})")
        for key, value in result.metrics.items():
            out.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")


@app.command()
@user_errors
def compare(
    recipe: Annotated[Path, typer.Argument(help="The recipe every variant is trained on (model, data, steps, lr).")],
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated variant names, or 'all'.")] = "all",
    set: SetOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the runs and the comparison (default runs/compare-RECIPE).")] = None,
) -> None:
    """Train the recipe once per variant and compare quality, size, speed and memory side by side."""
    from lorafam import api

    api.compare(recipe, variants, set or [], output, console=out)


@app.command()
@user_errors
def inspect(
    target: Annotated[Path, typer.Argument(help="A recipe or a run folder.")],
    set: SetOption = None,
) -> None:
    """Adapted modules and trainable parameters, from the model config alone (meta device, no weights)."""
    from lorafam import api
    from lorafam.modeling import build_meta_model, head_modules
    from lorafam.recipe import load_recipe
    from lorafam.run import adapt, is_run_folder, open_run

    run_report: list[str] = []
    prepared = None
    if is_run_folder(target):
        run = open_run(target)
        spec, label_names, prepared = run.recipe, run.label_names, run.info.prepare
        run_report = run.info.report
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
    for path, layer in variant.expert_layers.items():
        params = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base_layer."))
        module = path.split(".base_layer")[0].rsplit(".", 1)[-1]  # as target_parameters names it
        key = (f"{module}.{layer.parameter_name}", f"{layer.num_experts} experts x {layer.out_features} x {layer.in_features}")
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
    for line in variant.target_notes() + variant.notes():
        out.print(line, markup=False, soft_wrap=True)
    # A finished run reports what training decided (e.g. final ranks); a recipe, what it plans.
    for line in run_report or variant.report():
        out.print(line, markup=False)
    out.print(api.param_line(trainable, total))
    for line in memory_report:
        out.print(line, markup=False)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (train's output_dir).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the GGUF file(s) and Modelfile (and, for gguf, a model card).")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf: the merged model, one file (llama.cpp, Ollama, LM Studio); gguf-lora: the adapter alone as a "
            "llama.cpp LoRA file (--lora, Ollama's ADAPTER), for the variants whose update is a low-rank product.",
        ),
    ] = "gguf",
    quant: Annotated[
        str,
        typer.Option(
            help="GGUF tensor type of the weight matrices: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 "
            "(gguf-lora: of the --base file; the adapter is f32).",
        ),
    ] = "f16",
    base: Annotated[
        bool, typer.Option("--base", help="gguf-lora: also write the base model's GGUF (at --quant) beside the adapter.")
    ] = False,
) -> None:
    """Write the run as GGUF: merged into one file, or the adapter alone (+ Ollama Modelfile)."""
    from lorafam.export import export_run

    result = export_run(run_dir, output, fmt=format, quant=quant, base=base)
    types = ", ".join(f"{count} {name}" for name, count in sorted(result.tensor_types.items()))
    if format == "gguf-lora":
        ranks = sorted(set(result.ranks.values()))
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        out.print(
            f"LoRA GGUF written to {result.gguf_path} ({result.size_bytes / 2**20:.2f} MiB; {len(result.ranks)} tensors "
            f"adapted, {shown})", soft_wrap=True,
        )
        if result.base_gguf_path is not None:
            out.print(f"base GGUF written to {result.base_gguf_path} ({result.base_size_bytes / 2**20:.1f} MiB)", soft_wrap=True)
        base_file = result.base_gguf_path or "BASE.gguf"
        out.print(f"llama.cpp: llama-completion -m {base_file} --lora {result.gguf_path}", soft_wrap=True)
    else:
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
    from lorafam.hardware import bound_kernel_caches

    bound_kernel_caches()  # before torch's first bf16 matmul: read once
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
