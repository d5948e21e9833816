"""`lorafam export`: a finished run as files that llama.cpp, Ollama and LM Studio run.

Two formats. ``gguf`` (below) merges the adapter into the base and writes one model file.
``gguf-lora`` writes the adapter alone as a llama.cpp LoRA file, for `llama-cli -m BASE.gguf --lora
ADAPTER.gguf` and Ollama's ``ADAPTER`` (see lorafam.export.adapter for which variants it can hold):

    OUTPUT/
      <run>-LoRA-F32.gguf        the adapter (a few MB)
      <base>-<QUANT>.gguf        the base model, with ``base=True`` (``--base``); else bring your own
      Modelfile                  FROM the base, ADAPTER the adapter
      README.md                  model card

For ``gguf``:

The run is merged exactly as `lorafam merge` merges it (a quantized base is dequantized first, see
lorafam.merge), then written as a GGUF file with the architecture's hyperparameters, the tokenizer
(vocabulary, merges, token types, special token ids) and the chat template, plus an Ollama
Modelfile and a model card next to it:

    OUTPUT/
      <run>-<QUANT>.gguf   the model (see lorafam.export.tensors and lorafam.export.vocab)
      Modelfile            for `ollama create NAME -f Modelfile` (see lorafam.export.ollama)
      README.md            model card

Everything is written into a temporary sibling folder and renamed into place, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from lorafam.errors import LorafamError
from lorafam.export.ollama import ChatFormat, build_modelfile, infer_chat_format
from lorafam.export.tensors import FILE_TYPES, QUANT_TYPES, architecture_of, gguf_tensors, write_hyperparameters
from lorafam.export.vocab import Vocab, read_vocab

FORMATS = ("gguf", "gguf-lora")
MODELFILE = "Modelfile"
#: Ollama's context window default when the model allows more: memory grows with it.
MAX_DEFAULT_CONTEXT = 8192


@dataclass
class ExportResult:
    folder: Path
    gguf_path: Path
    size_bytes: int
    #: GGUF tensor type name -> number of tensors of that type.
    tensor_types: dict[str, int]
    modelfile_warning: str | None = None
    notes: list[str] = field(default_factory=list)
    #: gguf-lora: the base model's GGUF written beside the adapter (``base=True``), else None.
    base_gguf_path: Path | None = None
    base_size_bytes: int | None = None
    #: gguf-lora: the rank of each adapted tensor's pair, by GGUF base tensor name.
    ranks: dict[str, int] = field(default_factory=dict)


def export_run(run_dir: str | Path, output: str | Path, fmt: str = "gguf", quant: str = "f16", base: bool = False) -> ExportResult:
    """Write the run in ``run_dir`` to the new folder ``output`` as ``fmt``: ``gguf`` merged, or
    ``gguf-lora`` the adapter alone (with the base model's GGUF at ``quant`` when ``base``)."""
    from lorafam.card import write_model_card
    from lorafam.merge import merged_model
    from lorafam.modeling import load_config, load_tokenizer
    from lorafam.run import open_run

    if fmt not in FORMATS:
        raise LorafamError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quant not in QUANT_TYPES:
        raise LorafamError(f"--quant {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    run = open_run(run_dir)
    if not run.recipe.task.generates:
        raise LorafamError(f"GGUF export is for causal language models; this run is {run.recipe.model.task}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LorafamError(f"--output {output} exists and is not an empty folder; choose a new folder")
    # Refuse an architecture or tokenizer llama.cpp cannot run before the (slow) merge.
    config = load_config(run.recipe.model)
    architecture_of(config)
    tokenizer = load_tokenizer(run.recipe.model)
    read_vocab(tokenizer, config.vocab_size)

    if fmt == "gguf-lora":
        return _export_adapter(run, Path(run_dir), output, quant, base, config, tokenizer)
    if base:
        raise LorafamError("--base is for --format gguf-lora (the merged GGUF already holds the base)")

    model = merged_model(run)
    name = _file_stem(Path(run_dir))
    gguf_name = f"{name}-{quant.upper()}.gguf"

    with _staged(output) as tmp:
        written = write_gguf(tmp / gguf_name, model, tokenizer, quant, name=name, tags=["lorafam", run.recipe.adapter.variant])
        modelfile = build_modelfile(
            gguf_name, tokenizer, written.chat, written.adds_bos,
            min(model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT), sampling_defaults(model),
        )
        (tmp / MODELFILE).write_text(modelfile.text)
        result = ExportResult(
            folder=output, gguf_path=output / gguf_name, size_bytes=(tmp / gguf_name).stat().st_size,
            tensor_types=written.tensor_types, modelfile_warning=modelfile.warning, notes=written.notes,
        )
        write_model_card(tmp, run, "gguf", gguf_file=gguf_name, quant=quant, notes=written.notes)
    return result


@contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A hidden folder beside ``output`` to write into, renamed to ``output`` only when the block
    finishes: a killed or failed export leaves no half-written folder under the real name."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_adapter(run: Any, run_dir: Path, output: Path, quant: str, base: bool, config: Any, tokenizer: Any) -> ExportResult:
    """``--format gguf-lora``: see lorafam.export.adapter."""
    from lorafam.card import write_model_card
    from lorafam.export.adapter import load_adapted_keeping_base, low_rank_refusal, lora_pairs, strip_adapter, write_lora_gguf

    variant_name = run.recipe.adapter.variant
    refusal = low_rank_refusal(run.recipe.adapter)  # before the model loads: it is the variant's nature
    if refusal is not None:
        raise LorafamError(
            f"--format gguf-lora: a {variant_name} adapter cannot be a llama.cpp LoRA file: {refusal}; "
            f"export the merged model instead: lorafam export {run_dir} --format gguf --output DIR"
        )
    architecture = architecture_of(config)
    model, variant, own_modules = load_adapted_keeping_base(run)
    if variant.saved_modules:
        raise LorafamError(
            f"--format gguf-lora: the run trains {', '.join(variant.saved_modules)} in full (modules_to_save), which "
            "a LoRA file cannot hold; use --format gguf"
        )
    pairs = lora_pairs(model, variant, architecture)
    name = _file_stem(run_dir)
    adapter_name = f"{name}-LoRA-F32.gguf"
    base_stem = _file_stem(Path(str(run.recipe.model.name)))
    base_name = f"{base_stem}-{quant.upper()}.gguf"

    with _staged(output) as tmp:
        write_lora_gguf(tmp / adapter_name, pairs, architecture, name=name, tags=["lorafam", variant_name])
        base_model = strip_adapter(model, variant, own_modules, getattr(torch, run.recipe.model.dtype))
        result = ExportResult(
            folder=output, gguf_path=output / adapter_name, size_bytes=(tmp / adapter_name).stat().st_size,
            tensor_types={"F32": 2 * len(pairs)}, ranks={pair.base_tensor: pair.rank for pair in pairs},
        )
        vocab_size = base_model.get_input_embeddings().weight.shape[0]
        if base:
            written = write_gguf(tmp / base_name, base_model, tokenizer, quant, name=base_stem)
            chat, adds_bos = written.chat, written.adds_bos
            result.base_gguf_path, result.base_size_bytes = output / base_name, (tmp / base_name).stat().st_size
        else:
            chat, adds_bos = infer_chat_format(tokenizer), read_vocab(tokenizer, vocab_size).add_bos
        modelfile = build_modelfile(
            base_name, tokenizer, chat, adds_bos, min(base_model.config.max_position_embeddings, MAX_DEFAULT_CONTEXT),
            sampling_defaults(base_model), adapter=adapter_name, base_written=base,
        )
        (tmp / MODELFILE).write_text(modelfile.text)
        result.modelfile_warning = modelfile.warning
        write_model_card(tmp, run, "gguf-lora", gguf_file=adapter_name, base_file=base_name if base else None)
    return result


@dataclass
class WrittenGGUF:
    chat: ChatFormat | None
    adds_bos: bool
    tensor_types: dict[str, int]
    notes: list[str]


def write_gguf(path: Path, model: torch.nn.Module, tokenizer: Any, quant: str, name: str, tags: list[str] = ()) -> WrittenGGUF:
    """Write ``model`` (a merged transformers causal LM) and ``tokenizer`` to the GGUF file ``path``."""
    config = model.config
    architecture = architecture_of(config)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    vocab = read_vocab(tokenizer, vocab_size)
    chat = infer_chat_format(tokenizer)
    notes = []

    writer = gguf.GGUFWriter(str(path), architecture.name, use_temp_file=True)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        if tags:
            writer.add_tags(list(tags))
        write_hyperparameters(writer, config, architecture, vocab_size)
        writer.add_file_type(FILE_TYPES[quant])
        if quant not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(writer, eot_id=_end_of_turn_id(chat, vocab))
        counts: Counter[str] = Counter()
        biases = []
        for plan, data in gguf_tensors(model, architecture, quant):
            writer.add_tensor(plan.gguf_name, data, raw_dtype=plan.tensor_type)
            counts[plan.tensor_type.name] += 1
            if plan.gguf_name.endswith(".bias"):
                biases.append(plan.gguf_name)
        if biases and architecture.interleave_rotary:
            # transformers' GGUF reader builds a Llama without biases unless told to (llama.cpp reads them).
            notes.append(
                f"carries {len(biases)} bias tensors ({', '.join(sorted({b.split('.', 2)[2] for b in biases}))}) that the "
                "merge added; llama.cpp reads them, transformers' GGUF loader needs attention_bias=True"
                + (", mlp_bias=True" if any(".ffn_" in b for b in biases) else "")
                + " passed to from_pretrained"
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return WrittenGGUF(chat=chat, adds_bos=vocab.add_bos, tensor_types=dict(counts), notes=notes)


def _end_of_turn_id(chat: ChatFormat | None, vocab: Vocab) -> int | None:
    """The control token that ends the model's turn in the chat template (``<|im_end|>``,
    ``<|eot_id|>``), so llama.cpp stops there even when it is not the EOS token."""
    if chat is None:
        return None
    text = chat.end_of_turn()
    candidates = [
        (text.index(token), token_id)
        for token_id, token in enumerate(vocab.tokens)
        if vocab.token_types[token_id] == gguf.TokenType.CONTROL and token and token in text
    ]
    return min(candidates)[1] if candidates else None


def sampling_defaults(model: torch.nn.Module) -> dict[str, float]:
    """The generation config's sampling defaults, in Ollama's parameter names (only when it samples)."""
    generation = getattr(model, "generation_config", None)
    if generation is None or not getattr(generation, "do_sample", False):
        return {}
    names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repeat_penalty"}
    return {ollama: float(value) for key, ollama in names.items() if (value := getattr(generation, key, None)) is not None}


def _file_stem(run_dir: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", run_dir.resolve().name).strip("-.")
    return stem or "model"
