"""GLoRA's structure search (Chavan et al., 2023): a supernet of every layer's forms, then an
evolutionary search for each layer's forms under a parameter budget.

Supernet. Every adapted layer holds one set of parameters per support tensor, shared by its forms as
in the paper's reference code (ViT-Slim/GLoRA/layer.py): A, B and C keep a pair Xd (rows x r), Xu
(r x cols); their ``lora`` form is Xd @ Xu, ``vector`` the first column of Xd, ``constant`` Xd's first
entry. D and E keep one vector; ``constant`` is its first entry. Each optimizer step draws one form per
tensor per layer, uniformly, from a generator seeded by (seed, step): the same draw on every
process and every micro-batch of a step, so a supernet step does not depend on the batch layout.

Search. The reference code's evolution: a random population within the budget, then per generation
the ``select`` fittest survive, ``mutation`` children re-draw each tensor's form with probability
``mutation_prob``, ``crossover`` children take each tensor's form from one of two parents, and random
candidates fill the population up again; a candidate over ``max_params`` is rejected. Fitness is
measured with the supernet's own weights, forward only, on held-out rows (the task's
``search_fitness``: minus the eval loss for a causal LM, accuracy for a classifier).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lorafam.adapters.base import AdapterLayer
from lorafam.adapters.dropout import mix
from lorafam.errors import LorafamError

TENSORS = ("A", "B", "C", "D", "E")
#: Each tensor's forms, in the reference code's order.
CHOICES: dict[str, tuple[str, ...]] = {
    "A": ("lora", "vector", "constant", "none"),
    "B": ("lora", "vector", "constant", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("constant", "none", "vector"),
    "E": ("constant", "none", "vector"),
}
Candidate = tuple[tuple[str, ...], ...]  # per adapted layer (in model order), the forms of A..E


class GLoRASearch(BaseModel):
    """The ``search:`` block of a glora adapter. Defaults are the reference code's (evolution.py)."""

    model_config = ConfigDict(extra="forbid")

    supernet_steps: int = Field(200, ge=1, description="Optimizer steps training the supernet (each draws one form per tensor per layer).")
    population: int = Field(50, ge=2, description="Candidates per generation.")
    generations: int = Field(20, ge=1, description="Generations of the evolution.")
    select: int = Field(10, ge=1, description="Fittest candidates kept as parents each generation.")
    mutation: int = Field(25, ge=0, description="Children by mutation per generation.")
    crossover: int = Field(25, ge=0, description="Children by crossover per generation.")
    mutation_prob: float = Field(0.2, ge=0, le=1, description="Chance that a mutation re-draws one tensor's form.")
    max_params: int | None = Field(None, ge=0, description="Budget: a candidate's adapter parameters at most this many (null: no budget).")
    eval_examples: int = Field(256, ge=1, description="Held-out examples (from the eval split) that score a candidate.")
    inherit: bool = Field(True, description="The chosen subnet starts from the supernet's weights (the paper's code); false: fresh init.")

    @model_validator(mode="after")
    def _fits(self) -> "GLoRASearch":
        if self.select > self.population:
            raise ValueError(f"search.select ({self.select}) cannot exceed search.population ({self.population})")
        if self.mutation + self.crossover > self.population:
            raise ValueError("search.mutation + search.crossover cannot exceed search.population")
        return self


def choices_for(has_bias: bool, can_add_bias: bool) -> dict[str, tuple[str, ...]]:
    """The forms a layer can take: C and E only where a bias can exist, D only with a base bias."""
    bias_terms = has_bias or can_add_bias
    return {
        "A": CHOICES["A"], "B": CHOICES["B"],
        "C": CHOICES["C"] if bias_terms else ("none",),
        "D": CHOICES["D"] if has_bias else ("none",),
        "E": CHOICES["E"] if bias_terms else ("none",),
    }


