"""`lorafam compare`: the same recipe trained once per variant, measured side by side.

Every variant gets the recipe's model, data, seed, batch order, step budget, lr and precision. Its
adapter section comes from the variant's own recipe (``recipes/<variant>.yaml`` next to the given
recipe, else in ./recipes): the variant's tuned keys (VeRA's r of 256, AdaLoRA's schedule); the
recipe's ``target_modules`` and ``modules_to_save`` apply to all, so every variant adapts the same
layers. ``--set adapter.KEY=...`` overrides a key for every variant that has it.

Each variant trains in its own process (``lorafam train RECIPE --resume``), in its own run folder
under the output folder, so a rerun skips finished variants and resumes an interrupted one, and
each process's peak memory is its own. Eval runs in fp32 whatever the training precision
(``train.eval_precision``), so the numbers compare. Afterwards each adapter is merged in memory and
evaluated again: the merged model must score what the adapter scored.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from lorafam.adapters import VARIANTS
from lorafam.errors import LorafamError
from lorafam.recipe import apply_override, validate_recipe
from lorafam.run import read_metrics, read_run_info

#: Keys every variant takes from the compared recipe, so all adapt the same modules.
SHARED_ADAPTER_KEYS = ("target_modules", "modules_to_save")
FILES = ("compare.json", "compare.md", "eval_loss.png", "quality_vs_params.png", "cost.png")


@dataclass
class Plan:
    """One variant's run: its recipe (as written to the output folder) and notes on how it was made."""

    variant: str
    recipe_path: Path
    run_dir: Path
    notes: list[str]


def parse_variants(text: str) -> list[str]:
    names = list(VARIANTS) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise LorafamError(
            f"--variants: unknown variant {', '.join(map(repr, unknown)) or '(none given)'}; choose from "
            f"{', '.join(VARIANTS)} or 'all'"
        )
    return list(dict.fromkeys(names))


def _variant_adapter(variant: str, recipe_dir: Path) -> tuple[dict[str, Any], str]:
    for folder in (recipe_dir, Path("recipes")):
        path = folder / f"{variant}.yaml"
        if path.is_file():
            raw = yaml.safe_load(path.read_text()) or {}
            adapter = raw.get("adapter")
            if isinstance(adapter, dict) and adapter.get("variant", variant) == variant:
                return dict(adapter), str(path)
    return {"variant": variant}, "the variant's defaults"


def plan(recipe: Path, variants: list[str], overrides: list[str], output: Path) -> list[Plan]:
    """Write one recipe per variant under ``output/recipes`` and say where each came from."""
    if not recipe.is_file():
        raise LorafamError(f"recipe {recipe} not found; pass the path of a YAML recipe (see recipes/)")
    base = yaml.safe_load(recipe.read_text())
    if not isinstance(base, dict):
        raise LorafamError(f"{recipe}: a recipe is a YAML mapping with model, adapter, data and train sections")
    adapter_overrides = [o for o in overrides if o.strip().startswith("adapter.")]
    for item in overrides:
        if item not in adapter_overrides:
            apply_override(base, item)
    base_adapter = base.get("adapter") or {}
    train = base.setdefault("train", {})
    plans = []
    for variant in variants:
        adapter, source = _variant_adapter(variant, recipe.parent)
        notes = [f"adapter keys from {source}"]
        for key in SHARED_ADAPTER_KEYS:
            if key in base_adapter:
                adapter[key] = base_adapter[key]
        own_keys = set(VARIANTS[variant].Config.model_fields)
        for item in adapter_overrides:
            key = item.split("=", 1)[0].strip().split(".", 1)[1]
            if key.split(".")[0] in own_keys:
                holder = {"adapter": adapter}
                apply_override(holder, item)
            else:
                notes.append(f"--set {item} skipped: {variant} has no key {key}")
        raw = {**base, "adapter": adapter, "train": dict(train), "output_dir": str(output / variant)}
        validate_recipe(json.loads(json.dumps(raw)), source=f"{recipe} as {variant}")  # fail before training
        path = output / "recipes" / f"{variant}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        plans.append(Plan(variant, path, output / variant, notes))
    return plans


