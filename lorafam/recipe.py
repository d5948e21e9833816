"""Typed, strict YAML recipes.

A recipe has five sections: ``model``, ``adapter``, ``data``, ``train`` and ``output_dir`` (and
``preference`` for model.task preference). Unknown
keys and wrong types fail at load with the key's path and what was expected. The ``adapter``
section's schema is the chosen variant's ``Config`` (see ``lorafam.adapters``), so a VeRA key on a
LoRA recipe is an unknown key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafam.adapters import VARIANTS
from lorafam.data.formats import FORMATS, packing_refusal
from lorafam.errors import LorafamError
from lorafam.tasks import TASKS, Task
from lorafam.tasks.preference import PreferenceConfig
from lorafam.tracking import TRACKERS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(description="Hub id, local folder, or packaged alias (smollm2-135m, minilm-l6).")
    task: Literal[tuple(TASKS)] = Field(  # type: ignore[valid-type]
        "causal-lm", description="; ".join(task.description for task in TASKS.values()) + "."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the base weights are loaded in."
    )
    trust_remote_code: bool = Field(False, description="Run model code from the hub repo (off by default).")
    base_dropout: Literal["off", "keep"] = Field(
        "off",
        description="The base model's own dropout (BERT's hidden/attention dropout) while training. off: every "
        "rate 0, so a step does not depend on its batch layout; keep: the config's rates (as PEFT and "
        "transformers' Trainer), masks drawn in row order, so batch 8 and 4 x grad_accum 2 differ.",
    )
    quantization: Literal["nf4", "fp4", "int8"] | None = Field(
        None,
        description="Load the base quantized with bitsandbytes (QLoRA: nf4); its linear layers are "
        "frozen 4-/8-bit, the adapter trains in fp32 on top. null: unquantized.",
    )
    double_quant: bool | None = Field(
        None, description="nf4/fp4: also quantize the quantization constants (saves ~0.37 bits/param); default on."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="nf4/fp4: dtype the 4-bit weights are dequantized to for each matmul. auto: bfloat16 (the "
        "QLoRA paper's) where the hardware runs bf16 natively, else float32 (emulated bf16 is many times slower).",
    )

    start_from: str | None = Field(
        None,
        description="A finished run folder whose model (adapter merged in) is this run's base, e.g. an SFT run "
        "before DPO; model.name must be the base that run trained on. null: model.name as it is.",
    )

    @model_validator(mode="after")
    def _start_from_keys(self) -> "ModelConfig":
        if self.start_from is not None and self.quantization is not None:
            raise ValueError(
                "model.start_from with model.quantization is not supported: the merged start model is built in "
                "memory, unquantized; set model.quantization: null"
            )
        return self

    @model_validator(mode="after")
    def _quantization_keys(self) -> "ModelConfig":
        if self.double_quant and self.quantization not in ("nf4", "fp4"):
            raise ValueError(
                f"model.double_quant applies to nf4/fp4 quantization only (model.quantization is "
                f"{self.quantization}); remove it"
            )
        return self


class DataConfig(Section):
    train: str = Field(description="Training data: packaged alias, local JSON/JSONL/CSV/Parquet file, or hub dataset.")
    eval: str | None = Field(None, description="Eval data; when absent, eval_split of train is held out.")
    eval_split: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction of train held out when eval is absent.")
    format: Literal[("auto", *FORMATS)] = Field(  # type: ignore[valid-type]  # the format registry's names
        "auto", description="Row format; auto picks it from the columns."
    )
    max_length: int = Field(512, ge=8, description="Tokens per example.")
    too_long: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer examples.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    response_only: bool = Field(True, description="Loss on the response only for instruction/chat data.")
    packing: bool = Field(
        False,
        description="Put several whole training examples in each row, up to max_length (position ids "
        "restart per example, no attention or labels across examples): less padding, same loss. "
        "batch_size then counts packed rows. causal-lm only; eval rows stay one example each.",
    )


class TrainConfig(Section):
    max_steps: int | None = Field(
        None, ge=0, description="Optimizer steps; or give epochs. 0: none (e.g. a searched GLoRA subnet kept as the search left it)."
    )
    epochs: float | None = Field(None, gt=0, description="Passes over the training data (if max_steps unset).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (variants such as LoRA+ scale it per group).")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled (AdamW) weight decay.")
    optimizer: Literal["adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw",
        description="adamw_8bit / paged_* are bitsandbytes' (8-bit state; paged state spills to CPU "
        "RAM under GPU memory pressure, CUDA only: on CPU they run unpaged).",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables it.")
    seed: int = Field(42, description="Seeds adapter init, the eval split, batch order and dropout.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] | None = Field(
        "auto",
        description="Autocast dtype. auto: bf16 where the hardware runs it natively (a bf16 GPU, a CPU "
        "with AMX or AVX512_BF16), else fp32 (no); fp16 only when asked; null: from `accelerate launch`'s config.",
    )
    eval_precision: Literal["fp32", "train"] = Field(
        "fp32",
        description="fp32: evaluate without autocast, so numbers compare across runs and precisions; "
        "train: in the training precision (faster).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    frozen_weights: Literal["hold", "recast", "copy"] = Field(
        "hold",
        description="Under bf16/fp16 autocast, the frozen fp32 weights of linear layers. hold: held in the "
        "autocast dtype through the training steps (the values autocast rounds them to anyway: the same "
        "adapter, bit for bit), their exact values in an unlinked file beside the run, back for fp32 evals "
        "and at the end: half their memory and no per-step cast. recast: kept fp32, with no autocast copy "
        "kept for backward but a second cast there (slower). copy: autocast's own way (a copy per step). "
        "hold and recast do nothing under FSDP or DeepSpeed; recast not with compile or "
        "gradient_checkpointing; hold leaves weights tied to an embedding and those DoRA, GLoRA and "
        "Delta-LoRA read themselves.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each repeated block (decoder layer) with its adapters, in place; the "
        "first steps pay the compilation.",
    )
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl rows.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    save_every: int | None = Field(None, ge=1, description="Write a checkpoint every N steps.")
    keep_last: int | None = Field(3, ge=1, description="Checkpoints kept on disk (the oldest are removed); null keeps all.")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue from the run folder's newest complete checkpoint (as --resume)."
    )
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss or gradient: stop the run, or skip that optimizer step and go on."
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Defaults to batch_size.")
    eval_max_batches: int | None = Field(None, ge=1, description="Cap eval cost on large eval sets.")
    report_to: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Experiment trackers, through Accelerate: " + ", ".join(TRACKERS) + ". They get metrics.jsonl's "
        "rows, the recipe and the variant's plots; metrics.jsonl is always written.",
    )
    sample_prompt: str | None = Field(None, description="Causal LMs: generate from this prompt before and after.")
    sample_max_new_tokens: int = Field(40, ge=1, description="Length of the generation sample.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false; that is the "no" mixed precision the user meant.
        return "no" if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _steps_or_epochs(cls, data: Any) -> Any:
        # max_steps wins when both are given (as in transformers' Trainer); neither means one epoch.
        if isinstance(data, dict) and data.get("max_steps") is None and data.get("epochs") is None:
            data = {**data, "epochs": 1.0}
        return data


def _adapter_union() -> Any:
    configs = tuple(v.Config for v in VARIANTS.values())
    if len(configs) == 1:
        return configs[0]
    return Annotated[Union[configs], Field(discriminator="variant")]


class Recipe(Section):
    model: ModelConfig
    adapter: _adapter_union()  # type: ignore[valid-type]
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    preference: PreferenceConfig | None = Field(
        None, description="model.task preference only: the objective and its constants (null: DPO, beta 0.1)."
    )
    output_dir: str = Field(description="Run folder for the adapter, checkpoints and metrics.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        self.adapter.check_recipe(self)
        if self.data.packing and (refusal := packing_refusal(self.data.format, self.model.task)):
            raise ValueError(refusal)
        if self.preference is not None and self.model.task != "preference":
            raise ValueError(f"preference: applies to model.task preference only (this recipe trains {self.model.task})")
        variant = VARIANTS[self.adapter.variant]
        if self.adapter.target_parameters and not variant.supports_expert_parameters:
            able = ", ".join(name for name, v in VARIANTS.items() if v.supports_expert_parameters)
            raise ValueError(
                f"adapter.target_parameters: {variant.name} cannot adapt fused expert weights "
                f"({self.adapter.target_parameters[0]}): {variant.expert_parameters_reason}; remove "
                f"adapter.target_parameters, or pick a variant that adapts them: {able}"
            )
        if self.model.quantization is not None and not variant.supports_quantized_base:
            able = ", ".join(name for name, v in VARIANTS.items() if v.supports_quantized_base)
            raise ValueError(
                f"adapter.variant: {variant.name} cannot train on a quantized base "
                f"(model.quantization: {self.model.quantization}): {variant.quantized_base_reason}; "
                "set model.quantization: null (model.dtype: bfloat16 halves memory instead), or "
                f"pick a variant that supports a quantized base: {able}"
            )
        return self

    @property
    def task(self) -> Task:
        """The task object ``model.task`` names (lorafam.tasks): what a batch holds, its loss and metrics."""
        return TASKS[self.model.task].for_recipe(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; any problem is one LorafamError line."""
    path = Path(path)
    if not path.is_file():
        raise LorafamError(f"recipe {path} not found; pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise LorafamError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise LorafamError(f"{path}: a recipe is a YAML mapping with model, adapter, data and train sections")
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("output_dir", str(Path("runs") / path.stem))
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    adapter = raw.get("adapter")
    if isinstance(adapter, dict):
        variant = adapter.get("variant", "lora")
        if variant not in VARIANTS:
            raise LorafamError(
                f"{source}: adapter.variant: unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        adapter.setdefault("variant", variant)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LorafamError(f"{source}: {format_validation_error(e)}") from None
    except ValueError as e:  # raised by cross-section checks
        raise LorafamError(f"{source}: {e}") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--set section.key=value``; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise LorafamError(f"--set {item!r}: expected section.key=value, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise LorafamError(f"--set {item!r}: the value is not valid YAML") from None
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LorafamError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def format_validation_error(error: ValidationError) -> str:
    """The first problem as 'key.path: what was expected (got X)'."""
    # A misspelt key also shows up as a missing required one; the misspelling is the useful report.
    first = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    loc = [str(p) for p in first["loc"]]
    # The discriminated adapter union inserts the variant's tag into the path; users never wrote it.
    if len(loc) > 1 and loc[0] == "adapter" and loc[1] in VARIANTS:
        del loc[1]
    key = ".".join(loc) or "recipe"
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], error)
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{key}: unknown key{hint}"
    if kind == "missing":
        return f"{key}: required key is missing"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = first.get("input")
    got_text = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    more = f" [+{len(error.errors()) - 1} more]" if len(error.errors()) > 1 else ""
    return f"{key}: {message}{got_text}{more}"


def _allowed_keys(loc: list[str], error: ValidationError) -> list[str]:
    sections: dict[str, type[BaseModel]] = {
        "model": ModelConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "preference": PreferenceConfig,
    }
    if not loc:
        return list(Recipe.model_fields)
    if loc[0] == "adapter":
        for e in error.errors():
            if len(e["loc"]) > 1 and e["loc"][0] == "adapter" and e["loc"][1] in VARIANTS:
                return list(VARIANTS[e["loc"][1]].Config.model_fields)
        return list(next(iter(VARIANTS.values())).Config.model_fields)
    section = sections.get(loc[0])
    return list(section.model_fields) if section and len(loc) == 1 else []