class SuperTensor(nn.Module):
    """One support tensor's parameters, shared by all its forms."""

    def __init__(self, shape: tuple[int, ...], r: int, device: torch.device):
        super().__init__()
        kw = {"device": device, "dtype": torch.float32}
        if len(shape) == 2:  # A, B (out x in) and C (in x 1)
            self.Xd = nn.Parameter(torch.zeros(shape[0], r, **kw))
            self.Xu = nn.Parameter(nn.init.xavier_uniform_(torch.empty(r, shape[1], **kw)))
        else:  # D, E (out)
            self.X = nn.Parameter(torch.zeros(shape, **kw))

    def value(self, form: str) -> torch.Tensor | None:
        if form == "none":
            return None
        if hasattr(self, "Xu"):
            return {"lora": lambda: self.Xd @ self.Xu, "vector": lambda: self.Xd[:, :1], "constant": lambda: self.Xd[0, 0]}[form]()
        return self.X if form == "vector" else self.X[0]

    def subnet_state(self, form: str) -> dict[str, torch.Tensor]:
        """The parameters of a plain GLoRA SupportTensor of ``form`` holding this form's values."""
        if hasattr(self, "Xu"):
            return {"lora": {"Xd": self.Xd, "Xu": self.Xu}, "vector": {"X": self.Xd[:, :1]},
                    "constant": {"X": self.Xd[0, :1]}}[form]
        return {"X": self.X if form == "vector" else self.X[:1]}

    def form_parameters(self, form: str) -> int:
        """Parameters the form has in a subnet (the reference code's count)."""
        if form == "none":
            return 0
        if form == "constant":
            return 1
        if hasattr(self, "Xu"):
            rows, r = self.Xd.shape
            return rows * r + r * self.Xu.shape[1] if form == "lora" else rows
        return self.X.numel()


class GLoRASuperLayer(AdapterLayer):
    """A layer of the supernet: every form of A..E, one active at a time (``active``)."""

    reads_base_weight = True  # composes W0 + W0 * A + B in fp32, as GLoRALayer

    def __init__(self, base_layer: nn.Linear, r: int, can_add_bias: bool):
        super().__init__(base_layer)
        out_f, in_f, device = self.out_features, self.in_features, base_layer.weight.device
        self.choices = choices_for(base_layer.bias is not None, can_add_bias)
        shapes = {"A": (out_f, in_f), "B": (out_f, in_f), "C": (in_f, 1), "D": (out_f,), "E": (out_f,)}
        self.support = nn.ModuleDict({t: SuperTensor(shapes[t], r, device) for t in TENSORS if self.choices[t] != ("none",)})
        self.active: tuple[str, ...] = tuple(c[0] for c in self.choices.values())

    def values(self, forms: Sequence[str]) -> dict[str, torch.Tensor | None]:
        return {t: self.support[t].value(f) if t in self.support else None for t, f in zip(TENSORS, forms)}

    def parameters_of(self, forms: Sequence[str]) -> int:
        return sum(self.support[t].form_parameters(f) for t, f in zip(TENSORS, forms) if t in self.support)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lorafam.adapters.glora import compose

        weight, bias = compose(self.base_weight().float(), self.base_layer.bias, self.values(self.active), self.out_features)
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def draw(layers: Sequence[GLoRASuperLayer], seed: int, step: int) -> Candidate:
    """The forms a supernet step trains: uniform per tensor per layer, a function of (seed, step) only."""
    generator = torch.Generator().manual_seed(mix(seed, "glora-supernet", step))
    return tuple(
        tuple(choices[int(torch.randint(len(choices), (), generator=generator))] for choices in layer.choices.values())
        for layer in layers
    )


def set_active(layers: Sequence[GLoRASuperLayer], candidate: Candidate) -> None:
    for layer, forms in zip(layers, candidate):
        layer.active = forms


def candidate_parameters(layers: Sequence[GLoRASuperLayer], candidate: Candidate) -> int:
    return sum(layer.parameters_of(forms) for layer, forms in zip(layers, candidate))