def _run_child(plan: Plan, console: Console) -> tuple[int, int]:
    """`lorafam train RECIPE --resume` in a child process, its output passed through; returns
    (exit code, the child's own peak RSS in bytes)."""
    command = [sys.executable, "-m", "lorafam", "train", str(plan.recipe_path), "--resume"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        console.print(f"  [{plan.variant}] {line.rstrip()}", markup=False, soft_wrap=True, highlight=False)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def merge_check(run_dir: Path) -> dict[str, Any]:
    """Merge the run's adapter in memory, time it, and evaluate both: they must agree."""
    import torch

    from lorafam.data import prepare_data
    from lorafam.evaluate import eval_rows_with_reference, evaluate
    from lorafam.merge import load_adapted
    from lorafam.modeling import load_tokenizer
    from lorafam.run import open_run

    run = open_run(run_dir)
    spec, task = run.recipe, run.recipe.task
    tokenizer = load_tokenizer(spec.model)
    data = prepare_data(spec.data, tokenizer, spec.model.task, spec.train.seed, run.label_names)
    if data.eval is None:
        return {"merge_seconds": None, "merged_eval_equal": None}
    model, variant = load_adapted(run)
    collate = task.collator(tokenizer)
    batch_size = spec.train.eval_batch_size or spec.train.batch_size
    data = eval_rows_with_reference(task, data, variant.disabled, tokenizer, batch_size)

    def score(m: torch.nn.Module) -> dict[str, float]:
        return evaluate(task.loss_module(m), task, data.eval, collate, batch_size, spec.train.eval_max_batches)

    adapted = score(model)
    start = time.perf_counter()
    merged_model = variant.merge()
    seconds = time.perf_counter() - start
    merged = score(merged_model)
    difference = abs(merged["loss"] - adapted["loss"])
    return {"merge_seconds": seconds, "merged_eval_loss": merged["loss"], "adapted_eval_loss": adapted["loss"],
            "merged_eval_difference": difference, "merged_eval_equal": difference <= 1e-4 * max(1.0, abs(adapted["loss"]))}


def row_for(plan: Plan, peak_rss: int) -> dict[str, Any]:
    """One variant's numbers, read back from its run folder."""
    info = read_run_info(plan.run_dir)
    rows = read_metrics(plan.run_dir)
    steps = [r for r in rows if "loss" in r and "phase" not in r and r.get("loss") is not None]
    evals = [{"step": r["step"], "loss": r["eval_loss"]} for r in rows if "eval_loss" in r]
    before, after = info.eval_before or {}, info.eval_after or {}
    memory = info.peak_memory
    return {
        "variant": plan.variant,
        "trainable_params": info.trainable_params,
        "trainable_percent": 100 * info.trainable_params / max(info.total_params, 1),
        "final_train_loss": info.final_train_loss,
        "eval_loss_before": before.get("loss"),
        "eval_loss_after": after.get("loss"),
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "median_step_seconds": statistics.median(r["step_seconds"] for r in steps if "step_seconds" in r) if steps else None,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else None,
        # This process's own peak, as the child reported it (a resumed run: the last attempt's).
        "peak_rss_bytes": peak_rss or memory.get("rss_bytes"),
        "peak_cuda_bytes": memory.get("cuda_bytes"),
        "eval_curve": evals,
        "steps": info.steps,
        "precision": info.precision.get("mixed_precision"),
        "run_dir": str(plan.run_dir),
        "notes": plan.notes,
    }


def compare(recipe: Path, variants: list[str], overrides: list[str], output: Path, console: Console) -> list[dict[str, Any]]:
    """Train (or resume, or skip when finished) every variant; write the comparison files."""
    plans = plan(recipe, variants, overrides, output)
    rows = []
    for i, p in enumerate(plans, start=1):
        console.print(f"[{i}/{len(plans)}] {p.variant} -> {p.run_dir} ({'; '.join(p.notes)})", markup=False, soft_wrap=True)
        finished = read_run_info(p.run_dir).status == "complete"
        code, peak = (0, 0) if finished else _run_child(p, console)
        if code != 0:
            raise LorafamError(f"training {p.variant} failed (exit {code}); its output is above, its run folder is {p.run_dir}")
        row = row_for(p, peak)
        row |= merge_check(p.run_dir)
        rows.append(row)
    write_outputs(output, rows, recipe, overrides)
    console.print(markdown_table(rows), markup=False, soft_wrap=True, highlight=False)
    console.print(f"wrote {', '.join(str(output / f) for f in FILES)}", markup=False, soft_wrap=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Outputs


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    classifier = any(r["accuracy_after"] is not None for r in rows)
    quality = ["accuracy before", "accuracy after"] if classifier else ["eval loss before", "eval loss after"]
    header = ["variant", "trainable params", "% of base", "final train loss", *quality, "median s/step",
              "median tokens/s", "peak RSS (MB)", "merge s", "merged eval = adapted"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: -(r["accuracy_after"] or 0) if classifier else (r["eval_loss_after"] or 0)):
        q = [r["accuracy_before"], r["accuracy_after"]] if classifier else [r["eval_loss_before"], r["eval_loss_after"]]
        cells = [
            f"`{r['variant']}`", _fmt(r["trainable_params"]), _fmt(r["trainable_percent"], 3), _fmt(r["final_train_loss"]),
            *(_fmt(v) for v in q), _fmt(r["median_step_seconds"], 3), _fmt(r["median_tokens_per_s"], 0),
            _fmt(r["peak_rss_bytes"] / 2**20 if r["peak_rss_bytes"] else None, 0), _fmt(r.get("merge_seconds"), 2),
            _fmt(r.get("merged_eval_equal")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(output: Path, rows: list[dict[str, Any]], recipe: Path, overrides: list[str]) -> None:
    from lorafam.run import write_json, write_text

    write_json(output / "compare.json", {"recipe": str(recipe), "overrides": overrides, "eval_precision": "see each run's recipe (train.eval_precision)", "rows": rows})
    precisions = sorted({str(r["precision"]) for r in rows})
    text = (
        f"# lorafam compare: {recipe}\n\n"
        f"Overrides: {' '.join(overrides) or 'none'}. Training precision: {', '.join(precisions)}; "
        "eval in fp32 unless the recipe sets train.eval_precision: train.\n\n"
        + markdown_table(rows) + "\n"
    )
    write_text(output / "compare.md", text)
    _plots(output, rows)


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    # The object API with an explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _plots(output: Path, rows: list[dict[str, Any]]) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    for r in rows:
        curve = r["eval_curve"]
        if r["eval_loss_before"] is not None:
            curve = [{"step": 0, "loss": r["eval_loss_before"]}, *curve]
        if curve:
            ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], marker="o", markersize=3, label=r["variant"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss")
    ax.set_title("Eval loss during training")
    ax.legend(fontsize=7)
    _save(fig, output / "eval_loss.png")

    classifier = any(r["accuracy_after"] is not None for r in rows)
    fig = _figure()
    ax = fig.add_subplot()
    for r in rows:
        y = r["accuracy_after"] if classifier else r["eval_loss_after"]
        if y is not None:
            ax.scatter(r["trainable_params"], y)
            ax.annotate(r["variant"], (r["trainable_params"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("final eval accuracy" if classifier else "final eval loss")
    ax.set_title("Quality vs trainable parameters")
    _save(fig, output / "quality_vs_params.png")

    fig = _figure(8.0, 3.6)
    names = [r["variant"] for r in rows]
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.bar(names, [r["median_step_seconds"] or 0 for r in rows])
    left.set_ylabel("median seconds per step")
    right.bar(names, [(r["peak_rss_bytes"] or 0) / 2**20 for r in rows])
    right.set_ylabel("peak RSS (MB)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle("Cost per variant")
    _save(fig, output / "cost.png")
