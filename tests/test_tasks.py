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


@pytest.mark.parametrize("head", ["frozen linear", "hooked"])
def test_long_inputs_go_through_the_head_in_chunks_with_the_same_loss_and_gradients(monkeypatch, head):
    """A frozen plain linear head computes each chunk's logits once, its gradient with them; a head
    with a hook on its call (one that trains, or is wrapped, alike) is checkpointed: each chunk's
    logits are computed again in backward."""
    batch = causal_batch()
    model = lora_llama()
    whole = get_task("causal-lm").loss_module(model)(**batch)["loss_sum"]
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    monkeypatch.setattr(causal_lm, "CHUNK_ELEMENTS", 128 * 5)  # 5 positions of a 128-token vocabulary
    loss_model = get_task("causal-lm").loss_module(model)
    lm_head = model.get_output_embeddings()
    calls = []  # positions per matmul with the head's weight, through the module or not
    linear = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        if weight is lm_head.weight:
            calls.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    if head == "hooked":
        lm_head.register_forward_hook(lambda m, args, out: None)
    chunked = loss_model(**batch)["loss_sum"]
    forward_calls = len(calls)
    chunked.backward()
    assert forward_calls > 1 and max(calls) <= 5 and sum(calls[:forward_calls]) == get_task("causal-lm").label_count(batch)
    assert len(calls) == (2 * forward_calls if head == "hooked" else forward_calls)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    # Chunking changes the order of the sums behind every gradient element, and so does the thread
    # count: an element that nearly cancels carries the rounding of the terms it sums, so the bound
    # is relative to its tensor's largest element (measured up to 4e-7 of it at 1 and 2 threads).
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = float(expected[name].abs().max())
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_head_log_probs_equal_autograd_through_the_head_for_any_incoming_gradient(precision):
    """Per-position log-probs (what preference tuning sums per answer) and their gradient with
    respect to the hidden states, for an arbitrary incoming gradient, against autograd through
    head + log_softmax, in fp32 and under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(32, 96, bias=True).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(96, 32, generator=g) * 0.3)
        head.bias.copy_(torch.randn(96, generator=g) * 0.1)
    hidden = torch.randn(23, 32, generator=g)
    targets = torch.randint(0, 96, (23,), generator=g)
    incoming = torch.randn(23, generator=g)
    bf16 = precision == "bf16"

    def run(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fused:
                out = causal_lm.HeadLogProbs.apply(h, targets, head.weight, head.bias, 5)
            else:
                out = torch.log_softmax(head(h).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        (out * incoming).sum().backward()
        return out.detach(), h.grad

    assert causal_lm.fuses(head, hidden.clone().requires_grad_(True))
    ours, ours_grad = run(fused=True)
    theirs, theirs_grad = run(fused=False)
    if not bf16:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-6)
        return
    # Same bf16 logits on both sides: the log-probs agree to fp32 rounding.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    # Autograd rounds incoming x (onehot - softmax) to bf16, HeadLogProbs rounds (onehot - softmax)
    # and scales after the matmul: each term of the sum over the vocabulary carries at most two
    # bf16 roundings (2^-8 each) either way, and each result one more.
    with torch.no_grad():
        d = torch.nn.functional.one_hot(targets, 96) - torch.softmax(head(hidden), dim=-1)
        bound = 4 * 2**-8 * (incoming.abs()[:, None] * (d.abs() @ head.weight.abs())) + 2**-8 * theirs_grad.abs()
    assert bool(((ours_grad - theirs_grad).abs() <= bound + 1e-7).all())


def test_a_head_that_trains_or_is_sharded_is_not_fused():
    hidden = torch.randn(4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 16, bias=False).requires_grad_(False)
    assert causal_lm.fuses(head, hidden)
    assert not causal_lm.fuses(head, hidden.detach())  # no gradient wanted: plain chunks
    with torch.no_grad():
        assert not causal_lm.fuses(head, hidden)
    assert not causal_lm.fuses(head.requires_grad_(True), hidden)  # its weight needs a gradient
    head.requires_grad_(False)
    head.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)  # ZeRO-3's placeholder
    assert not causal_lm.fuses(head, hidden)


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
