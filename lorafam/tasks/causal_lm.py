"""Causal language modelling: next-token loss on the labelled positions only.

With response-only instruction or chat data half or more of the positions (prompt, template,
padding) carry no label, yet ``model(**batch).logits`` computes vocabulary-wide logits for all of
them, in fp32. ``CausalLMLoss`` runs the model body for hidden states, keeps the positions whose
*next* token is labelled, and applies the output head and the cross-entropy to those only, in
chunks, so the full (tokens x vocab) tensor never exists. The sum it returns equals
``model(**batch).loss * count`` to float rounding (tests/test_tasks.py).

A frozen plain linear head (the usual case: the adapter is in the body) takes the chunks in one
pass: each chunk's gradient with respect to its hidden states, (onehot - softmax) @ W, is worked
out while its logits exist, then the logits go (``HeadLogProbs``). Recomputing each chunk's logits
in backward instead, as a checkpoint does, costs one more head matmul per step: ~13% of the step
of a 60M Llama at 8 x 256 tokens, where the head is a third of the model's linear work. A head that
trains or that is wrapped (hooks, a quantized or adapted layer) keeps the checkpointed chunks.

Whether "head(body(x))" really is the model's forward (no logit soft-capping or scaling after the
head) is checked once per model on a tiny probe; a model where it is not falls back to the full
logits, still scoring only the labelled positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafam.tasks.base import IGNORE_INDEX, LossOutput, Task, TaskLossModule

#: Logit elements per chunk of the head + cross-entropy (2^25 fp32 = 128 MiB); e.g. 682 positions
#: of a 49k vocabulary.
CHUNK_ELEMENTS = 1 << 25


class CausalLM(Task):
    name = "causal-lm"
    description = "causal-lm: next-token loss"
    peft_task_type = "CAUSAL_LM"
    token_labels = True
    auto_class_name = "AutoModelForCausalLM"
    count_name = "tokens"
    shown_metrics = ("loss", "perplexity")
    generates = True
    pipeline_tag = "text-generation"

    def loss_module(self, model: nn.Module) -> nn.Module:
        return CausalLMLoss(model)

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def metrics(self, loss_sum: float, count: int, correct: int) -> dict[str, float]:
        out = super().metrics(loss_sum, count, correct)
        if count:
            out = {"loss": out["loss"], "perplexity": self.perplexity(out["loss"]), "tokens": count}
        return out


class CausalLMLoss(TaskLossModule):
    """forward(**batch) -> LossOutput(loss_sum, count) over the labelled next-token positions."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.split_head = _head_splits_off(model)

    def forward(self, labels: torch.Tensor, **inputs: Any) -> LossOutput:
        inputs["use_cache"] = False  # training and eval never reuse a cache (and packing needs none)
        keep = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep]
        if self.split_head:
            hidden = self.body(**inputs)[0]
            selected = hidden[:, :-1][keep]
            loss_sum = chunked_cross_entropy(selected, targets, self.model.get_output_embeddings())
        else:
            logits = self.model(**inputs).logits
            selected = logits[:, :-1][keep]
            loss_sum = F.cross_entropy(selected.float(), targets, reduction="sum")
        if targets.numel() == 0:
            # No label in this micro-batch: a zero that still reaches every adapter parameter, so
            # that distributed gradient reduction sees each of them in every backward pass.
            loss_sum = selected.sum() * 0.0
        return LossOutput(loss_sum=loss_sum, count=keep.sum())


def head_chunk(head: nn.Module) -> int:
    """Positions per chunk of the head + cross-entropy."""
    return max(1, CHUNK_ELEMENTS // head.weight.shape[0])


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """sum_i CE(head(hidden_i), target_i), a chunk of positions at a time.

    With gradients on and more than one chunk, at most one chunk's logits exist at a time: a
    frozen linear head computes each chunk's gradient as it goes (``HeadLogProbs``), any other
    head is checkpointed (its logits recomputed in backward).
    """
    n = hidden.shape[0]
    chunk = head_chunk(head)
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total
    if n > chunk and fuses(head, hidden):
        return -HeadLogProbs.apply(hidden, targets, head.weight, head.bias, chunk).sum()

    def ce_sum(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    recompute = torch.is_grad_enabled() and n > chunk
    for start in range(0, n, chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + (checkpoint(ce_sum, h, t, use_reentrant=False) if recompute else ce_sum(h, t))
    return total


def fuses(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether ``HeadLogProbs`` may stand in for ``head``: gradients wanted for the hidden states
    only, through a plain ``nn.Linear`` whose call does nothing but its matmul (no hooks, no
    replaced forward: Accelerate's device hooks, a test's probe) and whose whole weight is here
    (not a shard: FSDP's DTensor, DeepSpeed ZeRO-3's empty placeholder)."""
    if not (torch.is_grad_enabled() and hidden.requires_grad) or type(head) is not nn.Linear:
        return False
    if any(p.requires_grad for p in head.parameters()) or "forward" in head.__dict__:
        return False
    if head._forward_hooks or head._forward_pre_hooks or nn.modules.module._global_forward_hooks:
        return False
    weight = head.weight
    return type(weight) in (torch.Tensor, nn.Parameter) and tuple(weight.shape) == (head.out_features, head.in_features)


class HeadLogProbs(torch.autograd.Function):
    """log p(target_i | hidden_i) per position through a frozen linear head, a chunk at a time.

    log p_t = logits_t - logsumexp(logits) has the gradient (onehot(t) - softmax) with respect to
    the logits, so (onehot(t) - softmax) @ W with respect to hidden_i, one row per position: it is
    computed with each chunk's logits and kept (positions x hidden, as a checkpoint keeps the
    hidden states); backward only scales each row by its position's incoming gradient. Under
    autocast the matmuls run in the autocast dtype, as autograd's would (the logits' gradient is
    cast to their dtype before the matmul, like the backward of ``.float()``).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(h, weight, bias)
            dtype = logits.dtype
            logp = torch.log_softmax(logits.float(), dim=-1)
            del logits
            rows = torch.arange(t.shape[0], device=t.device)
            out[start : start + chunk] = logp[rows, t]
            d = logp.exp_().neg_()  # -softmax, in place of the log-probs
            d[rows, t] += 1.0
            grad[start : start + chunk] = torch.matmul(d.to(dtype), weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_out.unsqueeze(1).to(grad.dtype), None, None, None, None


@torch.no_grad()
def _head_splits_off(model: nn.Module) -> bool:
    """True when the model's logits are exactly head(body(x)): checked on a 4-token probe."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or body is model or not isinstance(head, nn.Module):
        return False
    param = next(model.parameters())
    if param.device.type == "meta":
        return False
    was_training = model.training
    model.eval()  # no dropout: both paths must see the same function
    try:
        ids = torch.arange(1, 5, device=param.device).unsqueeze(0) % model.config.vocab_size
        reference = model(input_ids=ids, use_cache=False).logits.float()
        split = head(body(input_ids=ids, use_cache=False)[0]).float()
    except Exception:  # an architecture whose body takes other inputs: use the full logits
        return False
    finally:
        model.train(was_training)
    scale = reference.abs().max().clamp_min(1.0)
    return split.shape == reference.shape and bool(((split - reference).abs().max() / scale) < 1e-4)
