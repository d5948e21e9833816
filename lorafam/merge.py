"""Fold a run's adapter into its base weights, write a plain transformers model folder, and check it.

A run trained on a quantized base (``model.quantization``) is merged into the *dequantized* base it
was trained against, W_deq + delta, not into the original float weights: the adapter learned its
update relative to W_deq (in part it learned to correct W_deq's quantization error), so W_deq + delta
is the function that was trained and evaluated, while W + delta would add that correction a second
time. The merged model is float, in the recipe's ``model.dtype`` (float32 by default, which holds
W_deq + delta exactly). ``requantize`` writes it back 4-bit (or 8-bit) and measures what that costs.

**The check.** A merged folder is only right if what *transformers* reads back from it computes what
the adapted model computed: a tensor the config does not declare is silently dropped on load (a bias
a GLoRA merge added to a layer whose config has none was, before this check). So after writing,
``merge_run`` reloads the folder with plain ``from_pretrained`` (no lorafam code in the load) and
compares its logits on a fixed probe batch with the adapted model's, both in fp32 (a quantized base:
the adapted model on its dequantized weights, the function the merge promises). Beyond
``CHECK_TOLERANCE`` it names the first module whose output differs, removes what it wrote and raises
``MergeCheckFailed``.
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafam.errors import LorafamError
from lorafam.tasks import get_task
from lorafam.modeling import _auto_class, bias_switches, head_modules, load_model, load_tokenizer, model_from_config_on_meta
from lorafam.run import LoadedRun, adapt, load_adapter_weights, open_run

#: Texts of the fixed probe batch (padded to one batch of two rows, at most PROBE_MAX_TOKENS each):
#: the merge check runs on it, and a re-quantized merge is compared with the float one on it.
PROBE_TEXTS = (
    "Once upon a time, a small robot learned to read. The quick brown fox jumps over the lazy dog; "
    "what is the capital of France? Paris is the capital of France.",
    "the cat sat on the mat and ran to see the big red tree",
)
PROBE_MAX_TOKENS = 64

#: The merge check's tolerance on max |logit difference| between the reloaded folder and the adapted
#: model, as a fraction of the probe's logit scale (the adapted model's max |logit|, at least 1), by
#: the dtype the merged weights are saved in. float32: a merge changes only the order of the sums,
#: measured at 1e-7..3e-6 of the scale (tiny test models, SmolLM2), so 1e-4 leaves 30x room while
#: a real fault is far larger (a dropped GLoRA bias on a tiny Llama: 0.4-0.6). 16-bit: the saved
#: weights are W + delta rounded to 8 (bf16) or 11 (fp16) significant bits, which alone moved
#: SmolLM2's logits by up to 8.6e-3 (bf16) and 1.6e-3 (fp16) of the scale
#: (benchmarks/merge_check.py); the bounds are about 6x that.
CHECK_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


class MergeCheckFailed(LorafamError):
    """The folder merge wrote does not reload to the adapted model; nothing is left on disk."""

    exit_code = 1  # not bad input (exit 2): the merge itself went wrong


@dataclass
class MergeCheck:
    """What the check measured: reloaded folder vs adapted model on the probe batch, fp32 logits."""

    max_logit_diff: float
    tolerance: float
    logit_scale: float
    saved_dtype: str
    tokens: int


@dataclass
class MergeResult:
    path: Path
    #: Re-quantized merges: max |logit difference| vs the float merge on the probe batch.
    requantize_max_logit_diff: float | None = None
    #: None with ``verify=False``.
    check: MergeCheck | None = None
    #: Config flags merge switched on so that biases the adapter added load (e.g. attention_bias).
    bias_flags: list[str] = field(default_factory=list)


def load_adapted(run: LoadedRun) -> tuple[torch.nn.Module, "object"]:
    """The run's base model with its trained adapter loaded (not merged).

    A run trained on a quantized base loads quantized, as trained.
    """
    model = load_model(run.recipe.model, run.label_names)
    variant = adapt(model, run.recipe, head_modules(model, run.recipe.model.task), run.info.prepare)
    load_adapter_weights(variant, run.folder)
    return model, variant


def merged_model(run: LoadedRun) -> torch.nn.Module:
    """The run's model with its adapter folded in: plain float linears, no adapter layers."""
    model, variant = load_adapted(run)
    return _fold(variant, getattr(torch, run.recipe.model.dtype))


