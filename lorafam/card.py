"""Model cards: the README.md that the Hugging Face Hub, PEFT and people read next to the weights.

A card is YAML front matter (the fields the Hub indexes and ``huggingface_hub.ModelCard`` parses:
``base_model``, ``library_name``, ``tags``, ``datasets``, ``pipeline_tag``) and a Markdown body
that says what was trained, how, with what result, and how to load it. Three kinds, one per
folder lorafam writes:

* ``adapter``: the run folder (``library_name: peft``), written when training finishes;
* ``merged``: `lorafam merge`'s transformers folder (``library_name: transformers``);
* ``gguf``: `lorafam export`'s folder (``library_name: gguf``);
* ``gguf-lora``: `lorafam export --format gguf-lora`'s folder: the adapter alone as a llama.cpp LoRA
  GGUF (``library_name: gguf``, ``base_model_relation: adapter``).

Everything comes from the run folder (recipe.yaml, run.json, adapter_config.json), so the card
states only what the run recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from lorafam.adapters import VARIANTS
from lorafam.quant import compute_dtype

if TYPE_CHECKING:
    from lorafam.recipe import Recipe
    from lorafam.run import LoadedRun, RunInfo

CARD_FILE = "README.md"
Kind = Literal["adapter", "merged", "gguf", "gguf-lora"]
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "gguf-lora": "gguf"}

#: Packaged aliases -> the Hub id of the same model (the card's base_model must be a Hub id).
PACKAGED_HUB_IDS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}


def write_model_card(folder: str | Path, run: LoadedRun, kind: Kind, **details: Any) -> Path:
    """Write ``folder/README.md`` for the ``kind`` of folder made from ``run``.

    ``details`` for ``gguf``: ``gguf_file`` (its file name), ``quant``, ``notes`` (lines the export
    wants users to know); for ``merged``: ``requantize`` (nf4/fp4/int8 or None). Returns the path.
    """
    from lorafam.run import write_text

    path = Path(folder) / CARD_FILE
    write_text(path, model_card(run, kind, **details))
    path.chmod(0o644)  # a card is for sharing (write_text's temporary file starts owner-only)
    return path


def write_run_card(run_dir: str | Path, recipe: Recipe, info: RunInfo) -> Path:
    """The run folder's card, from what `lorafam train` has in hand when it finishes
    (call it after run.json is final)."""
    from lorafam.run import LoadedRun, pin_compute_dtype

    run = LoadedRun(recipe=pin_compute_dtype(recipe, info), info=info, folder=Path(run_dir))
    return write_model_card(run_dir, run, "adapter")


def hub_id(name: str) -> str | None:
    """``name`` as a Hub model id, or None for a local folder."""
    if name in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or len(path.parts) > 2:
        return None
    return name


def dataset_id(source: str) -> str | None:
    """A ``data.train`` source as a Hub dataset id (``owner/name[:split]``), or None for packaged
    aliases and local files."""
    from lorafam.data import PACKAGED_DATASETS
    from lorafam.data.sources import looks_like_local_path

    if source in PACKAGED_DATASETS or looks_like_local_path(source):
        return None
    return source.split(":", 1)[0]


def front_matter(run: LoadedRun, kind: Kind) -> dict[str, Any]:
    recipe = run.recipe
    variant = recipe.adapter.variant
    tags = ["lorafam", variant]
    if variant != "lora":
        tags.append("lora")  # every variant here is of the LoRA family; the Hub groups by this tag
    if recipe.model.quantization is not None:
        tags.append("qlora")
    if kind in ("gguf", "gguf-lora"):
        tags += ["llama.cpp", "ollama"]
    data: dict[str, Any] = {}
    base = hub_id(recipe.model.name)
    if base is not None:
        data["base_model"] = base
        data["base_model_relation"] = "adapter" if kind in ("adapter", "gguf-lora") else "finetune"
    data["library_name"] = LIBRARY[kind]
    data["pipeline_tag"] = recipe.task.pipeline_tag
    data["tags"] = tags
    datasets = [d for d in {dataset_id(recipe.data.train), recipe.data.eval and dataset_id(recipe.data.eval)} if d]
    if datasets:
        data["datasets"] = sorted(datasets)
    return data


def model_card(run: LoadedRun, kind: Kind, **details: Any) -> str:
    """The card's full text (front matter + body)."""
    recipe, info = run.recipe, run.info
    variant = VARIANTS[recipe.adapter.variant]
    base = hub_id(recipe.model.name) or recipe.model.name
    shown = hub_id(recipe.model.name) or Path(recipe.model.name).name  # a local folder by its name
    title = {
        "adapter": f"{variant.name} adapter for {shown}",
        "merged": f"{shown} with a {variant.name} adapter merged in",
        "gguf": f"{shown} fine-tuned with {variant.name}, GGUF ({str(details.get('quant', '')).upper()})",
        "gguf-lora": f"{variant.name} adapter for {shown}, as a llama.cpp LoRA GGUF",
    }[kind]
    lines = ["---", yaml.safe_dump(front_matter(run, kind), sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += [_summary(kind), ""]

    lines += ["## Training", ""]
    lines.append(f"- Method: **{variant.name}**" + (f": {variant.paper}" if variant.paper else ""))
    lines.append(f"- Base model: `{recipe.model.name}`" + (f" (`{base}`)" if base != recipe.model.name else ""))
    if recipe.model.quantization is not None:
        lines.append(
            f"- Quantized base (QLoRA): {recipe.model.quantization}, compute dtype {compute_dtype(recipe.model)}; the merge "
            "folds the adapter into the dequantized base it was trained against"
        )
    lines.append(f"- Data: `{recipe.data.train}`" + (f", eval `{recipe.data.eval}`" if recipe.data.eval else f", {recipe.data.eval_split:g} held out for eval"))
    if info.total_params:
        share = 100 * info.trainable_params / info.total_params
        lines.append(f"- Trainable parameters: {info.trainable_params:,} of {info.total_params:,} ({share:.4f}%)")
    if info.steps is not None:
        lines.append(f"- Optimizer steps: {info.steps}" + (f" ({info.seconds} s)" if info.seconds is not None else ""))
    lines.append("")
    lines += _evaluation(info)
    lines += ["## Recipe", "", "The resolved recipe this was trained from (`lorafam train` reproduces it):", "", "```yaml", recipe.to_yaml().strip(), "```", ""]
    lines += ["## How to use", ""] + _usage(run, kind, base, details)
    return "\n".join(lines).rstrip() + "\n"


def _summary(kind: Kind) -> str:
    return {
        "adapter": "An adapter trained with lorafam from the recipe below; the base model is not included.",
        "merged": "A plain transformers model: the adapter trained with lorafam from the recipe below, folded into the base weights.",
        "gguf": "The fine-tuned model as one GGUF file for llama.cpp, Ollama and LM Studio: the adapter trained with lorafam "
        "from the recipe below, folded into the base weights, with the tokenizer and chat template inside the file.",
        "gguf-lora": "The adapter trained with lorafam from the recipe below, alone, as a llama.cpp LoRA GGUF: llama.cpp "
        "(`--lora`) and Ollama (`ADAPTER`) add it to a GGUF of the same base model at run time.",
    }[kind]


def _evaluation(info: RunInfo) -> list[str]:
    before, after = info.eval_before or {}, info.eval_after or {}
    if not before and not after:
        return []
    lines = ["## Evaluation", "", "On the recipe's eval split, before and after training:", "", "| metric | before | after |", "|---|---|---|"]
    for key in dict.fromkeys([*before, *after]):
        lines.append(f"| {key} | {_number(before.get(key))} | {_number(after.get(key))} |")
    return lines + [""]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _peft_loadable(run: LoadedRun) -> bool:
    from lorafam.run import ADAPTER_CONFIG

    config_path = run.folder / ADAPTER_CONFIG
    try:
        peft_type = json.loads(config_path.read_text()).get("peft_type", "")
    except (OSError, json.JSONDecodeError):
        return False
    return bool(peft_type) and not str(peft_type).startswith("LORAFAM_")


def _usage(run: LoadedRun, kind: Kind, base: str, details: dict[str, Any]) -> list[str]:
    auto = run.recipe.task.auto_class_name
    if kind == "adapter":
        lines = []
        if _peft_loadable(run):
            lines += [
                "With PEFT:", "", "```python", f"from transformers import {auto}", "from peft import PeftModel", "",
                f'base = {auto}.from_pretrained("{base}")', 'model = PeftModel.from_pretrained(base, "PATH_TO_THIS_FOLDER")', "```", "",
            ]
        else:
            lines += [f"PEFT has no {run.recipe.adapter.variant} (or not this configuration of it), so load it with lorafam.", ""]
        lines += [
            "With lorafam: merge it into the base, or export it for llama.cpp / Ollama:", "", "```bash",
            "lorafam merge PATH_TO_THIS_FOLDER --output merged/", "lorafam export PATH_TO_THIS_FOLDER --format gguf --quant q8_0 --output gguf/",
            "```",
        ]
        return lines
    if kind == "merged":
        if details.get("requantize"):
            return [f"Saved {details['requantize']}-quantized with bitsandbytes (`lorafam merge --requantize`); transformers "
                    "loads it with bitsandbytes installed:", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
                    f'model = {auto}.from_pretrained("PATH_TO_THIS_FOLDER")', "```"]
        return ["```python", f"from transformers import AutoTokenizer, {auto}", "",
                f'model = {auto}.from_pretrained("PATH_TO_THIS_FOLDER")', 'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER")', "```"]
    if kind == "gguf-lora":
        return _adapter_gguf_usage(details)
    gguf_file = details.get("gguf_file", "MODEL.gguf")
    lines = [
        "llama.cpp:", "", "```bash", f"llama-cli -m {gguf_file} -cnv", "```", "",
        "Ollama (the Modelfile next to the GGUF holds the chat template in Ollama's syntax and the stop tokens):", "",
        "```bash", "ollama create my-model -f Modelfile", "ollama run my-model", "```", "",
        "transformers (dequantizes into a plain model):", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_TO_THIS_FOLDER", gguf_file="{gguf_file}")',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER", gguf_file="{gguf_file}")', "```",
    ]
    for note in details.get("notes") or []:
        lines += ["", f"Note: this file {note}."]
    return lines


def _adapter_gguf_usage(details: dict[str, Any]) -> list[str]:
    adapter, base_file = details["gguf_file"], details.get("base_file")
    base = base_file or "BASE.gguf"
    lines = []
    if base_file is None:
        lines += ["The base model is not in this folder: bring a GGUF of the base model named above (the one the "
                  "adapter was trained on, any quantization), as `BASE.gguf` below and as `FROM` in the Modelfile.", ""]
    return lines + [
        "llama.cpp:", "", "```bash", f"llama-completion -m {base} --lora {adapter} -p \"...\"",
        f"llama-completion -m {base} --lora-scaled {adapter} 0.5 -p \"...\"   # half the update", "```", "",
        "Ollama (the Modelfile names the base with `FROM` and this file with `ADAPTER`, with the chat template and stop tokens):",
        "", "```bash", "ollama create my-model -f Modelfile", "ollama run my-model", "```",
    ]
