"""lorafam as a library: what the CLI commands do, callable from Python (tests, notebooks, `compare`).

    from lorafam import api
    result = api.train("recipes/quickstart.yaml", overrides=["train.max_steps=20"])
    metrics = api.evaluate(result.run_dir)
    api.merge(result.run_dir, "merged/")

Bad input raises ``lorafam.errors.LorafamError`` (one line that says what to fix); a run stopped by
a signal or a non-finite loss raises ``lorafam.trainer.TrainingStopped`` after recording it in
run.json. The CLI only parses arguments, prints, and turns these into exit codes.

Under a multi-process launch (``accelerate launch``, torchrun) every process calls ``train``; only
the main one writes to the run folder, and the others print nothing.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lorafam.errors import LorafamError
from lorafam.recipe import Recipe, load_recipe
from lorafam.card import write_run_card
from lorafam.tracking import Trackers, check_installed


@dataclass
class RunResult:
    """What ``train`` did: the run folder, its run.json, and the trained objects (in-process use)."""

    run_dir: Path
    info: dict[str, Any]
    already_complete: bool = False
    model: Any = field(default=None, repr=False)
    variant: Any = field(default=None, repr=False)
    training: Any = field(default=None, repr=False)  # lorafam.trainer.TrainResult


def _recipe(recipe: str | Path | Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            raise LorafamError("overrides apply to a recipe file; apply them to the Recipe object instead")
        return recipe
    return load_recipe(recipe, list(overrides))


def param_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.4f}%)"


def report_line(report: dict[str, int]) -> str:
    """The data rows left out or cut, e.g. 'dropped empty 2, truncated 3'; empty when none."""
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report.items() if k not in ("read", "kept") and v)


def peak_memory() -> dict[str, int]:
    """This process's peak resident memory so far (and the GPU's peak allocation), in bytes."""
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_bytes": rss * (1 if sys.platform == "darwin" else 1024)}  # Linux reports KiB
    if torch.cuda.is_available():
        out["cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def train(
    recipe: str | Path | Recipe,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunResult:
    """Fine-tune the recipe's model with its adapter and write the run folder (``output_dir``).

    ``resume`` continues from the newest complete checkpoint (also ``train.resume: auto``);
    ``overwrite`` replaces a different run already in ``output_dir``. Progress goes to ``console``,
    warnings (a damaged checkpoint skipped) to ``warn`` (default: stderr).
    """
    import torch
    from accelerate import PartialState

    from lorafam.checkpoint import discard_after, find_latest_checkpoint
    from lorafam.data import prepare_data
    from lorafam.distributed import gathered
    from lorafam.hardware import check_process_count, choose_precision, process_group
    from lorafam.modeling import head_modules, load_model, load_tokenizer
    from lorafam.quant import FOUR_BIT, check_sharded_storage, compute_dtype
    from lorafam.run import ADAPTER_WEIGHTS, CHECKPOINTS, METRICS, RUN_INFO, adapt, check_output_dir, pin_compute_dtype, read_run_info
    from lorafam.run import save_adapter, save_run_files, write_json
    from lorafam.trainer import TrainingStopped, layout_of
    from lorafam.trainer import train as run_training

    spec = _recipe(recipe, overrides)
    resume = resume or spec.train.resume == "auto"
    if resume and overwrite:
        raise LorafamError("--overwrite starts over and --resume continues: pass one of them")
    cpu, backend = process_group()  # joins the process group under a multi-process launch
    state = PartialState(cpu=cpu, **({"backend": backend} if backend else {}))
    check_process_count(state.num_processes)
    main = state.is_main_process
    if not main:
        console, warn = Console(quiet=True), lambda line: None
    elif console is None:
        console = Console()
    warn = warn or (lambda line: print(line, file=sys.stderr))

    run_dir = check_output_dir(spec, overwrite, resume)
    checkpoint, previous = None, {}
    if resume:
        previous = read_run_info(run_dir)
        if previous.get("status") == "complete" and (run_dir / ADAPTER_WEIGHTS).is_file():
            console.print(f"{run_dir} already holds this run, finished ({previous.get('steps')} steps); nothing to resume", soft_wrap=True)
            return RunResult(run_dir, previous, already_complete=True)
        checkpoint = find_latest_checkpoint(run_dir, warn)
        if checkpoint is None:
            console.print(f"no complete checkpoint in {run_dir / CHECKPOINTS}; starting from step 0", soft_wrap=True)
        elif (written := checkpoint.state.get("processes", 1)) != state.num_processes:  # before run.json is touched
            raise LorafamError(
                f"checkpoint {checkpoint.path} was written on {written} process(es); this run has {state.num_processes}: "
                f"resume it on {written} (accelerate launch --num_processes {written}), or start over with --overwrite"
            )
    check_installed(spec.train.report_to)
    precision = choose_precision(spec.train.mixed_precision)
    # A resumed 4-bit run dequantizes as before the interruption, on whichever machine it resumes.
    model_cfg = pin_compute_dtype(spec, previous).model
    check_sharded_storage(model_cfg, precision.mixed_precision)
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed)
    # Seeded before anything random (a fresh classification head, the adapter's init), so a run
    # is a function of its recipe, also when several run in one process.
    torch.manual_seed(spec.train.seed)
    random.seed(spec.train.seed)
    model = load_model(model_cfg, data.label_names)
    variant = adapt(model, spec, head_modules(model, spec.model.task))
    trainable, total = variant.parameter_counts()
    layout = layout_of(spec, state.num_processes)

    console.print(f"model {spec.model.name} ({type(model).__name__}) · adapter {variant.name} · {len(variant.layers)} layers adapted")
    console.print(param_line(trainable, total))
    for line in variant.notes():
        console.print(line, markup=False, soft_wrap=True)
    console.print(
        f"data: {data.format}, {len(data.train) if data.packing is None else data.packing.examples} train / "
        f"{len(data.eval) if data.eval is not None else 0} eval examples"
        + (f" ({report_line(data.report)})" if report_line(data.report) else "")
    )
    if data.packing is not None:
        console.print(data.packing.summary(spec.train.batch_size), soft_wrap=True)
    processes = f"{state.num_processes} process{'es' if state.num_processes > 1 else ''} on {state.device.type}"
    console.print(
        f"{processes} · global batch {layout.global_batch} = batch_size {layout.batch_size} x grad_accum "
        f"{layout.grad_accum} x {layout.processes} process{'es' if layout.processes > 1 else ''} · lr {spec.train.lr:g} (not rescaled)",
        soft_wrap=True,
    )
    console.print(f"precision: {'fp32' if precision.mixed_precision == 'no' else precision.mixed_precision} ({precision.reason})", soft_wrap=True)

    # Everything is validated: only now do we touch the disk (the main process only).
    if main and run_dir.exists() and checkpoint is None:
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
        "packing": data.packing.as_dict(spec.train.batch_size) if data.packing is not None else None,
        "processes": state.num_processes,
        "global_batch": layout.global_batch,
        "precision": precision.as_dict(),
        # model.compute_dtype: auto as resolved on this machine (a 4-bit base dequantizes to it);
        # merge, export and eval of the run use it wherever they run (lorafam.run.pin_compute_dtype).
        "compute_dtype": compute_dtype(model_cfg) if model_cfg.quantization in FOUR_BIT else None,
        "status": "training",
    }
    if checkpoint is not None:
        info["resumed_from"] = [*previous.get("resumed_from", []), checkpoint.step]
        if main:
            discard_after(run_dir, checkpoint.step)
    if main:
        save_run_files(run_dir, spec, tokenizer, info)
    state.wait_for_everyone()

    def write_info() -> None:
        if main:
            write_json(run_dir / RUN_INFO, info)

    # Trackers get every metrics row; their files (TensorBoard's) go under the run folder.
    trackers = Trackers(spec.train.report_to, run_dir, spec.model_dump(mode="json"), precision.mixed_precision, cpu)
    try:
        def fit(dataset: Any, steps: int | None, phase: str) -> Any:
            subset = dataclasses.replace(data, train=dataset, eval=None)
            return run_training(spec, model, variant, tokenizer, subset, run_dir, console, phase=phase, steps=steps,
                                precision=precision, on_row=trackers.log)

        if checkpoint is not None and previous.get("prepare"):
            prepared = previous["prepare"]  # decided before the interruption: rebuild, do not re-decide
            variant.restore(prepared)
        else:
            prepared = variant.prepare(fit, data.train, spec.train.seed)
        if prepared:
            info["prepare"] = prepared
            trainable, total = variant.parameter_counts()
            info["trainable_params"] = trainable
            write_info()  # a resumed run rebuilds the same structure from it
            console.print(param_line(trainable, total) + " (after prepare)")
        try:
            result = run_training(spec, model, variant, tokenizer, data, run_dir, console, resume=checkpoint, precision=precision,
                                  on_row=trackers.log)
        except TrainingStopped as stopped:
            info |= {"status": stopped.status, "stopped_at_step": stopped.step}
            write_info()
            raise
        # Every process: sharded weights are gathered (FSDP2 by the variant, ZeRO-3 here).
        with gathered(variant.live_tensors().values()):
            save_adapter(run_dir, variant, spec, writes=main)
            artifacts = variant.write_artifacts(run_dir) if main else []
            report = variant.report()
        trackers.log_images(artifacts, result.steps)
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
            "report": report,
            "skipped_steps": result.skipped_steps,
            "peak_memory": peak_memory(),
        }
        write_info()
        if main:  # README.md model card, from the final run.json
            write_run_card(run_dir, spec, info)
        state.wait_for_everyone()
        if result.skipped_steps:
            console.print(f"skipped {result.skipped_steps} of {result.steps} optimizer steps for a non-finite loss (train.on_nan: skip)", soft_wrap=True)
        if report_line(data.report):
            console.print(f"data rows left out or cut: {report_line(data.report)} (counts in {run_dir / RUN_INFO})", soft_wrap=True)
        console.print(f"saved adapter to {run_dir} ({result.steps} steps in {result.seconds:.0f} s)")
        return RunResult(run_dir, info, model=model, variant=variant, training=result)
    finally:
        trackers.finish()


@dataclass
class EvalResult:
    metrics: dict[str, float]
    what: str  # "adapter in RUN" or "base model NAME"
    examples: int
    precision: str  # what the eval ran in


def evaluate(target: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> EvalResult:
    """The recipe's eval split scored by a run's adapter (``target`` a run folder) or by the
    recipe's base model as it is (``target`` a recipe file; e.g. a merged folder as model.name).

    Same device, precision and batches as ``train``'s own eval, so the numbers match it.
    """
    from accelerate import Accelerator

    from lorafam.data import make_collator, prepare_data
    from lorafam.evaluate import evaluate as run_eval
    from lorafam.hardware import choose_precision, use_cpu
    from lorafam.merge import load_adapted
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.run import is_run_folder, open_run
    from lorafam.tasks import get_task

    target = Path(target)
    # A folder, or a missing path that is no YAML file, was meant as a run folder: open_run says what is wrong.
    if is_run_folder(target) or target.is_dir() or (not target.exists() and target.suffix not in (".yaml", ".yml")):
        run = open_run(target)
        spec, label_names = run.recipe, run.label_names
        if overrides:
            raise LorafamError("eval RUN_DIR takes no --set: the run's recipe is fixed; eval a recipe instead")
        model, _ = load_adapted(run)
        what = f"adapter in {target}"
    else:
        spec, label_names = load_recipe(target, list(overrides)), None
        model = None
        what = f"base model {spec.model.name}"
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed, label_names)
    if data.eval is None:
        raise LorafamError("the recipe has no eval data: set data.eval or data.eval_split")
    if model is None:
        model = load_model(spec.model, data.label_names)
    precision = choose_precision(spec.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=use_cpu())
    if next(model.parameters()).device != accelerator.device:  # (4-bit models refuse .to)
        model = model.to(accelerator.device)
    task = get_task(spec.model.task)
    in_train_precision = spec.train.eval_precision == "train"
    metrics = run_eval(
        task.loss_module(model), task, data.eval, make_collator(tokenizer, spec.model.task),
        spec.train.eval_batch_size or spec.train.batch_size, spec.train.eval_max_batches,
        accelerator.autocast if in_train_precision else nullcontext,
    )
    ran_in = precision.mixed_precision if in_train_precision and precision.mixed_precision != "no" else "fp32"
    return EvalResult(metrics, what, len(data.eval), ran_in)


def merge(run_dir: str | Path, output: str | Path, **options: Any) -> Any:
    """Fold a run's adapter into its base weights; see ``lorafam.merge.merge_run`` for ``options``."""
    from lorafam.merge import merge_run

    return merge_run(run_dir, output, **options)


def compare(
    recipe: str | Path, variants: str | list[str], overrides: list[str] | tuple[str, ...] = (),
    output: str | Path | None = None, console: Console | None = None,
) -> list[dict[str, Any]]:
    """Train ``recipe`` once per variant (``"all"``, ``"lora,dora"`` or a list) and measure them side
    by side; returns the rows also written to ``output``/compare.json (see lorafam.compare)."""
    from lorafam.compare import compare as run_compare
    from lorafam.compare import parse_variants

    names = parse_variants(variants if isinstance(variants, str) else ",".join(variants))
    recipe = Path(recipe)
    folder = Path(output) if output is not None else Path("runs") / f"compare-{recipe.stem}"
    return run_compare(recipe, names, list(overrides), folder, console or Console())
