"""lorafam's preference losses against TRL's (pyproject's dev extra), same weights, same batch.

For each objective the loss and the gradient of every weight of a tiny random Llama must equal
what TRL computes:

* DPO (sigmoid) and IPO: ``trl.DPOTrainer._compute_loss`` with precomputed reference log-probs,
  run on a stand-in for the trainer that carries only the attributes the method reads (building a
  whole DPOTrainer needs a dataset pipeline this test does not exercise); the reference log-probs
  themselves are checked against TRL's fused LM head on the reference model;
* ORPO: ``trl.experimental.orpo.ORPOTrainer``'s ``get_batch_logps`` (mean over answer tokens),
  ``odds_ratio_loss`` and its SFT term (cross-entropy over the whole chosen rows, as
  ``concatenated_forward`` computes it), combined as ``get_batch_loss_metrics`` does. TRL averages
  the SFT term over the batch's chosen tokens and lorafam per pair, so the batch has chosen rows of
  equal length, where the two are the same number;
* SimPO: ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (pure SimPO:
  ``cpo_alpha`` 0, no SFT term).

TRL 1.16's sigmoid DPO has no label smoothing (TRL moved it to other loss types), so conservative
DPO (label_smoothing > 0) is checked against its formula instead, on the same log-probs.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import datasets
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from lorafam.tasks.preference import Preference, PreferenceConfig, PreferenceLoss, _with_reference

VOCAB = 48


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 1


def pair_rows(equal_lengths: bool, seed: int = 0, pairs: int = 4) -> list[dict]:
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(2, VOCAB) for _ in range(n)]  # noqa: E731  (0 pads, 1 ends)
    rows = []
    for _ in range(pairs):
        prompt = ids(3 if equal_lengths else rng.randint(1, 6))
        chosen = ids(4 if equal_lengths else rng.randint(1, 7)) + [1]
        rejected = ids(rng.randint(1, 7)) + [1]
        rows.append({
            "input_ids": prompt + chosen, "attention_mask": [1] * (len(prompt) + len(chosen)),
            "labels": [-100] * len(prompt) + chosen,
            "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected,
        })
    return rows


def models() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A policy and a reference that differs from it (so the log-ratios are not zero)."""
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(VOCAB)).float()
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.train(), reference.eval()


