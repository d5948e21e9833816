"""Preference tuning: a causal LM trained on pairs (prompt, chosen answer, rejected answer).

A prepared row is one pair: the chosen side in ``input_ids``/``attention_mask``/``labels`` (so the
loop's token counting and every causal-lm tool read it as they read any row), the rejected side in
``rejected_input_ids``/``rejected_labels``, and, for the objectives that compare with a reference
(DPO, IPO), ``ref_chosen_logp``/``ref_rejected_logp``: the starting model's summed log-probabilities
of each answer, computed once before any training (``add_reference``). Labels mark the answer
tokens only (end-of-turn / EOS included), as lorafam.data.formats.preference writes them.

One label unit is one pair: ``loss_module`` returns the sum of the per-pair losses and the number of
pairs, so the trainer's step normalisation (over every micro-batch on every process) makes
grad_accum and the process count train the same adapter, as for causal LM.

The objectives, with ``logp`` the summed and ``avg`` the per-token mean log-probability of an
answer under the policy, ``ref`` under the reference, and ``len`` its number of answer tokens:

* ``dpo`` (Rafailov et al. 2023): -(1-e) logsig(b D) - e logsig(-b D), D = (logp_c - ref_c) -
  (logp_r - ref_r); e = ``label_smoothing`` (conservative DPO; 0 is the paper's loss).
* ``ipo`` (Azar et al. 2023) as TRL computes it: (D' - 1/(2 tau))^2 with D' the log-ratios
  divided by each answer's length (TRL: normalised with the IPO authors' agreement).
* ``orpo`` (Hong et al. 2024), reference-free: nll_c - lambda logsig(log-odds(avg_c) - log-odds(avg_r)),
  log-odds(p) = log p - log(1 - p). The SFT term nll_c covers the whole chosen sequence (prompt and
  answer), as the authors' code and TRL compute it, but as each pair's mean over its tokens, so the
  step is normalised over pairs like every other objective (TRL averages over the batch's chosen
  tokens; the two agree when the chosen rows have equal lengths).
* ``simpo`` (Meng et al. 2024), reference-free: -logsig(b (avg_c - avg_r) - gamma).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorafam.adapters.dropout import mix
from lorafam.tasks.base import IGNORE_INDEX, LossOutput, TaskLossModule
from lorafam.tasks.causal_lm import CausalLM, HeadLogProbs, _head_splits_off, fuses, head_chunk

Objective = Literal["dpo", "ipo", "orpo", "simpo"]

#: Each objective's default beta: DPO 0.1 (paper, TRL); IPO tau 0.1 (TRL's DPOConfig.beta);
#: ORPO lambda 0.1 (paper, TRL's ORPOConfig.beta); SimPO 2.0 (the paper's setting for Mistral-Base
#: and within its 2.0-2.5 range; TRL's CPOConfig.beta default 0.1 is CPO's, not SimPO's).
DEFAULT_BETA: dict[str, float] = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0}
NEEDS_REFERENCE = frozenset({"dpo", "ipo"})


class PreferenceConfig(BaseModel):
    """The ``preference:`` section of a recipe (model.task preference)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    objective: Objective = Field(
        "dpo",
        description="dpo (sigmoid; needs the reference), ipo (squared, length-normalised; needs the reference), "
        "orpo (odds ratio + SFT term, reference-free), simpo (length-normalised margin, reference-free).",
    )
    beta: float | None = Field(
        None, gt=0,
        description="dpo: beta; ipo: tau; orpo: lambda; simpo: beta. null: the objective's default "
        "(dpo 0.1, ipo 0.1, orpo 0.1, simpo 2.0).",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo only: the share of pairs assumed mislabelled (conservative DPO); 0 = DPO."
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo only: the target reward margin (TRL's simpo_gamma default).")

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.objective]

    @property
    def needs_reference(self) -> bool:
        return self.objective in NEEDS_REFERENCE


class Preference(CausalLM):
    name = "preference"
    description = "preference: pairs of chosen/rejected answers (DPO, IPO, ORPO, SimPO; see the preference: section)"
    count_name = "pairs"
    shown_metrics = ("loss", "accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "policy_accuracy")
    eval_sums = ("loss_sum", "count", "correct", "chosen_reward", "rejected_reward", "policy_correct")

    def __init__(self, config: PreferenceConfig | None = None):
        self.config = config or PreferenceConfig()

    def for_recipe(self, recipe: Any) -> "Preference":
        return Preference(recipe.preference or PreferenceConfig())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return PreferenceLoss(model, self.config)

    def label_count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0]) // 2  # chosen rows, then as many rejected ones

    def row_tokens(self, row: dict[str, Any]) -> int:
        return len(row["input_ids"]) + len(row["rejected_input_ids"])  # both sides go through the model

    def row_keys(self, example_keys: list[int]) -> list[int]:
        # A batch has each pair's chosen row, then its rejected row: each gets a dropout mask of its
        # own, keyed by the pair, so the masks follow the pair through any batch layout.
        return list(example_keys) + [mix(key, "rejected") for key in example_keys]

    def row_features(self) -> Any:
        features = super().row_features()
        features["rejected_input_ids"] = features["input_ids"]
        features["rejected_labels"] = features["labels"]
        return features

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        count = sums["count"]
        if not count:
            return {"loss": float("nan")}
        chosen, rejected = sums["chosen_reward"] / count, sums["rejected_reward"] / count
        return {
            "loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count,
            "rewards_chosen": chosen, "rewards_rejected": rejected, "reward_margin": chosen - rejected,
            "policy_accuracy": sums["policy_correct"] / count, "pairs": int(count),
        }

    def collator(self, tokenizer: Any) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """Chosen rows then rejected rows, padded together (one forward for both sides), and the
        reference log-probs in the same order when the rows carry them."""
        rows_collate = super().collator(tokenizer)

        def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
            rejected = [{"input_ids": e["rejected_input_ids"], "attention_mask": [1] * len(e["rejected_input_ids"]),
                         "labels": e["rejected_labels"]} for e in examples]
            batch = rows_collate([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in examples] + rejected)
            if "ref_chosen_logp" in examples[0]:
                batch["ref_logps"] = torch.tensor(
                    [e["ref_chosen_logp"] for e in examples] + [e["ref_rejected_logp"] for e in examples], dtype=torch.float64
                )
            return batch

        return collate

    @torch.no_grad()
    def add_reference(self, data: Any, reference: Callable[[], Any], tokenizer: Any, batch_size: int,
                      say: Callable[[str], None] = lambda line: None) -> Any:
        """``data`` (PreparedData) with each row's reference log-probs as columns, computed once by
        the model ``reference()`` gives (the starting model: the adapter off, before any training;
        so PiSSA's original W, Delta-LoRA's W before it moves, LoRA-drop before its probe run), in
        the model's own dtype and eval mode. Stored with the rows, they follow each pair through
        any batch layout and a resume. Unchanged for a reference-free objective."""
        if not self.config.needs_reference:
            return data
        collate = self.collator(tokenizer)
        pairs = len(data.train) + (len(data.eval) if data.eval is not None else 0)
        say(f"reference log-probs: scoring {pairs:,} pairs with the starting model (adapter off), once")
        with reference() as model, torch.no_grad():
            train = _with_reference(data.train, model, collate, batch_size)
            evaluation = _with_reference(data.eval, model, collate, batch_size) if data.eval is not None else None
        return dataclasses.replace(data, train=train, eval=evaluation)


