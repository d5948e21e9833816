"""Training options whose effect is otherwise invisible: each one does what the README says, and
changes nothing else."""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager

import torch
from safetensors.torch import load_file
from tinyrun import cli, make_model_folder, make_text_data, read_metrics, write_recipe


@contextmanager
def training_forward_calls():
    """Counts forward calls per module class while the module is in train mode (eval passes are
    not counted), across whatever the block runs, through torch's global forward hook."""
    calls: Counter[str] = Counter()

    def hook(module: torch.nn.Module, args, output) -> None:
        if module.training:
            calls[type(module).__name__] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_gradient_checkpointing_recomputes_and_changes_nothing_else(tmp_path):
    """train.gradient_checkpointing: the inside of every decoder layer runs again in backward (its
    activations were not kept), and the run is the same run: equal losses and adapter weights, with
    dropout on (the recomputation must replay the same masks)."""
    model = make_model_folder(tmp_path / "model")
    data = make_text_data(tmp_path / "data.jsonl")
    runs = {}
    for checkpointing in (False, True):
        run_dir = tmp_path / f"run-{checkpointing}"
        recipe = write_recipe(tmp_path / f"{checkpointing}.yaml", model, data, run_dir, train={
            "max_steps": 3, "grad_accum": 2, "save_every": None, "mixed_precision": "no",
            "gradient_checkpointing": checkpointing, "eval_every": 2,
        })
        with training_forward_calls() as calls, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = cli("train", recipe)
        assert result.exit_code == 0, result.output
        # transformers 5 deprecates gradient_checkpointing_enable: the current switch is used.
        assert not [w for w in caught if "checkpointing_enable" in str(w.message)], [str(w.message) for w in caught]
        losses = [row["loss"] for row in read_metrics(run_dir) if "loss" in row]
        runs[checkpointing] = (calls, losses, load_file(run_dir / "adapter_model.safetensors"))

    (plain_calls, plain_losses, plain_adapter), (ckpt_calls, ckpt_losses, ckpt_adapter) = runs[False], runs[True]
    # transformers checkpoints each decoder layer's forward (its own hooks stay outside): what runs
    # again in backward is inside it. The attention (with the adapted q/v_proj) runs twice per
    # micro-batch; so do the adapter layers. Modules outside the layers run once.
    micro_batches, layers = 3 * 2, 2  # max_steps x grad_accum; tiny_llama_config's layers
    assert plain_calls["LlamaAttention"] == micro_batches * layers
    assert ckpt_calls["LlamaAttention"] == 2 * micro_batches * layers
    assert ckpt_calls["LoRALayer"] == 2 * plain_calls["LoRALayer"] == 2 * micro_batches * layers * 2
    assert ckpt_calls["LlamaDecoderLayer"] == plain_calls["LlamaDecoderLayer"] == micro_batches * layers
    assert ckpt_calls["Embedding"] == plain_calls["Embedding"] == micro_batches
    assert len(plain_losses) == 3 and ckpt_losses == plain_losses
    assert ckpt_adapter.keys() == plain_adapter.keys()
    for key, tensor in plain_adapter.items():
        torch.testing.assert_close(ckpt_adapter[key], tensor, rtol=0, atol=0, msg=key)