def lorafam_loss_and_grads(policy, config: PreferenceConfig, batch: dict) -> tuple[torch.Tensor, dict]:
    model = copy.deepcopy(policy)
    out = PreferenceLoss(model, config)(**batch)
    loss = out["loss_sum"] / out["count"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def grads_of(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(ours: tuple[torch.Tensor, dict], theirs: tuple[torch.Tensor, dict]) -> None:
    loss, grads = ours
    trl_loss, trl_grads = theirs
    torch.testing.assert_close(loss, trl_loss.detach().to(loss.dtype), rtol=1e-5, atol=1e-6)
    assert grads.keys() == trl_grads.keys()
    scale = max(float(g.abs().max()) for g in trl_grads.values())
    assert scale > 0
    for name in grads:
        # fp32 sums in a different order: agreement to rounding, relative to the largest gradient.
        torch.testing.assert_close(grads[name], trl_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def batch_with_reference(rows: list[dict], reference) -> dict:
    task = Preference(PreferenceConfig(objective="dpo"))
    collate = task.collator(_Tokenizer())
    dataset = _with_reference(datasets.Dataset.from_list(rows), reference, collate, batch_size=3)
    return collate([dataset[i] for i in range(len(dataset))])


def trl_dpo_loss(model, batch: dict, loss_type: str, beta: float) -> torch.Tensor:
    from accelerate import Accelerator
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    half = batch["input_ids"].shape[0] // 2
    completion_mask = (batch["labels"] != -100).long()
    stand_in = SimpleNamespace(
        model=model, accelerator=Accelerator(cpu=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": completion_mask,
        "ref_chosen_logps": batch["ref_logps"][:half].float(), "ref_rejected_logps": batch["ref_logps"][half:].float(),
    }
    return DPOTrainer._compute_loss(stand_in, model, inputs, False)


def test_reference_log_probs_equal_trls_fused_head():
    from trl.trainer.utils import add_fused_lm_head

    policy, reference = models()
    batch = batch_with_reference(pair_rows(equal_lengths=False), reference)
    theirs_model = copy.deepcopy(reference)
    add_fused_lm_head(theirs_model)
    with torch.no_grad():
        out = theirs_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                           fused_lm_head=True)
    theirs = out.log_probs.sum(dim=1)
    torch.testing.assert_close(batch["ref_logps"].float(), theirs.float(), rtol=1e-5, atol=1e-5)
    assert float((batch["ref_logps"]).abs().min()) > 0  # really summed log-probs


@pytest.mark.parametrize("objective, loss_type, beta", [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 0.7), ("ipo", "ipo", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_and_ipo_losses_and_gradients_equal_trls(objective, loss_type, beta):
    policy, reference = models()
    batch = batch_with_reference(pair_rows(equal_lengths=False), reference)
    ours = lorafam_loss_and_grads(policy, PreferenceConfig(objective=objective, beta=beta), batch)
    theirs_model = copy.deepcopy(policy)
    trl_loss = trl_dpo_loss(theirs_model, batch, loss_type, beta)
    trl_loss.backward()
    assert_same(ours, (trl_loss, grads_of(theirs_model)))


def test_conservative_dpo_is_the_label_smoothed_formula():
    policy, reference = models()
    batch = batch_with_reference(pair_rows(equal_lengths=False), reference)
    config = PreferenceConfig(objective="dpo", label_smoothing=0.2)
    model = copy.deepcopy(policy)
    logp, _, _ = PreferenceLoss(model, config).logps(batch["labels"], input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ratios = logp - batch["ref_logps"].float()
    half = ratios.shape[0] // 2
    margin = 0.1 * (ratios[:half] - ratios[half:])
    expected = (-0.8 * F.logsigmoid(margin) - 0.2 * F.logsigmoid(-margin)).mean()
    out = PreferenceLoss(copy.deepcopy(policy), config)(**batch)
    torch.testing.assert_close(out["loss_sum"] / out["count"], expected, rtol=1e-6, atol=1e-7)


def test_orpo_loss_and_gradients_equal_trls():
    from accelerate import Accelerator
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models()
    rows = pair_rows(equal_lengths=True)
    batch = Preference(PreferenceConfig(objective="orpo")).collator(_Tokenizer())(rows)
    ours = lorafam_loss_and_grads(policy, PreferenceConfig(objective="orpo"), batch)

    model = copy.deepcopy(policy)
    half = batch["input_ids"].shape[0] // 2
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    # concatenated_forward's SFT term: every real token of the chosen rows (prompt too).
    sequence = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    nll = F.cross_entropy(logits[:half, :-1].reshape(-1, VOCAB), sequence[:half, 1:].reshape(-1))
    stand_in = SimpleNamespace(beta=0.1, accelerator=Accelerator(cpu=True))
    losses, *_ = ORPOTrainer.odds_ratio_loss(stand_in, logps[:half], logps[half:])
    trl_loss = nll - losses.mean()  # get_batch_loss_metrics
    trl_loss.backward()
    assert_same(ours, (trl_loss, grads_of(model)))


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_loss_and_gradients_equal_trls(beta, gamma):
    from accelerate import Accelerator
    from trl.experimental.cpo import CPOTrainer

    policy, _ = models()
    batch = Preference(PreferenceConfig(objective="simpo")).collator(_Tokenizer())(pair_rows(equal_lengths=False))
    ours = lorafam_loss_and_grads(policy, PreferenceConfig(objective="simpo", beta=beta, gamma=gamma), batch)

    model = copy.deepcopy(policy)
    half = batch["input_ids"].shape[0] // 2
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = CPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    stand_in = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                               accelerator=Accelerator(cpu=True))
    losses, _, _ = CPOTrainer.cpo_loss(stand_in, logps[:half], logps[half:])
    trl_loss = losses.mean()
    trl_loss.backward()
    assert_same(ours, (trl_loss, grads_of(model)))


def test_defaults_are_the_documented_ones():
    from trl import DPOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    assert PreferenceConfig(objective="dpo").resolved_beta == DPOConfig.beta == 0.1
    assert PreferenceConfig(objective="ipo").resolved_beta == DPOConfig.beta
    assert PreferenceConfig(objective="orpo").resolved_beta == ORPOConfig.beta == 0.1
    assert PreferenceConfig(objective="simpo").gamma == CPOConfig.simpo_gamma == 0.5
    assert PreferenceConfig(objective="simpo").resolved_beta == 2.0  # the SimPO paper's; TRL's 0.1 is CPO's