def evolve(
    layers: Sequence[GLoRASuperLayer], cfg: GLoRASearch, seed: int, fitness: Callable[[Candidate], float],
    on_generation: Callable[[int, int, float, int], None] = lambda generation, total, best, params: None,
    saved: dict[str, Any] | None = None, save: Callable[[dict[str, Any]], None] = lambda state: None,
) -> tuple[Candidate, list[dict[str, Any]]]:
    """The fittest candidate within the budget, and each generation's best (fitness, parameters).

    After each generation the whole search state (every score, the parents, the next population, the
    generator) goes to ``save``; given back as ``saved``, the search goes on from the next generation
    and ends where an uninterrupted one would.
    """
    rng = random.Random(mix(seed, "glora-evolution"))
    scores: dict[Candidate, float] = {}

    def legal(candidate: Candidate) -> bool:
        """Within the budget, not empty, and not seen before; scored on first sight (the reference's
        is_legal; an empty structure, every tensor 'none', leaves nothing to train)."""
        if candidate in scores:
            return False
        params = candidate_parameters(layers, candidate)
        if params == 0 or (cfg.max_params is not None and params > cfg.max_params):
            return False
        scores[candidate] = fitness(candidate)
        return True

    def fill(pool: list[Candidate], wanted: int, make: Callable[[], Candidate]) -> list[Candidate]:
        tries = 0
        while len(pool) < wanted and tries < 50 * max(wanted, 1):
            tries += 1
            candidate = make()
            if legal(candidate):
                pool.append(candidate)
        return pool

    def random_candidate() -> Candidate:
        return tuple(tuple(rng.choice(c) for c in layer.choices.values()) for layer in layers)

    if saved is not None:
        first = saved["generation"] + 1
        scores = {_candidate(c): score for c, score in saved["scores"]}
        top, population = [_candidate(c) for c in saved["top"]], [_candidate(c) for c in saved["population"]]
        history = list(saved["history"])
        version, internal, gauss = saved["rng"]
        rng.setstate((version, tuple(internal), gauss))
    else:
        first, history, top = 1, [], []
        population = fill([], cfg.population, random_candidate)
        if not population:
            raise LorafamError(
                f"adapter.search.max_params: {cfg.max_params} admits no structure that was tried (the smallest "
                "non-empty one has 1 parameter); raise it or set it to null"
            )
    for generation in range(first, cfg.generations + 1):
        # Ties broken by the candidate itself: every process must pick the same (set order is per process).
        top = sorted(dict.fromkeys(top + population), key=lambda c: (-scores[c], c))[: cfg.select]
        best = top[0]
        history.append({"generation": generation, "best_fitness": scores[best], "best_params": candidate_parameters(layers, best)})
        on_generation(generation, cfg.generations, scores[best], candidate_parameters(layers, best))
        if generation == cfg.generations:
            break

        def mutated() -> Candidate:
            parent = rng.choice(top)
            return tuple(
                tuple(rng.choice(c) if rng.random() < cfg.mutation_prob else form for form, c in zip(forms, layer.choices.values()))
                for forms, layer in zip(parent, layers)
            )

        def crossed() -> Candidate:
            a, b = rng.choice(top), rng.choice(top)
            return tuple(tuple(rng.choice((x, y)) for x, y in zip(fa, fb)) for fa, fb in zip(a, b))

        children = fill([], cfg.mutation, mutated) + fill([], cfg.crossover, crossed)
        population = fill(children, cfg.population, random_candidate)
        version, internal, gauss = rng.getstate()
        save({"generation": generation, "scores": [[c, score] for c, score in scores.items()], "top": top,
              "population": population, "history": history, "rng": [version, list(internal), gauss]})
    return top[0], history


def _candidate(value: Any) -> Candidate:
    """A candidate read back from JSON (lists) as the tuples the search keys by."""
    return tuple(tuple(forms) for forms in value)
