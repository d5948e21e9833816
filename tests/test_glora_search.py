"""GLoRA's structure search (adapter.search): the supernet's draws, its gradients, the evolution's
budget, the subnet it hands over, and whole runs through the CLI on a tiny Llama."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from tinyrun import cli, make_chat_data, write_recipe
from test_distributed import launch, relative_difference

from lorafam.adapters.glora import GLoRA, GLoRAConfig
from lorafam.adapters.glora_search import CHOICES, TENSORS, GLoRASearch, GLoRASuperLayer, candidate_parameters, draw, evolve
from lorafam.run import ADAPTER_WEIGHTS

SEARCH = {"supernet_steps": 6, "population": 6, "generations": 3, "select": 2, "mutation": 2, "crossover": 2,
          "eval_examples": 8, "max_params": 600}


def super_layers(n: int = 3, bias: bool = True) -> list[GLoRASuperLayer]:
    torch.manual_seed(0)
    return [GLoRASuperLayer(nn.Linear(8, 6, bias=bias), r=2, can_add_bias=True) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# The supernet


def test_a_steps_draw_depends_only_on_the_seed_and_the_step_and_covers_every_form():
    layers = super_layers()
    assert draw(layers, 3, 7) == draw(super_layers(), 3, 7)  # other layers, same shapes: same draw
    draws = [draw(layers, 3, step) for step in range(1, 201)]
    assert len(set(draws)) > 150  # a new structure nearly every step
    assert draw(layers, 4, 7) != draw(layers, 3, 7) or draw(layers, 4, 8) != draw(layers, 3, 8)
    for i, tensor in enumerate(TENSORS):  # every form of every tensor gets trained
        assert {d[0][i] for d in draws} == set(CHOICES[tensor])


def test_no_bias_means_no_D_and_no_bias_terms_where_none_can_be_added():
    no_bias = GLoRASuperLayer(nn.Linear(8, 6, bias=False), r=2, can_add_bias=False)
    assert no_bias.choices["C"] == no_bias.choices["D"] == no_bias.choices["E"] == ("none",)
    assert set(no_bias.support) == {"A", "B"}


@pytest.mark.parametrize("forms", [("vector", "none", "lora", "constant", "none"), ("lora", "constant", "none", "vector", "constant")])
def test_a_supernet_step_trains_only_the_drawn_forms_parameters(forms):
    layer = super_layers(1)[0]
    with torch.no_grad():  # every parameter away from its init, so each form's gradient is non-zero
        for p in layer.support.parameters():
            p.normal_()
    layer.active = forms
    layer(torch.randn(5, 8)).pow(2).sum().backward()
    for tensor, form in zip(TENSORS, forms):
        part = layer.support[tensor]
        grads = {name: p.grad for name, p in part.named_parameters()}
        if form == "none":
            assert all(g is None for g in grads.values()), tensor
        elif form == "lora":
            assert all(g is not None and g.abs().min() > 0 for g in grads.values()), tensor
        elif form == "vector" and "Xd" in grads:  # A, B, C: Xd's first column only
            assert grads["Xu"] is None and grads["Xd"][:, 0].abs().min() > 0 and not grads["Xd"][:, 1:].any(), tensor
        elif form == "constant" and "Xd" in grads:  # Xd's first entry only
            assert grads["Xu"] is None and grads["Xd"][0, 0] != 0 and grads["Xd"].count_nonzero() == 1, tensor
        elif form == "vector":  # D, E: the whole vector
            assert grads["X"].abs().min() > 0, tensor
        else:  # D, E constant: the first entry
            assert grads["X"][0] != 0 and grads["X"].count_nonzero() == 1, tensor


# --------------------------------------------------------------------------------------------------
# The evolution


def test_the_search_never_returns_or_scores_a_candidate_over_budget():
    layers = super_layers(4)
    budget = 120
    scored: list = []

    def bigger_is_better(candidate):  # a fitness that pushes against the budget
        scored.append(candidate)
        return float(candidate_parameters(layers, candidate))

    cfg = GLoRASearch(population=12, generations=5, select=4, mutation=4, crossover=4, max_params=budget)
    best, history = evolve(layers, cfg, seed=0, fitness=bigger_is_better)
    assert scored and all(candidate_parameters(layers, c) <= budget for c in scored)
    assert candidate_parameters(layers, best) <= budget
    assert candidate_parameters(layers, best) > budget // 2  # and it does go for the budget
    assert [h["generation"] for h in history] == [1, 2, 3, 4, 5]
    assert all(b["best_fitness"] >= a["best_fitness"] for a, b in zip(history, history[1:]))  # the best survives


def test_the_same_seed_finds_the_same_structure():
    layers = super_layers(4)
    fitness = lambda c: -float(hash(str(c)) % 1000)  # noqa: E731  (deterministic within the process)
    cfg = GLoRASearch(population=8, generations=3, select=2, mutation=3, crossover=3)
    assert evolve(layers, cfg, 5, fitness)[0] == evolve(layers, cfg, 5, fitness)[0]


def test_an_impossible_budget_is_one_clear_error():
    from lorafam.errors import LorafamError

    with pytest.raises(LorafamError, match="admits no structure"):
        evolve(super_layers(1, bias=False), GLoRASearch(population=4, select=2, mutation=1, crossover=1, max_params=0),
               0, lambda c: 0.0)


# --------------------------------------------------------------------------------------------------
# The subnet handed to the run


class FakeTools:
    """What Variant.prepare gets, on a fixed batch: 'training' moves every supernet weight, fitness is
    minus the batch's loss with the forms set as they are."""

    def __init__(self, model, batch):
        self.model, self.batch, self.scores = model, batch, []

    def __call__(self, dataset, steps, phase):
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)

    def fitness(self, max_examples):
        with torch.no_grad():
            loss = float(self.model(**self.batch, labels=self.batch["input_ids"]).loss)
        self.scores.append(loss)
        return -loss

    def report_generation(self, *args):
        pass

    def load_tensors(self, name):
        return None

    def load_state(self, name):
        return None

    def save_tensors(self, name, tensors):
        pass

    def save_state(self, name, state):
        pass