def _as_float32_reference(model: nn.Module) -> nn.Module:
    """The adapted model, in place, as the function the merge must reproduce: every base weight
    dense (a quantized base dequantized: what the merge folds into) and everything in fp32."""
    from lorafam.quant import dequantize_model, has_quantized_layers

    if has_quantized_layers(model) or getattr(model, "hf_quantizer", None) is not None:
        dequantize_model(model, torch.float32)
    return model.float().eval()


def _reference_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: str, dtype: torch.dtype) -> torch.Tensor:
    """The adapted model's fp32 probe logits, leaving the model in its own dtypes afterwards.

    Widening a 16-bit float to fp32 and back is exact, so the merge that follows sees the same
    weights bit for bit and writes the same files as a merge with ``--no-verify``. A quantized base
    comes back dense in ``dtype``, the dtype its weights were quantized from.
    """
    tensors = lambda: list(model.named_parameters()) + list(model.named_buffers())  # noqa: E731
    before = {name: tensor.dtype for name, tensor in tensors()}
    logits = probe_logits(_as_float32_reference(model), batch, task)
    for name, tensor in tensors():
        own = before.get(name)
        target = own if own is not None and own.is_floating_point else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return logits


def _fold(variant: Any, dtype: torch.dtype) -> nn.Module:
    """Merge ``variant`` into its model and return a plain model in ``dtype``, ready to save."""
    from lorafam.quant import dequantize_model

    merged = variant.merge()  # quantized layers: W_deq + delta, one layer dequantized at a time
    # Also drops the quantization config and casts what is left (the same thing on a float model).
    merged = dequantize_model(merged, dtype)
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


def switch_on_biases(model: nn.Module) -> list[str]:
    """Make ``model.config`` declare the biases merging added to linear layers built without one.

    Returns the config flags switched on (e.g. Llama's ``attention_bias``). Every layer the new
    config gives a bias gets one (zero where the merge made none), so the saved folder holds every
    tensor its config asks for and ``from_pretrained`` initializes nothing by itself.
    """
    config = getattr(model, "config", None)
    if config is None:
        return []
    declared = dict(model_from_config_on_meta(model, config).named_modules())
    added = [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None
        and isinstance(declared.get(path), nn.Linear) and declared[path].bias is None
    ]
    if not added:
        return []
    switches = bias_switches(model) or {}
    unloadable = [path for path in added if path not in switches]
    if unloadable:  # the variant should have decided this when it was built (see GLoRA.make_layer)
        raise MergeCheckFailed(
            f"merge check failed: the merged {unloadable[0]} has a bias that {type(model).__name__}'s config cannot "
            f"declare ({len(unloadable)} layer(s)), so transformers would drop it on load; nothing was written"
        )
    flags = sorted({switches[path] for path in added})
    for flag in flags:
        setattr(config, flag, True)
    for path, module in model_from_config_on_meta(model, config).named_modules():
        live = model.get_submodule(path) if path else model
        if isinstance(module, nn.Linear) and module.bias is not None and live.bias is None:
            live.bias = nn.Parameter(
                torch.zeros(live.out_features, dtype=live.weight.dtype, device=live.weight.device), requires_grad=False
            )
    return flags


def probe_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """The fixed batch the merge is checked on: two texts, right-padded, with their attention mask."""
    return dict(
        tokenizer(
            list(PROBE_TEXTS), padding=True, truncation=True, max_length=PROBE_MAX_TOKENS,
            return_tensors="pt", return_token_type_ids=False,
        )
    )