def _with_reference(rows: Any, reference: nn.Module, collate: Callable, batch_size: int) -> Any:
    was_training = reference.training
    reference.eval()
    device = next(reference.parameters()).device
    logp = AnswerLogProbs(reference)
    chosen, rejected = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            sums, _, _ = logp(batch["labels"].to(device), input_ids=batch["input_ids"].to(device),
                              attention_mask=batch["attention_mask"].to(device))
            half = sums.shape[0] // 2
            chosen += sums[:half].double().tolist()
            rejected += sums[half:].double().tolist()
    finally:
        reference.train(was_training)
    return rows.add_column("ref_chosen_logp", chosen).add_column("ref_rejected_logp", rejected)


class AnswerLogProbs:
    """Per row: the summed log-probability of its labelled tokens (fp32) and their number.

    Like CausalLMLoss, only the scored positions reach the output head, a chunk at a time
    (with gradients, as chunked_cross_entropy does it), so no (tokens x vocabulary) tensor exists
    for the prompts.
    ``also`` marks further next-token positions to score (ORPO's SFT term covers the whole chosen
    sequence); their log-probs come back as a third value, per row."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.split_head = _head_splits_off(model)

    def __call__(self, labels: torch.Tensor, also: torch.Tensor | None = None,
                 **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        inputs["use_cache"] = False
        answer = labels[:, 1:] != IGNORE_INDEX
        scored = answer if also is None else answer | also
        targets = inputs["input_ids"][:, 1:][scored]  # labels are the ids where they are set
        if self.split_head:
            body = getattr(self.model, self.model.base_model_prefix)
            selected = body(**inputs)[0][:, :-1][scored]
            token_logps = _chunked_token_logps(selected, targets, self.model.get_output_embeddings())
        else:
            selected = self.model(**inputs).logits[:, :-1][scored].float()
            token_logps = -F.cross_entropy(selected, targets, reduction="none")
        per_position = token_logps.new_zeros(scored.shape).masked_scatter(scored, token_logps)
        sums = (per_position * answer).sum(dim=1)
        return sums, answer.sum(dim=1), None if also is None else (per_position * also).sum(dim=1)


def _chunked_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    chunk = head_chunk(head)
    if hidden.shape[0] > chunk and fuses(head, hidden):
        return HeadLogProbs.apply(hidden, targets, head.weight, head.bias, chunk)

    def logps(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(head(h).float(), t, reduction="none")

    recompute = torch.is_grad_enabled() and hidden.shape[0] > chunk
    pieces = [
        checkpoint(logps, hidden[s : s + chunk], targets[s : s + chunk], use_reentrant=False) if recompute
        else logps(hidden[s : s + chunk], targets[s : s + chunk])
        for s in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(config: PreferenceConfig, logp: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                chosen_nll: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, from the policy's summed log-probs of
    the chosen rows then the rejected rows (``logp``), their answer lengths, the reference's
    log-probs (DPO, IPO) and each chosen row's mean token NLL (ORPO's SFT term)."""
    beta = config.resolved_beta
    half = logp.shape[0] // 2
    lengths = lengths.to(logp.dtype).clamp_min(1.0)
    if config.needs_reference:
        if ref is None:
            raise ValueError(f"preference objective {config.objective} needs reference log-probs in the batch")
        ratios = logp - ref.to(logp.dtype)
        chosen, rejected = ratios[:half], ratios[half:]
        if config.objective == "dpo":
            margin = beta * (chosen - rejected)
            losses = -(1 - config.label_smoothing) * F.logsigmoid(margin) - config.label_smoothing * F.logsigmoid(-margin)
        else:  # ipo
            delta = chosen / lengths[:half] - rejected / lengths[half:]
            losses = (delta - 1 / (2 * beta)) ** 2
        return losses, beta * chosen.detach(), beta * rejected.detach()
    average = logp / lengths
    chosen, rejected = average[:half], average[half:]
    if config.objective == "orpo":
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        losses = chosen_nll - beta * F.logsigmoid(log_odds)
    else:  # simpo
        losses = -F.logsigmoid(beta * (chosen - rejected) - config.gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class PreferenceLoss(TaskLossModule):
    """forward(**batch) -> LossOutput: the summed per-pair losses, the number of pairs, and the
    eval sums (rewards, accuracies) of ``Preference.eval_sums``."""

    def __init__(self, model: nn.Module, config: PreferenceConfig):
        super().__init__(model)
        self.config = config
        self.logps = AnswerLogProbs(model)

    def forward(self, labels: torch.Tensor, ref_logps: torch.Tensor | None = None, **inputs: Any) -> LossOutput:
        half = labels.shape[0] // 2
        sequence = None
        if self.config.objective == "orpo":
            # ORPO's SFT term: the NLL of the whole chosen sequence (prompt and answer), as the ORPO
            # authors' code and TRL compute it; per pair, its mean over the row's tokens.
            mask = inputs.get("attention_mask", torch.ones_like(labels))[:, 1:].bool()
            sequence = mask.clone()
            sequence[half:] = False
        logp, lengths, sequence_logp = self.logps(labels, also=sequence, **inputs)
        chosen_nll = None if sequence is None else -sequence_logp[:half] / sequence[:half].sum(dim=1).clamp_min(1)
        losses, chosen, rejected = pair_losses(self.config, logp, lengths, ref_logps, chosen_nll)
        average = (logp / lengths.clamp_min(1)).detach()
        return LossOutput(
            loss_sum=losses.sum(), count=torch.tensor(half, device=logp.device),
            correct=(chosen > rejected).sum(), chosen_reward=chosen.sum(), rejected_reward=rejected.sum(),
            policy_correct=(average[:half] > average[half:]).sum(),
        )