class StepThrough(FakeTools):
    """A supernet pass of ``steps`` steps that records the forms each step trains (the loop calls
    after_step after each)."""

    def __init__(self, model, batch, variant, steps):
        super().__init__(model, batch)
        self.variant, self.steps, self.trained = variant, steps, []

    def __call__(self, dataset, steps, phase):
        for step in range(1, self.steps + 1):
            self.trained.append(tuple(layer.active for layer in self.variant.layers.values()))
            self.variant.after_step(step, self.steps)


def test_each_supernet_step_trains_its_own_seeded_draw(tiny_llama):
    torch.manual_seed(1)
    config = GLoRAConfig(variant="glora", r=2, target_modules=["q_proj", "v_proj"],
                         search=GLoRASearch(population=4, generations=1, select=2, mutation=1, crossover=1))
    variant = GLoRA(config).apply(tiny_llama)
    tools = StepThrough(tiny_llama, {"input_ids": torch.randint(0, 1000, (2, 8))}, variant, steps=5)
    supernet_layers = []
    original = GLoRA._swap
    variant._swap = lambda path, layer: (supernet_layers.append(layer), original(variant, path, layer))
    variant.prepare(tools, None, seed=7)
    layers = supernet_layers[: len(variant.layers)]  # the supernet's, before the subnet replaced them
    assert tools.trained == [draw(layers, 7, step) for step in range(1, 6)]
    assert len(set(tools.trained)) > 1


def test_a_candidates_fitness_equals_the_eval_of_that_subnet_built_directly(tiny_llama):
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(0, 1000, (3, 12))}
    config = GLoRAConfig(variant="glora", r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                         search=GLoRASearch(population=6, generations=2, select=2, mutation=2, crossover=2))
    variant = GLoRA(config).apply(tiny_llama)
    record = variant.prepare(FakeTools(tiny_llama, batch), None, seed=0)
    assert variant.config.layer_forms.keys() == variant.layers.keys()  # every layer in its searched forms
    assert all(type(layer).__name__ == "GLoRALayer" for layer in variant.layers.values())
    with torch.no_grad():
        direct = float(tiny_llama(**batch, labels=batch["input_ids"]).loss)
    assert direct == pytest.approx(-record["fitness"], rel=1e-6, abs=1e-6)  # fp32 rounding of the same sums
    trainable = sum(p.numel() for p in tiny_llama.parameters() if p.requires_grad)
    assert trainable == record["params"]  # the subnet has exactly the parameters the search counted


# --------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """conftest's ``assets`` with chat pairs: 56 train and 8 eval examples."""
    return make_chat_data(tmp_path_factory.mktemp("glora-search") / "chat.jsonl", rows=64)


def search_recipe(tmp_path: Path, assets, name: str, batch: int = 4, accum: int = 1) -> Path:
    model, data = assets
    adapter = {"variant": "glora", "r": 4, "target_modules": ["q_proj", "v_proj"], "search": SEARCH}
    return write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=adapter,
                        train={"max_steps": 4, "batch_size": batch, "grad_accum": accum, "mixed_precision": "no", "eval_batch_size": 8,
                               "save_every": 2, "lr": 0.01})  # AdamW: a parameter given a zero gradient instead of none would move


