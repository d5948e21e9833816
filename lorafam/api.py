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
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from lorafam.build import param_line, report_line
from lorafam.errors import LorafamError
from lorafam.recipe import Recipe, load_recipe
from lorafam.run import CHECKPOINTS, RUN_INFO, RunFolder, RunInfo
from lorafam.tracking import Trackers


@dataclass
class RunResult:
    """What ``train`` did: the run folder, its run.json, and the trained objects (in-process use)."""

    run_dir: Path
    info: RunInfo
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

    A run: open its folder, build what it trains, let the variant prepare (LoRA-drop's probe run),
    fit, and finish (adapter, artifacts, run.json, card).
    """
    from lorafam.build import build
    from lorafam.hardware import join_processes
    from lorafam.trainer import TrainingStopped

    spec = _recipe(recipe, overrides)
    resume = resume or spec.train.resume == "auto"
    if resume and overwrite:
        raise LorafamError("--overwrite starts over and --resume continues: pass one of them")
    state = join_processes()
    console, warn = _outputs(state.is_main_process, console, warn)
    folder = RunFolder.open(spec, overwrite, resume, writes=state.is_main_process, warn=warn, processes=state.num_processes)
    if folder.finished:
        console.print(f"{folder.path} already holds this run, finished ({folder.previous.steps} steps); nothing to resume", soft_wrap=True)
        return RunResult(folder.path, folder.previous, already_complete=True)
    if resume and folder.checkpoint is None:
        console.print(f"no complete checkpoint in {folder.path / CHECKPOINTS}; starting from step 0", soft_wrap=True)
    built = build(spec, folder.previous, state.num_processes, say=lambda line: console.print(line, soft_wrap=True))
    built.announce(console, state.device.type)
    info = built.run_info()
    folder.start(spec, built.tokenizer, info, overwrite)  # everything is validated: only now is the disk touched
    state.wait_for_everyone()
    with Trackers(spec.train.report_to, folder.path, spec.model_dump(mode="json"), built.precision.mixed_precision) as trackers:
        try:
            _prepare(built, folder, info, console, trackers)
            result = fit(built, folder, console, resume=folder.checkpoint, on_row=trackers.log)
        except TrainingStopped as stopped:
            info.status, info.stopped_at_step = stopped.status, stopped.step
            folder.write_info(info)
            raise
        _finish(built, folder, info, result, trackers)
        state.wait_for_everyone()
    _say_done(console, built, folder, result)
    return RunResult(folder.path, info, model=built.model, variant=built.variant, training=result)


def _say_done(console: Console, built: Any, folder: RunFolder, result: Any) -> None:
    if result.skipped_steps:
        console.print(f"skipped {result.skipped_steps} of {result.steps} optimizer steps for a non-finite loss (train.on_nan: skip)", soft_wrap=True)
    if report_line(built.data.report):
        console.print(f"data rows left out or cut: {report_line(built.data.report)} (counts in {folder.path / RUN_INFO})", soft_wrap=True)
    console.print(f"saved adapter to {folder.path} ({result.steps} steps in {result.seconds:.0f} s)")


def _outputs(main: bool, console: Console | None, warn: Callable[[str], None] | None) -> tuple[Console, Callable[[str], None]]:
    """Where progress and warnings go: nowhere off the main process."""
    if not main:
        return Console(quiet=True), lambda line: None
    return console or Console(), warn or (lambda line: print(line, file=sys.stderr))


def fit(built: Any, folder: RunFolder, console: Console, phase: str = "main", data: Any = None, steps: int | None = None,
        resume: Any = None, on_row: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """One training pass of the built run (lorafam.trainer.train): the main one, or a variant's
    preparatory pass on ``data`` (rows already tokenized) for ``steps`` steps (None: one pass)."""
    from lorafam.trainer import train as run_pass

    subset = built.data if data is None else dataclasses.replace(built.data, train=data, eval=None)
    return run_pass(built.recipe, built.model, built.variant, built.tokenizer, subset, folder, console, phase=phase,
                    steps=steps, resume=resume, precision=built.precision, on_row=on_row)


class PrepareTools:
    """What ``Variant.prepare`` is handed. Called, it runs a preparatory pass through the one training
    loop (``fit(dataset, steps, phase)``); ``fitness`` scores the model as it is now on held-out rows
    (GLoRA's search); ``report_generation`` shows a search's progress; ``save_state`` /
    ``load_state`` and ``save_tensors`` / ``load_tensors`` keep its progress in the run folder so a
    resumed run goes on from it (lorafam.run.RunFolder)."""

    def __init__(self, built: Any, folder: RunFolder, console: Console, on_row: Callable[[dict[str, Any]], None]):
        self.built, self.folder, self.console, self.on_row = built, folder, console, on_row
        self.save_state, self.load_state = folder.save_state, folder.load_state
        self.save_tensors, self.load_tensors = folder.save_prepared_tensors, folder.load_prepared_tensors
        self.progress: Any = None

    def __call__(self, dataset: Any, steps: int | None, phase: str) -> Any:
        resume = self.folder.phases.get(phase)  # a resumed run killed inside this pass goes on from its checkpoint
        return fit(self.built, self.folder, self.console, phase=phase, data=dataset, steps=steps, resume=resume, on_row=self.on_row)

    def fitness(self, max_examples: int) -> float:
        """The task's search fitness (minus the eval loss; a classifier's accuracy) on the first
        ``max_examples`` eval rows, forward only in fp32, over every process."""
        from lorafam.distributed import rank, world_size
        from lorafam.evaluate import evaluate as run_eval

        built, task, cfg = self.built, self.built.recipe.task, self.built.recipe.train
        if built.data.eval is None:
            raise LorafamError("adapter.search scores structures on held-out rows: set data.eval, or data.eval_split above 0")
        rows = built.data.eval.select(range(min(max_examples, len(built.data.eval))))
        metrics = run_eval(task.loss_module(built.model), task, rows, task.collator(built.tokenizer),
                           cfg.eval_batch_size or cfg.batch_size, None, nullcontext, rank(), world_size())
        return task.search_fitness(metrics)

    def report_generation(self, generation: int, total: int, best: float, params: int) -> None:
        """A progress bar of the generations with the best fitness so far (a line each off a terminal)."""
        if not self.console.is_terminal:
            self.console.print(f"search generation {generation}/{total}: best fitness {best:.4f} ({params:,} adapter params)", soft_wrap=True)
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.progress = Progress(
                TextColumn("search generation {task.completed}/{task.total}"), BarColumn(),
                TextColumn("best fitness {task.fields[best]:.4f} ({task.fields[params]:,} adapter params)"),
                TimeElapsedColumn(), console=self.console,
            )
            self.progress.add_task("search", total=total, completed=generation - 1, best=best, params=params)
            self.progress.start()
        self.progress.update(0, completed=generation, best=best, params=params)
        if generation == total:
            self.progress.stop()


def _prepare(built: Any, folder: RunFolder, info: RunInfo, console: Console, trackers: Trackers) -> None:
    """The variant's prepare phase (LoRA-drop's probe run), or on resume the structure it decided."""
    variant = built.variant
    if folder.checkpoint is not None and folder.previous.prepare:
        prepared = folder.previous.prepare  # decided before the interruption: rebuild, do not re-decide
        variant.restore(prepared)
    else:
        prepared = variant.prepare(PrepareTools(built, folder, console, trackers.log), built.data.train, built.recipe.train.seed)
    if prepared:
        trainable, total = variant.parameter_counts()
        info.prepare, info.trainable_params = prepared, trainable
        folder.write_info(info)  # a resumed run rebuilds the same structure from it
        console.print(param_line(trainable, total) + " (after prepare)")


def _finish(built: Any, folder: RunFolder, info: RunInfo, result: Any, trackers: Trackers) -> None:
    """The adapter, the variant's artifacts, the final run.json and the model card."""
    from lorafam.distributed import gathered

    variant = built.variant
    # Every process: sharded weights are gathered (FSDP2 by the variant, ZeRO-3 here).
    with gathered(variant.live_tensors().values()):
        folder.save_adapter(variant, built.recipe)
        artifacts = folder.write_artifacts(variant)
        report = variant.report()
    trackers.log_images(artifacts, result.steps)
    info.status, info.steps, info.seconds = "complete", result.steps, round(result.seconds, 1)
    info.eval_before, info.eval_after, info.final_train_loss = result.eval_before, result.eval_after, result.final_train_loss
    info.sample_before, info.sample_after = result.sample_before, result.sample_after
    info.artifacts = [str(p.relative_to(folder.path)) for p in artifacts]
    info.report, info.skipped_steps, info.peak_memory = report, result.skipped_steps, peak_memory()
    folder.write_info(info)
    folder.write_card(built.recipe, info)


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

    from lorafam.data import prepare_data
    from lorafam.evaluate import eval_rows_with_reference
    from lorafam.evaluate import evaluate as run_eval
    from lorafam.hardware import choose_precision, use_cpu
    from lorafam.merge import load_adapted
    from lorafam.modeling import load_model, load_tokenizer
    from lorafam.run import is_run_folder, open_run

    target = Path(target)
    # A folder, or a missing path that is no YAML file, was meant as a run folder: open_run says what is wrong.
    if is_run_folder(target) or target.is_dir() or (not target.exists() and target.suffix not in (".yaml", ".yml")):
        run = open_run(target)
        spec, label_names = run.recipe, run.label_names
        if overrides:
            raise LorafamError("eval RUN_DIR takes no --set: the run's recipe is fixed; eval a recipe instead")
        model, variant = load_adapted(run)
        reference = variant.disabled  # the model the run started from: its base, the adapter off
        what = f"adapter in {target}"
    else:
        spec, label_names = load_recipe(target, list(overrides)), None
        model, reference = None, None
        what = f"base model {spec.model.name}"
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed, label_names)
    if data.eval is None:
        raise LorafamError("the recipe has no eval data: set data.eval or data.eval_split")
    if model is None:
        model = load_model(spec.model, data.label_names)
        reference = lambda: nullcontext(model)  # noqa: E731  (the base scored as it is)
    task = spec.task
    data = eval_rows_with_reference(task, data, reference, tokenizer, spec.train.eval_batch_size or spec.train.batch_size)
    precision = choose_precision(spec.train.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision, cpu=use_cpu())
    if next(model.parameters()).device != accelerator.device:  # (4-bit models refuse .to)
        model = model.to(accelerator.device)
    in_train_precision = spec.train.eval_precision == "train"
    metrics = run_eval(
        task.loss_module(model), task, data.eval, task.collator(tokenizer),
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
