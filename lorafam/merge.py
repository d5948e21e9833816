"""Fold a run's adapter into its base weights and write a plain transformers model folder.

A run trained on a quantized base (``model.quantization``) is merged into the *dequantized* base it
was trained against, W_deq + delta, not into the original float weights: the adapter learned its
update relative to W_deq (in part it learned to correct W_deq's quantization error), so W_deq + delta
is the function that was trained and evaluated, while W + delta would add that correction a second
time. The merged model is float, in the recipe's ``model.dtype`` (float32 by default, which holds
W_deq + delta exactly). ``requantize`` writes it back 4-bit (or 8-bit) and measures what that costs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafam.errors import LorafamError
from lorafam.modeling import head_modules, load_model, load_tokenizer
from lorafam.run import LoadedRun, adapt, load_adapter_weights, open_run

#: Text of the fixed batch on which a re-quantized merge is compared with the float one.
PROBE_TEXT = (
    "Once upon a time, a small robot learned to read. The quick brown fox jumps over the lazy dog; "
    "what is the capital of France? Paris is the capital of France."
)


@dataclass
class MergeResult:
    path: Path
    #: Re-quantized merges: max |logit difference| vs the float merge on the PROBE_TEXT batch.
    requantize_max_logit_diff: float | None = None


def load_adapted(run: LoadedRun) -> tuple[torch.nn.Module, "object"]:
    """The run's base model with its trained adapter loaded (not merged).

    A run trained on a quantized base loads quantized, as trained.
    """
    model = load_model(run.recipe.model, run.label_names)
    variant = adapt(model, run.recipe, head_modules(model, run.recipe.model.task), run.info.get("prepare"))
    load_adapter_weights(variant, run.folder)
    return model, variant


def merged_model(run: LoadedRun) -> torch.nn.Module:
    """The run's model with its adapter folded in: plain float linears, no adapter layers."""
    from lorafam.quant import dequantize_model, has_quantized_layers

    model, variant = load_adapted(run)
    merged = variant.merge()  # quantized layers: W_deq + delta, one layer dequantized at a time
    if has_quantized_layers(merged) or run.recipe.model.quantization is not None:
        merged = dequantize_model(merged, getattr(torch, run.recipe.model.dtype))
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


def merge_run(run_dir: str | Path, output: str | Path, requantize: str | None = None) -> MergeResult:
    """Write the merged model to ``output``; with ``requantize`` (nf4/fp4/int8), saved quantized."""
    from lorafam.card import write_model_card
    from lorafam.quant import QUANTIZATIONS

    if requantize is not None and requantize not in QUANTIZATIONS:
        raise LorafamError(f"--requantize {requantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
    run = open_run(run_dir)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorafamError(f"--output {output} exists and is not empty; choose a new folder")
    merged = merged_model(run)
    tokenizer = load_tokenizer(run.recipe.model)
    # Write next to the destination and rename, so a killed merge never leaves a half model folder.
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    result = MergeResult(path=output)
    if requantize is not None:
        quantized_tmp = output.parent / f".{output.name}.tmp-{requantize}"
        shutil.rmtree(quantized_tmp, ignore_errors=True)
        try:
            result.requantize_max_logit_diff = _requantize(run, merged, tokenizer, tmp, quantized_tmp, requantize)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp = quantized_tmp
    write_model_card(tmp, run, "merged", requantize=requantize)
    if output.exists():
        output.rmdir()
    tmp.rename(output)
    return result


def _requantize(run: LoadedRun, merged: torch.nn.Module, tokenizer, folder: Path, target: Path, quantization: str) -> float:
    """Load the float merge in ``folder`` quantized, save it to ``target``; return the logit error."""
    from lorafam.modeling import _auto_class
    from lorafam.quant import bnb_config, keep_training_layout

    cfg = run.recipe.model.model_copy(update={"quantization": quantization})
    if quantization == "int8":
        cfg = cfg.model_copy(update={"double_quant": None})
    quantized = _auto_class(cfg.task).from_pretrained(
        str(folder), quantization_config=bnb_config(cfg), dtype=getattr(torch, cfg.dtype), use_safetensors=True
    )
    keep_training_layout(quantized)  # CPU repacking would not survive save_pretrained's round trip
    batch = tokenizer(PROBE_TEXT, return_tensors="pt")
    with torch.no_grad():
        reference = merged(**batch.to(merged.device)).logits.float()
        requantized = quantized(**batch.to(quantized.device)).logits.float()
    error = (reference - requantized.to(reference.device)).abs().max().item()
    quantized.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return error