def trained(path: Path) -> Path:
    result = cli("train", path)
    assert result.exit_code == 0, result.output + result.stderr
    return path.with_suffix("")


def test_a_searched_run_records_its_structure_merges_exactly_and_repeats(tmp_path, assets):
    run = trained(search_recipe(tmp_path, assets, "one"))
    info = json.loads((run / "run.json").read_text())
    forms = info["prepare"]["forms"]
    assert len(forms) == 4 and len(info["prepare"]["generations"]) == SEARCH["generations"]
    assert info["prepare"]["params"] <= SEARCH["max_params"] and info["trainable_params"] == info["prepare"]["params"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("phase") == "glora_supernet" for r in rows) == SEARCH["supernet_steps"]
    # The run's own eval before training is the chosen subnet on all 8 eval rows: its search fitness.
    assert -info["eval_before"]["loss"] == pytest.approx(info["prepare"]["fitness"], rel=1e-6)
    merged = cli("merge", run, "--output", tmp_path / "merged")  # checked: reloaded with plain transformers
    assert merged.exit_code == 0 and "max abs logit difference" in merged.output, merged.output
    again = trained(search_recipe(tmp_path, assets, "again"))
    assert json.loads((again / "run.json").read_text())["prepare"]["forms"] == forms
    a, b = load_file(run / ADAPTER_WEIGHTS), load_file(again / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_search_does_not_depend_on_the_batch_layout(tmp_path, assets):
    """The supernet's draws and steps, the fitness and so the structure are the same at batch 4 x 1,
    2 x 2 and over two processes of 2 x 1."""
    reference = trained(search_recipe(tmp_path, assets, "b4", 4, 1))
    accumulated = trained(search_recipe(tmp_path, assets, "b2x2", 2, 2))
    two = search_recipe(tmp_path, assets, "two", 2, 1)
    result = launch("-m", "lorafam", "train", two)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expected = json.loads((reference / "run.json").read_text())["prepare"]
    for run in (accumulated, tmp_path / "two"):
        info = json.loads((run / "run.json").read_text())
        assert info["prepare"]["forms"] == expected["forms"]
        assert info["prepare"]["fitness"] == pytest.approx(expected["fitness"], rel=1e-6)
        assert relative_difference(load_file(reference / ADAPTER_WEIGHTS), load_file(run / ADAPTER_WEIGHTS)) < 1e-5
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


def test_a_run_killed_after_the_search_resumes_with_the_same_structure(tmp_path, assets, monkeypatch):
    import signal

    from test_resume import signal_at

    path = search_recipe(tmp_path, assets, "run")
    reference = trained(search_recipe(tmp_path, assets, "reference"))
    signal_at(monkeypatch, 3, signal.SIGTERM)
    assert cli("train", path).exit_code == 143
    monkeypatch.undo()
    resumed = cli("train", path, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert "glora_supernet" not in resumed.output  # the structure is rebuilt from run.json, not searched again
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["prepare"]["forms"] == json.loads((reference / "run.json").read_text())["prepare"]["forms"]
    a, b = load_file(reference / ADAPTER_WEIGHTS), load_file(run / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_subnet_can_be_kept_as_the_search_left_it(tmp_path, assets):
    """train.max_steps: 0 after a search is the authors' code: the chosen forms with the supernet's
    weights, evaluated and saved as they are."""
    model, data = assets
    adapter = {"variant": "glora", "r": 4, "target_modules": ["q_proj", "v_proj"], "search": SEARCH}
    path = write_recipe(tmp_path / "kept.yaml", model, data, tmp_path / "kept", adapter=adapter,
                        train={"max_steps": 0, "mixed_precision": "no", "eval_batch_size": 8, "save_every": None})
    info = json.loads((trained(path) / "run.json").read_text())
    assert info["steps"] == 0 and info["eval_after"] == info["eval_before"]
    assert -info["eval_after"]["loss"] == pytest.approx(info["prepare"]["fitness"], rel=1e-6)
    merged = cli("merge", tmp_path / "kept", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.output


def test_analyze_ranks_draws_the_searched_structure_and_inspect_lists_it(tmp_path, assets):
    run = trained(search_recipe(tmp_path, assets, "drawn"))
    assert (run / "glora_structure.png").is_file()  # written with the run
    drawn = cli("analyze", "ranks", run, "--output", tmp_path / "pictures")
    assert drawn.exit_code == 0, drawn.output + drawn.stderr
    assert (tmp_path / "pictures" / "glora_structure.png").stat().st_size > 1000
    shown = cli("inspect", run)
    forms = json.loads((run / "run.json").read_text())["prepare"]["forms"]
    for path, f in forms.items():  # one line per layer: its five forms, then its path
        assert any(line.split() == [*(f[t] for t in TENSORS), path] for line in shown.output.splitlines()), path


class Killed(Exception):
    """Stands for a SIGKILL: the run stops where it is, nothing more is written."""


@pytest.mark.parametrize("where", ["supernet", "supernet-sigterm", "search"])
def test_a_run_killed_in_its_supernet_or_search_resumes_to_the_same_structure_and_adapter(where, tmp_path, assets, monkeypatch):
    """Killed (or stopped by SIGTERM) inside the supernet pass, the run goes on from the pass's own
    checkpoint; killed in the search, from the last generation saved. Either way it ends with the
    structure, the run.json record and the adapter of the uninterrupted run."""
    import lorafam.api as api_module
    import lorafam.run as run_folder
    from lorafam import api

    reference = trained(search_recipe(tmp_path, assets, "reference"))
    path = search_recipe(tmp_path, assets, "run")
    run = tmp_path / "run"
    if where.startswith("supernet"):  # as the supernet's third step is logged (its checkpoint every 2 steps)
        write = run_folder.write_metrics

        def write_then_stop(handle, row):
            write(handle, row)
            if row.get("phase") == "glora_supernet" and row["step"] == 3:
                if where == "supernet":
                    raise Killed
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(run_folder, "write_metrics", write_then_stop)
    else:  # as generation 2 is reported: generation 1's state is saved, 2's children are not
        def die(self, generation, *args):
            if generation == 2:
                raise Killed

        monkeypatch.setattr(api_module.PrepareTools, "report_generation", die)
    if where == "supernet-sigterm":  # through the CLI: stops after the step with a checkpoint, says how to go on
        stopped = cli("train", path)
        assert stopped.exit_code != 0 and "resume with: lorafam train" in stopped.stderr, stopped.output + stopped.stderr
        assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    else:
        with pytest.raises(Killed):
            api.train(path)
    monkeypatch.undo()
    resumed = cli("train", path, "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    said = " ".join(resumed.output.split())
    if where.startswith("supernet"):  # from the pass's checkpoint: its earlier steps are not taken again
        stop = 2 if where == "supernet" else 3
        checkpoint = run / "prepare" / "glora_supernet" / "checkpoints" / f"step-{stop:06d}"
        assert f"resuming glora_supernet from {checkpoint} (step {stop}/{SEARCH['supernet_steps']})" in said, said
        assert "glora_supernet step 1/" not in said and f"glora_supernet step {stop + 1}/" in said
    else:  # the supernet is not trained again, the search goes on from generation 2
        assert "glora_supernet step" not in said and "search generation 1/" not in said
        assert "search generation 2/3" in said
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("phase") == "glora_supernet"] == list(range(1, SEARCH["supernet_steps"] + 1))
    expected = json.loads((reference / "run.json").read_text())["prepare"]
    assert json.loads((run / "run.json").read_text())["prepare"] == expected  # forms, fitness, every generation
    a, b = load_file(reference / ADAPTER_WEIGHTS), load_file(run / ADAPTER_WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("uniform", [True, False])
def test_a_searched_structure_loads_in_peft_where_peft_computes_the_same_function(uniform, tmp_path):
    """A search that gave every layer PEFT's kind of forms (A = B, D = E, and no new bias on a layer
    without one) is written as PEFT's GLoRA and PEFT reproduces the logits; any other is lorafam's."""
    import peft
    from test_delta_glora import recipe_for
    from test_variants import inputs, logits, make_model, perturb

    from lorafam.adapters import build_variant
    from lorafam.modeling import head_modules
    from lorafam.run import save_adapter

    model, task = make_model("llama")
    recipe = recipe_for({"variant": "glora", "r": 4, "target_modules": ["q_proj", "v_proj"], "search": {}}, task)
    variant = build_variant(recipe.adapter).apply(model, head_modules(model, task))
    peft_kind = {"A": "lora", "B": "lora", "C": "none", "D": "none", "E": "none"}
    other = {"A": "vector", "B": "lora", "C": "none", "D": "none", "E": "none"}
    paths = list(variant.layers)
    variant.restore({"forms": {p: peft_kind if uniform or i % 2 else other for i, p in enumerate(paths)}})
    perturb(variant)
    save_adapter(tmp_path, variant, recipe)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    if not uniform:
        assert saved["peft_type"] == "LORAFAM_GLORA" and saved["layer_forms"][paths[0]] == other
        return
    assert saved["peft_type"] == "GLORA" and saved["config_A_B"] == "lora" and saved["config_C"] == "none"
    peft_model = peft.PeftModel.from_pretrained(make_model("llama")[0], str(tmp_path)).eval()
    batch = inputs("llama")
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(make_model("llama")[0], batch), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)
