"""Talking to a model: `lorafam chat` (interactive, streamed) and `lorafam generate` (one-shot, for scripts).

What TARGET names, checked in this order:

1. a **run folder** (train's output_dir, with recipe.yaml): the run's base model with its trained
   adapter, loaded as trained (a QLoRA run on its 4-bit base);
2. a **recipe** (a path ending in .yaml/.yml): that recipe's base model, as its ``model:`` section
   loads it (quantization included), with no adapter;
3. anything else is a ``model.name``: a model folder (e.g. what ``lorafam merge`` wrote), a packaged
   alias (smollm2-135m) or a hub id, loaded in float32.

Prompts go through the tokenizer's chat template when it has one (``generate --raw`` skips it);
``chat`` needs one. Temperature 0 is greedy decoding (deterministic); above 0, nucleus sampling
with ``top_p`` and no top-k cut.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafam.errors import LorafamError

@dataclass
class Target:
    """A loaded model ready to generate, and what it is."""

    model: torch.nn.Module
    tokenizer: Any
    #: The run's adapter (None for a base model): ``variant.disabled()`` gives the base's answers.
    variant: Any
    description: str


@dataclass
class Settings:
    """Generation settings shared by chat and generate."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None

    def check(self) -> "Settings":
        if not self.temperature >= 0:
            raise LorafamError(f"--temperature {self.temperature}: give 0 (greedy) or a positive value")
        if not 0 < self.top_p <= 1:
            raise LorafamError(f"--top-p {self.top_p}: give a value in (0, 1]")
        if self.max_new_tokens < 1:
            raise LorafamError(f"--max-new-tokens {self.max_new_tokens}: give at least 1")
        return self


# --------------------------------------------------------------------------------------------------
# Loading


def open_target(target: str | Path) -> Target:
    """Load what ``target`` names (see the module docstring for the rule)."""
    from lorafam.merge import load_adapted
    from lorafam.modeling import PACKAGED_MODELS, load_model, load_tokenizer
    from lorafam.recipe import ModelConfig, load_recipe
    from lorafam.run import is_run_folder, open_run

    path = Path(target)
    variant = None
    if is_run_folder(path):
        run = open_run(path)
        cfg = run.recipe.model
        _check_causal(cfg.task, f"{path} is a {cfg.task} run")
        model, variant = load_adapted(run)
        description = f"{variant.name} adapter in {path} on {cfg.name}"
    else:
        if path.suffix in (".yaml", ".yml"):
            cfg = load_recipe(path).model
            _check_causal(cfg.task, f"recipe {path} trains a {cfg.task} model")
            description = f"base model {cfg.name} (recipe {path})"
        elif path.is_file():
            raise LorafamError(
                f"{path} is a file; give a run folder, a recipe (.yaml), a model folder, or a packaged alias "
                f"({', '.join(PACKAGED_MODELS)})"
            )
        else:
            looks_local = path.is_absolute() or str(target).startswith((".", "~")) or len(path.parts) > 2
            if looks_local and not path.exists():
                raise LorafamError(
                    f"{target} does not exist; give a run folder, a recipe (.yaml), a model folder, a packaged "
                    f"alias ({', '.join(PACKAGED_MODELS)}) or a hub id"
                )
            cfg = ModelConfig(name=str(target))
            description = f"model {target}"
        model = load_model(cfg)
    tokenizer = load_tokenizer(cfg)
    from lorafam.quant import has_quantized_layers

    if torch.cuda.is_available() and not has_quantized_layers(model):  # (4-bit models are placed at load)
        model.to("cuda")
    model.eval()
    return Target(model=model, tokenizer=tokenizer, variant=variant, description=description)


def _check_causal(task: str, what: str) -> None:
    from lorafam.tasks import get_task

    if not get_task(task).generates:
        raise LorafamError(f"{what}; chat and generate need a causal language model")


# --------------------------------------------------------------------------------------------------
# One generation