def probe_logits(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """fp32 logits on ``batch``, as the task compares them (Task.probe_logits)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return get_task(task).probe_logits(logits, batch)


def _write_folder(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """The merged model's folder as users get it: weights, config, tokenizer."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def merge_run(run_dir: str | Path, output: str | Path, requantize: str | None = None, verify: bool = True) -> MergeResult:
    """Write the merged model to ``output``; with ``requantize`` (nf4/fp4/int8), saved quantized.

    With ``verify`` (the default) the folder is reloaded by plain transformers and checked against
    the adapted model before it is moved into place; on a failed check nothing is left behind.
    The check holds the adapted model in fp32 (a 16-bit model: twice its weight bytes), frees it
    once the folder is written, then reloads the folder in fp32; ``verify=False`` skips both (and
    the two forward passes) on very large models. The files written are the same either way.
    """
    from lorafam.card import write_model_card
    from lorafam.quant import QUANTIZATIONS

    if requantize is not None and requantize not in QUANTIZATIONS:
        raise LorafamError(f"--requantize {requantize!r}: choose one of {', '.join(QUANTIZATIONS)}")
    run = open_run(run_dir)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise LorafamError(f"--output {output} exists and is not empty; choose a new folder")
    task, dtype = run.recipe.model.task, getattr(torch, run.recipe.model.dtype)
    tokenizer = load_tokenizer(run.recipe.model)
    batch = probe_batch(tokenizer)
    model, variant = load_adapted(run)
    reference = _reference_logits(model, batch, task, dtype) if verify else None
    merged = _fold(variant, dtype)
    result = MergeResult(path=output, bias_flags=switch_on_biases(merged))
    # Written next to the destination and renamed only once complete (and checked), so a killed or
    # failed merge never leaves a model folder that is not the adapted model.
    tmp = output.parent / f".{output.name}.tmp"
    quantized_tmp = output.parent / f".{output.name}.tmp-{requantize}"
    for folder in (tmp, quantized_tmp):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        _write_folder(merged, tokenizer, tmp)
        float_logits = probe_logits(merged, batch, task) if requantize is not None else None
        del merged, model, variant  # the check reloads the folder: do not hold two models
        gc.collect()
        if reference is not None:
            result.check = check_folder(run, tmp, batch, reference, dtype)
        if requantize is not None:
            result.requantize_max_logit_diff = _requantize(run, float_logits, tokenizer, batch, tmp, quantized_tmp, requantize)
            shutil.rmtree(tmp)
            tmp = quantized_tmp
        write_model_card(tmp, run, "merged", requantize=requantize)
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    finally:
        for folder in (tmp, quantized_tmp):
            if folder.exists() and folder != output:
                shutil.rmtree(folder, ignore_errors=True)
    return result


def check_folder(
    run: LoadedRun, folder: Path, batch: dict[str, torch.Tensor], reference: torch.Tensor, saved_dtype: torch.dtype
) -> MergeCheck:
    """Reload ``folder`` with plain transformers and compare its fp32 logits with ``reference``.

    Raises MergeCheckFailed (one line: the largest difference, the first module whose output
    differs, any tensor transformers did not load) beyond ``CHECK_TOLERANCE``.
    """
    import transformers

    cfg = run.recipe.model
    verbosity = transformers.utils.logging.get_verbosity()
    # transformers' load report (unexpected/missing keys) is many lines on stderr: the check turns
    # it into part of its one line instead.
    transformers.utils.logging.set_verbosity_error()
    try:
        reloaded, loading = _auto_class(cfg.task).from_pretrained(
            str(folder), dtype=torch.float32, use_safetensors=True, output_loading_info=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    except Exception as e:  # noqa: BLE001 (any failure to load is the finding)
        raise MergeCheckFailed(
            f"merge check failed: transformers cannot load the merged folder ({str(e).splitlines()[0]}); "
            "nothing was written"
        ) from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    reloaded.eval()
    logits = probe_logits(reloaded, batch, cfg.task)
    diff = (logits - reference).abs().max().item() if logits.shape == reference.shape else float("inf")
    scale = max(1.0, reference.abs().max().item())
    rel_tolerance = CHECK_TOLERANCE[saved_dtype]
    check = MergeCheck(
        max_logit_diff=diff, tolerance=rel_tolerance * scale, logit_scale=scale,
        saved_dtype=str(saved_dtype).removeprefix("torch."), tokens=int(batch["attention_mask"].sum()),
    )
    if diff <= check.tolerance:  # False for NaN too
        return check
    module, module_diff, first = locate_difference(run, reloaded, batch, rel_tolerance)
    where = (
        f"first module whose output differs: {module} (by {module_diff:.3g})" if first
        else f"no single module is off by more than the tolerance; largest relative difference at {module} ({module_diff:.3g})"
    )
    unloaded = list(loading.get("unexpected_keys") or [])
    initialized = list(loading.get("missing_keys") or [])
    loading_note = ""
    if unloaded:
        loading_note += f"; transformers did not load {len(unloaded)} tensor(s) of the file, e.g. {_example(unloaded, module)}"
    if initialized:
        loading_note += f"; {len(initialized)} tensor(s) were missing from the file, e.g. {_example(initialized, module)}"
    raise MergeCheckFailed(
        f"merge check failed: reloaded with transformers, the merged model's logits differ from the adapted "
        f"model's by {diff:.3g} (tolerance {check.tolerance:.3g}: {rel_tolerance:g} x logit scale {scale:.3g}, "
        f"{check.saved_dtype} weights, fp32 logits on a fixed probe batch); {where}{loading_note}; nothing was "
        "written (--no-verify writes it unchecked)"
    )


def _example(keys: list[str], module: str) -> str:
    """One of ``keys`` to name: one of ``module``'s own where there is one."""
    own = sorted(k for k in keys if k.startswith(module + "."))
    return (own or sorted(keys))[0]


class _Found(Exception):
    """Stops the reloaded model's forward at the first module whose output differs."""


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def locate_difference(
    run: LoadedRun, reloaded: nn.Module, batch: dict[str, torch.Tensor], rel_tolerance: float
) -> tuple[str, float, bool]:
    """Which module makes the reloaded model differ: (module path, its output difference, first).

    By forward hooks, module by module in the order they finish (a layer before the block that
    holds it): every module's output in the fp32 adapted model is recorded, then the reloaded model
    runs and stops at the first module whose output differs beyond ``rel_tolerance`` of its own
    scale (first=True). Modules are matched by path: an adapter layer sits at the path of the
    linear it wraps, which is where the merged linear sits. If none differs on its own, the module
    with the largest relative difference (first=False). Runs only after a failed check: it loads the
    adapted model a second time.
    """
    adapted, _ = load_adapted(run)
    adapted = _as_float32_reference(adapted)
    recorded: dict[str, torch.Tensor] = {}

    def record(path: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and tensor.is_floating_point() and path not in recorded:
                recorded[path] = tensor.detach().float().cpu()
        return hook

    handles = [m.register_forward_hook(record(path)) for path, m in adapted.named_modules() if path]
    probe_logits(adapted, batch, run.recipe.model.task)
    for handle in handles:
        handle.remove()
    del adapted

    largest: tuple[str, float, float] = ("(none)", 0.0, -1.0)  # path, difference, relative difference
    seen: set[str] = set()

    def compare(path: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            nonlocal largest
            tensor, expected = _first_tensor(output), recorded.get(path)
            if tensor is None or expected is None or path in seen or tensor.shape != expected.shape:
                return
            seen.add(path)
            diff = (tensor.detach().float().cpu() - expected).abs().max().item()
            scale = max(1.0, expected.abs().max().item())
            if not diff <= rel_tolerance * scale:
                largest = (path, diff, float("inf"))
                raise _Found
            if diff / scale > largest[2]:
                largest = (path, diff, diff / scale)
        return hook

    handles = [m.register_forward_hook(compare(path)) for path, m in reloaded.named_modules() if path]
    try:
        probe_logits(reloaded, batch, run.recipe.model.task)
        first = False
    except _Found:
        first = True
    finally:
        for handle in handles:
            handle.remove()
    return largest[0], largest[1], first


def _requantize(
    run: LoadedRun, float_logits: torch.Tensor, tokenizer: Any, batch: dict[str, torch.Tensor],
    folder: Path, target: Path, quantization: str,
) -> float:
    """Load the float merge in ``folder`` quantized, save it to ``target``; return the logit error of
    the saved model as a user reads it (plain ``from_pretrained`` of ``target``).

    Measured on the reloaded folder, not on the model that was saved: on a CPU with AVX512-BF16,
    bitsandbytes repacks a 4-bit layer for its own inference kernel on the first eval forward, which
    rounds differently (0.5% of the error here) from the layout the save needs
    (``keep_training_layout``).
    """
    from lorafam.quant import bnb_config, keep_training_layout

    cfg = run.recipe.model.model_copy(update={"quantization": quantization})
    if quantization == "int8":
        cfg = cfg.model_copy(update={"double_quant": None})
    auto = _auto_class(cfg.task)
    quantized = auto.from_pretrained(
        str(folder), quantization_config=bnb_config(cfg), dtype=getattr(torch, cfg.dtype), use_safetensors=True
    )
    keep_training_layout(quantized)  # CPU repacking would not survive save_pretrained's round trip
    quantized.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    del quantized
    gc.collect()
    reloaded = auto.from_pretrained(str(target))
    return (probe_logits(reloaded, batch, cfg.task) - float_logits).abs().max().item()
