"""The task objects: the loss modules equal transformers' own loss, labelled positions only."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, Gemma2Config, Gemma2ForCausalLM, LlamaForCausalLM

from lorafam.adapters import build_variant
from lorafam.adapters.lora import LoRAConfig
from lorafam.tasks import TASKS, get_task
from lorafam.tasks import causal_lm


def causal_batch(vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows with response-only labels: a prompt masked out, padding masked out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    variant = build_variant(LoRAConfig(variant="lora", r=4, target_modules="all-linear")).apply(model)
    with torch.no_grad():  # a non-zero adapter, so gradients reach A as well as B
        for layer in variant.layers.values():
            layer.lora_B.weight.normal_(0, 0.1)
    return model.train()


def test_registry_names_every_recipe_task():
    from lorafam.recipe import ModelConfig

    assert set(TASKS) == set(ModelConfig.model_fields["task"].annotation.__args__)


def test_causal_lm_loss_equals_transformers_mean_loss_and_gradients():
    batch = causal_batch()
    model = lora_llama()
    loss_model = get_task("causal-lm").loss_module(model)
    assert loss_model.split_head, "a Llama's logits are head(body(x)): the labelled-only path must be taken"
    out = loss_model(**batch)
    count = get_task("causal-lm").label_count(batch)
    assert int(out["count"]) == count == int((batch["labels"][:, 1:] != -100).sum())
    (out["loss_sum"] / count).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference = lora_llama()
    reference(**batch).loss.backward()
    torch.testing.assert_close(out["loss_sum"] / count, reference(**batch).loss, rtol=1e-6, atol=1e-6)
    for name, p in reference.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-5, atol=1e-7)


def test_the_head_sees_only_labelled_positions(monkeypatch):
    batch = causal_batch()
    model = lora_llama()
    loss_model = get_task("causal-lm").loss_module(model)  # (its probe of the head comes first)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    loss_model(**batch)
    assert sum(shape[0] for shape in seen) == get_task("causal-lm").label_count(batch)
    assert all(len(shape) == 2 for shape in seen)  # (positions, hidden): never (batch, seq, vocab)


def test_long_inputs_go_through_the_head_in_chunks_with_the_same_loss_and_gradients(monkeypatch):
    batch = causal_batch()
    model = lora_llama()
    whole = get_task("causal-lm").loss_module(model)(**batch)["loss_sum"]
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    monkeypatch.setattr(causal_lm, "CHUNK_ELEMENTS", 128 * 5)  # 5 positions of a 128-token vocabulary
    loss_model = get_task("causal-lm").loss_module(model)
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    chunked = loss_model(**batch)["loss_sum"]
    forward_calls = len(calls)
    chunked.backward()
    assert forward_calls > 1 and max(calls) <= 5
    assert len(calls) == 2 * forward_calls  # each chunk recomputed in backward, not kept
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    # Chunking changes the order of the sums behind every gradient element, and so does the thread
    # count: an element that nearly cancels carries the rounding of the terms it sums, so the bound
    # is relative to its tensor's largest element (measured up to 4e-7 of it at 1 and 2 threads).
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = float(expected[name].abs().max())
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_a_model_with_logit_softcapping_falls_back_to_the_full_logits():
    """Gemma 2 soft-caps its logits after the head: head(body(x)) is not its output."""
    config = Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).train()
    loss_model = get_task("causal-lm").loss_module(model)
    assert not loss_model.split_head
    batch = causal_batch()
    count = get_task("causal-lm").label_count(batch)
    torch.testing.assert_close(loss_model(**batch)["loss_sum"] / count, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_a_micro_batch_without_labels_still_reaches_every_adapter_parameter():
    """Distributed gradient reduction expects a gradient for every trainable parameter."""
    batch = causal_batch()
    batch["labels"][:] = -100
    model = lora_llama()
    out = get_task("causal-lm").loss_module(model)(**batch)
    assert float(out["loss_sum"]) == 0.0 and int(out["count"]) == 0
    out["loss_sum"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_classification_loss_and_accuracy_equal_a_direct_computation():
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=128, num_labels=3)).eval()
    ids = torch.randint(1, 128, (4, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}
    task = get_task("sequence-classification")
    out = task.loss_module(model)(**batch)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert int(out["count"]) == task.label_count(batch) == 4
    torch.testing.assert_close(out["loss_sum"] / 4, torch.nn.functional.cross_entropy(logits, batch["labels"]))
    assert int(out["correct"]) == int((logits.argmax(-1) == batch["labels"]).sum())
    metrics = task.metrics(float(out["loss_sum"]), 4, int(out["correct"]))
    assert metrics == pytest.approx({"loss": float(out["loss_sum"]) / 4, "accuracy": int(out["correct"]) / 4, "examples": 4})