def encode(tokenizer: Any, messages: list[dict[str, str]], raw: bool = False) -> dict[str, torch.Tensor]:
    """Token ids for a conversation (chat template + generation prompt), or for the last message's
    text as is when ``raw`` or when the tokenizer has no chat template."""
    if not raw and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(messages[-1]["content"], return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def generation_config(model: torch.nn.Module, tokenizer: Any, settings: Settings) -> Any:
    """The model's own generation config with our settings on top (greedy at temperature 0)."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = settings.max_new_tokens
    config.max_length = None
    config.pad_token_id = tokenizer.pad_token_id
    stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    stops = [s for s in stops if s is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)  # a chat template's end of turn, when the config lacks it
    config.eos_token_id = stops or None
    if settings.temperature == 0:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, settings.temperature, settings.top_p, 0
    return config


def generate(
    target: Target, inputs: dict[str, torch.Tensor], settings: Settings, streamer: Any = None
) -> tuple[str, int]:
    """(answer text, new token count) for encoded ``inputs``."""
    model = target.model
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    length, context = inputs["input_ids"].shape[1], context_length(model)
    if context is not None and length >= context:
        raise LorafamError(f"the prompt is {length} tokens and the model's context {context}; shorten it")
    config = generation_config(model, target.tokenizer, settings)
    if context is not None:  # beyond its context a model's answers degrade or fail
        config.max_new_tokens = min(settings.max_new_tokens, context - length)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=config, streamer=streamer)
    new = output[0, inputs["input_ids"].shape[1] :]
    return target.tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel())


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's config declares (None when it declares none)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _streamer(tokenizer: Any, write: Callable[[str], None]) -> Any:
    """A transformers TextStreamer that hands each finished piece of text to ``write``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# --------------------------------------------------------------------------------------------------
# chat

HELP = "/reset clears the conversation, /exit (or end of input) quits"


def chat(
    target: Target,
    settings: Settings,
    read: Callable[[], str | None],
    write: Callable[[str], None],
    note: Callable[[str], None],
    system: str | None = None,
    show_prompt: bool = False,
) -> int:
    """Read messages with ``read`` (None at end of input) and stream answers through ``write``.

    ``note`` gets everything that is not the model's answer (help, /reset confirmations, and with
    ``show_prompt`` each prompt's token count). The conversation is re-encoded with the chat
    template each turn; the oldest exchanges are dropped when it outgrows the model's context.
    Returns the number of answered turns.
    """
    tokenizer = target.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise LorafamError(
            f"the tokenizer of {target.description} has no chat template, so there is no conversation format; "
            "use `lorafam generate` for plain continuation"
        )
    settings.check()
    context = context_length(target.model)
    opening = [{"role": "system", "content": system}] if system else []
    history: list[dict[str, str]] = []
    turns = 0
    note(f"chatting with {target.description}; {HELP}")
    while True:
        try:
            line = read()
        except KeyboardInterrupt:
            line = None
        if line is None or line.strip() in ("/exit", "/quit"):
            return turns
        message = line.strip()
        if not message:
            continue
        if message == "/reset":
            history = []
            note("(conversation cleared)")
            continue
        if message.startswith("/"):
            note(f"unknown command {message.split()[0]}; {HELP}")
            continue
        history.append({"role": "user", "content": message})
        inputs = encode(tokenizer, opening + history)
        while context and inputs["input_ids"].shape[1] + settings.max_new_tokens > context and len(history) > 1:
            history = history[2:]  # the oldest user message and its answer
            note("(oldest exchange dropped to fit the model's context)")
            inputs = encode(tokenizer, opening + history)
        if show_prompt:
            note(f"[prompt: {inputs['input_ids'].shape[1]} tokens]")
        try:
            answer, _ = generate(target, inputs, settings, streamer=_streamer(tokenizer, write))
        except LorafamError as e:  # a message too long for the model: say so, keep chatting
            history.pop()
            note(f"{e}; that message is left out of the conversation")
            continue
        except KeyboardInterrupt:
            history.pop()
            write("\n")
            note("(stopped; that message is left out of the conversation)")
            continue
        write("\n")
        history.append({"role": "assistant", "content": answer})
        turns += 1


# --------------------------------------------------------------------------------------------------
# generate


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file: one {"prompt": "..."} object (or a JSON string) per line."""
    if not path.is_file():
        raise LorafamError(f"--file {path} not found; give a JSONL file with one {{\"prompt\": ...}} per line")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LorafamError(f"--file {path}: line {number} is not JSON ({e.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str) or not prompt.strip():
            raise LorafamError(f'--file {path}: line {number} needs a non-empty "prompt" string, e.g. {{"prompt": "Hi"}}')
        prompts.append(prompt)
    if not prompts:
        raise LorafamError(f"--file {path} holds no prompts; give one {{\"prompt\": ...}} per line")
    return prompts


def answer_prompts(
    target: Target,
    prompts: list[str],
    settings: Settings,
    system: str | None = None,
    raw: bool = False,
    compare_base: bool = False,
) -> list[dict[str, Any]]:
    """One row per prompt: prompt, output, new_tokens (and base_output with ``compare_base``)."""
    settings.check()
    if compare_base and target.variant is None:
        raise LorafamError(f"--compare-base needs a run folder: {target.description} has no adapter to compare with")
    rows = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        inputs = encode(target.tokenizer, messages, raw)
        output, new_tokens = generate(target, inputs, settings)
        row: dict[str, Any] = {"prompt": prompt, "output": output, "new_tokens": new_tokens}
        if compare_base:
            with target.variant.disabled():
                row["base_output"], _ = generate(target, inputs, settings)
        rows.append(row)
    return rows
