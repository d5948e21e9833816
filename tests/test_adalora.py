"""AdaLoRA: the budget schedule, masking, the orthogonality term, saving in PEFT's layout, resuming.

The shared table (test_variants.py) covers init, merge, save/load and training at init_r; here are the
checks that need training to move the ranks: on the tiny Llama with synthetic sequences, through the
real training loop where the loop's logging is under test.
"""

from __future__ import annotations

import copy
import io
import json
from types import SimpleNamespace

import datasets
import peft
import pytest
import torch
from conftest import tiny_llama_config
from rich.console import Console
from test_variants import inputs, logits, make_model
from transformers import LlamaForCausalLM

from lorafam.adapters import build_variant
from lorafam.adapters.adalora import AdaLoRA
from lorafam.data import PreparedData
from lorafam.errors import LorafamError
from lorafam.modeling import head_modules
from lorafam.recipe import load_recipe, validate_recipe
from lorafam.run import load_tensors, save_adapter, save_tensors
from lorafam.trainer import train

ADAPTER = {"variant": "adalora", "init_r": 4, "target_r": 2, "alpha": 8, "target_modules": "all-linear"}
N_MATRICES = 14  # tiny Llama: 2 layers x (q, k, v, o, gate, up, down)


def recipe_for(adapter: dict, train_section: dict | None = None, output_dir: str = "o"):
    return validate_recipe(
        {
            "model": {"name": "tiny", "task": "causal-lm"},
            "adapter": dict(adapter),
            "data": {"train": "x.jsonl"},
            "train": train_section or {"max_steps": 40},
            "output_dir": output_dir,
        }
    )


def adapted(adapter: dict, **train_section):
    recipe = recipe_for(adapter, train_section or None)
    model, task = make_model("llama")
    return model, build_variant(recipe.adapter).apply(model, head_modules(model, task))


def synthetic_rows(n: int = 64, length: int = 16) -> dict[str, list]:
    """Arithmetic progressions mod 127: learnable, so the ranks have something to compete for."""
    g = torch.Generator().manual_seed(5)
    starts = torch.randint(0, 127, (n,), generator=g)
    steps = torch.randint(1, 4, (n,), generator=g)
    ids = [[int((a + d * k) % 127) + 1 for k in range(length)] for a, d in zip(starts, steps)]
    return {"input_ids": ids, "attention_mask": [[1] * length for _ in ids], "labels": ids}


def batches(n_steps: int) -> list[dict[str, torch.Tensor]]:
    rows = synthetic_rows()
    out = []
    for step in range(n_steps):
        idx = [(step * 8 + i) % len(rows["input_ids"]) for i in range(8)]
        ids = torch.tensor([rows["input_ids"][i] for i in idx])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def run_steps(model, variant, optimizer, data, steps: range, total: int) -> list[dict[str, float]]:
    """The trainer's per-step order, without its machinery."""
    model.train()
    logs = []
    for step in steps:
        loss = model(**data[step - 1]).loss
        (loss + sum(variant.extra_losses().values())).backward()
        optimizer.step()
        logs.append(variant.after_step(step, total))
        optimizer.zero_grad(set_to_none=True)
    return logs


def expected_budget(step: int, total: int, tinit: int, tfinal: int, init: int, target: int) -> int:
    """The paper's b(t), written out independently of the variant."""
    if step <= tinit:
        return init
    if step >= total - tfinal:
        return target
    return int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + target)


def live_rank(variant) -> int:
    return sum(int(layer.rank_mask.sum()) for layer in variant.layers.values())


# --------------------------------------------------------------------------------------------------
# One real training run, shared by the tests below


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adalora_run")
    adapter = ADAPTER | {"tinit": 5, "tfinal": 10, "delta_t": 1}
    train_section = {"max_steps": 40, "batch_size": 8, "lr": 1e-2, "schedule": "constant", "log_every": 1}
    recipe = recipe_for(adapter, train_section, str(run_dir))
    model, task = make_model("llama")
    variant = build_variant(recipe.adapter).apply(model, head_modules(model, task))

    # Record the orthogonality term from the weights, independently, each time the loop asks for it.
    reference: list[float] = []
    extra_losses = variant.extra_losses

    def recording_extra_losses():
        with torch.no_grad():
            terms = []
            for layer in variant.layers.values():
                P, Q = layer.lora_B.double(), layer.lora_A.double()
                terms.append(((P.T @ P - torch.eye(P.shape[1], dtype=P.dtype)) ** 2).sum())
                terms.append(((Q @ Q.T - torch.eye(Q.shape[0], dtype=Q.dtype)) ** 2).sum())
            reference.append(float(0.5 * torch.stack(terms).mean()))
        return extra_losses()

    variant.extra_losses = recording_extra_losses
    rows = synthetic_rows()
    data = PreparedData(
        train=datasets.Dataset.from_dict(rows), eval=None, format="text", label_names=None, report={}
    )
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    train(recipe, model, variant, tokenizer, data, run_dir, Console(file=io.StringIO()))
    model.eval()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(recipe=recipe, model=model, variant=variant, history=history, reference=reference)


def test_orthogonality_term_is_logged_and_decreases(trained):
    logged = [row["orth_reg"] for row in trained.history if "orth_reg" in row]
    assert len(logged) == 40 == len(trained.reference)
    assert logged == pytest.approx(trained.reference, rel=1e-5)
    assert logged[-1] < 0.5 * logged[0], logged


def test_loop_logs_the_schedule_and_ranks_differ_across_layers(trained):
    cfg = trained.variant.config
    for row in trained.history:
        step = row["step"]
        budget = expected_budget(step, 40, cfg.tinit, cfg.tfinal, 4 * N_MATRICES, 2 * N_MATRICES)
        assert row["rank_budget"] == budget
        assert row["rank"] == budget  # delta_t = 1: every step of the budget phase reallocates
    ranks = trained.variant.ranks()
    assert sum(ranks.values()) == 2 * N_MATRICES
    assert len(set(ranks.values())) > 1, ranks


@pytest.mark.parametrize("delta_t", [1, 3])
def test_budget_follows_the_cubic_schedule(delta_t):
    tinit, tfinal, total = 4, 6, 30
    model, variant = adapted(ADAPTER | {"tinit": tinit, "tfinal": tfinal, "delta_t": delta_t})
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.0))
    data = batches(total)
    init, target, end = 4 * N_MATRICES, 2 * N_MATRICES, total - tfinal
    live = {}
    for step in range(1, total + 1):
        run_steps(model, variant, optimizer, data, range(step, step + 1), total)
        live[step] = live_rank(variant)
    assert live[tinit] == init
    mid = tinit + (end - tinit) // 2
    if mid % delta_t:
        mid -= mid % delta_t
    assert live[mid] == expected_budget(mid, total, tinit, tfinal, init, target) < init
    for step in range(tinit + 1, end + 1):
        if step % delta_t == 0 or step == end:
            assert live[step] == expected_budget(step, total, tinit, tfinal, init, target), step
        else:  # no reallocation between allocation steps
            assert live[step] == live[step - 1], step
    assert all(live[step] == target for step in range(end, total + 1))


class PeftView:
    """Our layers' triplets under PEFT's parameter names, as copies (PEFT's RankAllocator masks the
    Lambdas it is given), refreshed with the values and gradients of the step just taken."""

    def __init__(self, variant):
        self.variant, self.params = variant, {}

    def refresh(self) -> None:
        self.params = {}
        for path, layer in self.variant.layers.items():
            for name in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, name)
                copy_ = torch.nn.Parameter(p.detach().clone())
                copy_.grad = None if p.grad is None else p.grad.detach().clone()
                self.params[f"base_model.model.{path}.{name}.default"] = copy_

    def named_parameters(self):
        return iter(self.params.items())


def test_surviving_triplets_are_the_top_budget_ones_as_peft_chooses_them():
    """Which triplets survive, not only how many: every allocation keeps exactly the triplets PEFT's
    own RankAllocator keeps on the same weights, gradients and schedule (the paper's score: smoothed
    sensitivity x uncertainty of Lambda_i plus the means over P's column and Q's row)."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator

    tinit, tfinal, total = 3, 4, 16
    model, variant = adapted(ADAPTER | {"tinit": tinit, "tfinal": tfinal, "delta_t": 1})
    cfg = variant.config
    view = PeftView(variant)
    view.refresh()
    peft_config = AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, tinit=tinit, tfinal=tfinal, deltaT=1,
                                beta1=cfg.beta1, beta2=cfg.beta2, total_step=total)
    allocator = RankAllocator(view, peft_config, "default")
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.0))
    data = batches(total)
    model.train()
    compared, changed = 0, 0
    for step in range(1, total - tfinal + 1):
        loss = model(**data[step - 1]).loss
        (loss + sum(variant.extra_losses().values())).backward()
        optimizer.step()
        view.refresh()  # what PEFT reads: the stepped weights and this step's gradients
        before = {path: layer.rank_mask.clone() for path, layer in variant.layers.items()}
        variant.after_step(step, total)
        if step < total - tfinal:
            allocator.update_ipt(view)
        budget, allocates = allocator.budget_schedule(step)
        if step > tinit and allocates:
            pattern = allocator.mask_to_budget(view, budget)
            ours = {f"base_model.model.{path}.lora_E.default": layer.rank_mask.tolist()
                    for path, layer in variant.layers.items()}
            assert ours == pattern, step
            assert live_rank(variant) == budget
            compared += 1
            changed += any(not torch.equal(before[p], l.rank_mask) for p, l in variant.layers.items())
        optimizer.zero_grad(set_to_none=True)
    # Every allocation step was compared, and most of them changed which triplets live.
    assert compared == total - tfinal - tinit and changed > compared // 2, (compared, changed)
    assert live_rank(variant) == cfg.target_r * N_MATRICES
    assert len(set(variant.ranks().values())) > 1, variant.ranks()


def test_masked_triplets_contribute_nothing_to_outputs_or_merge(trained):
    model, variant = copy.deepcopy((trained.model, trained.variant))
    batch = inputs("llama")
    before = logits(model, batch)
    masked = 0
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in variant.layers.values():
            dead = ~layer.rank_mask
            masked += int(dead.sum())
            assert torch.all(layer.lora_E[dead] == 0)
            # The live triplets alone give the layer's update.
            live = layer.rank_mask
            scale = layer.alpha / (layer.ranknum + 1e-5)
            alone = layer.lora_B[:, live] @ (layer.lora_A[live] * layer.lora_E[live]) * scale
            torch.testing.assert_close(layer.delta_weight(), alone)
            # Whatever the masked vectors hold, outputs do not move.
            layer.lora_A[dead] += torch.randn(layer.lora_A[dead].shape, generator=g)
            layer.lora_B[:, dead] += torch.randn(layer.lora_B[:, dead].shape, generator=g)
    assert masked == 2 * N_MATRICES
    torch.testing.assert_close(logits(model, batch), before, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(variant.merge(), batch), before, atol=1e-4, rtol=1e-4)

    # ... while a live triplet's vectors do move them (so the check above can fail).
    model, variant = copy.deepcopy((trained.model, trained.variant))
    layer = next(layer for layer in variant.layers.values() if layer.rank_mask.any())
    with torch.no_grad():
        layer.lora_A[layer.rank_mask] += 1.0
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)


def test_finished_adapter_round_trips_through_our_loader(trained, tmp_path):
    state = trained.variant.adapter_state_dict()
    ranks = trained.variant.ranks()
    for path, rank in ranks.items():  # PEFT's layout: only live triplets
        assert state[f"base_model.model.{path}.lora_E"].shape == (rank, 1)
        assert state[f"base_model.model.{path}.lora_B"].shape[1] == rank
    assert not any("ranknum" in k for k in state)
    save_tensors(tmp_path / "adapter_model.safetensors", state)

    fresh, variant = adapted(trained.variant.config.model_dump())
    batch = inputs("llama")
    assert not torch.allclose(logits(fresh, batch), logits(trained.model, batch), atol=1e-4)
    variant.load_adapter_state_dict(load_tensors(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(logits(fresh, batch), logits(trained.model, batch), atol=1e-6, rtol=1e-6)
    assert variant.ranks() == ranks
    pattern = variant.peft_config("tiny", "CAUSAL_LM")["rank_pattern"]
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} == ranks


def test_mid_training_adapter_restores_masked_triplets_as_masked(tmp_path):
    model, variant = adapted(ADAPTER | {"tinit": 2, "tfinal": 4}, max_steps=20)
    optimizer = torch.optim.AdamW(variant.param_groups(lr=1e-2, weight_decay=0.0))
    run_steps(model, variant, optimizer, batches(20), range(1, 11), 20)
    assert not variant.finished and live_rank(variant) < 4 * N_MATRICES
    state = variant.adapter_state_dict()
    assert all(state[f"base_model.model.{p}.lora_E"].shape == (4, 1) for p in variant.layers)

    fresh, fresh_variant = adapted(ADAPTER | {"tinit": 2, "tfinal": 4}, max_steps=20)
    fresh_variant.load_adapter_state_dict(state)
    batch = inputs("llama")
    model.eval()
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=1e-6, rtol=1e-6)
    for path, layer in variant.layers.items():
        assert torch.equal(fresh_variant.layers[path].rank_mask, layer.rank_mask), path


def test_resume_from_train_state_continues_exactly(tmp_path):
    adapter, total, data = ADAPTER | {"tinit": 2, "tfinal": 4}, 20, batches(20)
    # Plain SGD keeps no state of its own, so only the variant's state decides exactness.
    straight, straight_variant = adapted(adapter, max_steps=total)
    sgd = lambda variant: torch.optim.SGD(variant.param_groups(0.5, 0.0))  # noqa: E731
    run_steps(straight, straight_variant, sgd(straight_variant), data, range(1, total + 1), total)

    first, first_variant = adapted(adapter, max_steps=total)
    run_steps(first, first_variant, sgd(first_variant), data, range(1, 9), total)
    save_tensors(tmp_path / "adapter.safetensors", first_variant.adapter_state_dict())
    save_tensors(tmp_path / "state.safetensors", first_variant.train_state())

    resumed, resumed_variant = adapted(adapter, max_steps=total)
    resumed_variant.load_adapter_state_dict(load_tensors(tmp_path / "adapter.safetensors"))
    resumed_variant.load_train_state(load_tensors(tmp_path / "state.safetensors"))
    run_steps(resumed, resumed_variant, sgd(resumed_variant), data, range(9, total + 1), total)
    assert resumed_variant.ranks() == straight_variant.ranks()
    for path, layer in straight_variant.layers.items():
        for name in ("lora_A", "lora_B", "lora_E"):
            assert torch.equal(getattr(resumed_variant.layers[path], name), getattr(layer, name)), (path, name)

    # Without the EMAs the scores after the next step differ: the state is what the resume needs.
    scored = []
    full = first_variant.train_state()
    for state in (full, {k: v for k, v in full.items() if k.endswith("rank_mask")}):
        model, variant = adapted(adapter, max_steps=total)
        variant.load_adapter_state_dict(load_tensors(tmp_path / "adapter.safetensors"))
        variant.load_train_state(state)
        run_steps(model, variant, sgd(variant), data, range(9, 10), total)
        scored.append(torch.cat([variant.triplet_scores(p) for p in variant.layers]))
    assert not torch.allclose(scored[0], scored[1], rtol=1e-2, atol=0)


def test_train_state_from_another_recipe_is_refused():
    _, variant = adapted(ADAPTER)
    with pytest.raises(LorafamError, match="AdaLoRA state"):
        variant.load_train_state({"model.layers.0.self_attn.q_proj.rank_mask": torch.ones(4, dtype=torch.bool)})


# --------------------------------------------------------------------------------------------------
# PEFT reads what we save


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "untrained"])
def test_peft_loads_our_adapter_with_equal_logits(trained, finished, tmp_path):
    if finished:
        model, variant, recipe = trained.model, trained.variant, trained.recipe
    else:  # no rank_pattern yet: every triplet is saved
        model, variant = adapted(ADAPTER)
        recipe = recipe_for(ADAPTER)
        with torch.no_grad():
            for layer in variant.layers.values():
                layer.lora_E.normal_(generator=torch.Generator().manual_seed(7))
    save_adapter(tmp_path, variant, recipe)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    assert (config["rank_pattern"] is not None) == finished

    base, _ = make_model("llama")
    with pytest.warns(UserWarning, match="`r` is not used"):  # PEFT's note on LoraConfig.r, harmless
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = inputs("llama")
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(make_model("llama")[0], batch), atol=1e-4)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)
    if finished:
        loaded = peft_model.base_model.model
        for path, rank in variant.ranks().items():
            assert loaded.get_submodule(path).lora_E["default"].shape == (rank, 1)


# --------------------------------------------------------------------------------------------------
# Reporting


def test_report_and_rank_plot(trained, tmp_path):
    lines = trained.variant.report()
    text = "\n".join(lines)
    assert "final rank per layer and module (28 live of 56)" in text
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split()[1:] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows = [line.split() for line in lines if line[:1].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]
    assert sum(int(v) for row in rows for v in row[1:]) == 28

    [png] = trained.variant.write_artifacts(tmp_path)
    assert png.name == "adalora_ranks.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_report_on_a_meta_model_before_and_after_loading_the_adapter(trained):
    """`lorafam inspect` builds the model on the meta device: report() must work there."""
    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=128))
    variant = build_variant(trained.variant.config).apply(model)
    assert "final rank" not in "\n".join(variant.report())
    variant.load_adapter_state_dict(trained.variant.adapter_state_dict())
    assert variant.ranks() == trained.variant.ranks()
    assert "final rank per layer and module (28 live of 56)" in "\n".join(variant.report())


# --------------------------------------------------------------------------------------------------
# Recipe checks


@pytest.mark.parametrize(
    ("adapter", "train_section", "message"),
    [
        ({"init_r": 4, "target_r": 6}, None, r"adapter\.target_r \(6\) must not exceed adapter\.init_r \(4\)"),
        ({"r": 4, "init_r": 6}, None, r"adapter\.r \(4\) and adapter\.init_r \(6\) disagree"),
        (
            {"tinit": 20, "tfinal": 20},
            {"max_steps": 40},
            r"adapter\.tinit \(20\) \+ adapter\.tfinal \(20\) must be less than train\.max_steps \(40\)",
        ),
        ({"beta1": 1.0}, None, r"adapter\.beta1: "),
        ({"delta_t": 0}, None, r"adapter\.delta_t: "),
        ({"orth_reg_weight": -1}, None, r"adapter\.orth_reg_weight: "),
        ({"deltaT": 5}, None, r"adapter\.deltaT: unknown key \(allowed here: .*delta_t"),
    ],
)
def test_bad_settings_are_refused_naming_the_keys(adapter, train_section, message):
    with pytest.raises(LorafamError, match=message):
        recipe_for({"variant": "adalora"} | adapter, train_section)


def test_r_is_init_r_and_target_r_defaults_to_two_thirds():
    ranks = {"r", "init_r", "target_r"}
    assert recipe_for({"variant": "adalora"}).adapter.model_dump(include=ranks) == {"r": 12, "init_r": 12, "target_r": 8}
    assert recipe_for({"variant": "adalora", "r": 6}).adapter.model_dump(include=ranks) == {"r": 6, "init_r": 6, "target_r": 4}
    # The saved recipe (both keys written out) loads back.
    saved = recipe_for({"variant": "adalora", "init_r": 6}).adapter.model_dump()
    assert recipe_for(saved).adapter.init_r == 6


def test_epoch_only_schedule_is_checked_at_the_first_step():
    recipe = recipe_for(ADAPTER | {"tinit": 20, "tfinal": 20}, {"epochs": 1})  # step count unknown at load
    model, task = make_model("llama")
    variant = build_variant(recipe.adapter).apply(model, head_modules(model, task))
    message = r"adapter\.tinit \(20\) \+ adapter\.tfinal \(20\) must be less than the run's 30 steps"
    with pytest.raises(LorafamError, match=message):
        variant.after_step(1, 30)


def test_shipped_recipe_loads():
    recipe = load_recipe("recipes/adalora.yaml")
    assert isinstance(build_variant(recipe.adapter), AdaLoRA)
    cfg = recipe.adapter
    assert cfg.tinit + cfg.tfinal < recipe.train.max_steps
    assert cfg.target_r < cfg.init_r


def test_inspect_of_a_finished_run_prints_the_final_ranks_the_adapter_file_holds(tmp_path):
    """Through the CLI: `lorafam inspect RUN_DIR` shows what training decided, and it is what the
    saved adapter holds (PEFT's layout keeps only the live triplets: lora_E's length is the rank)."""
    from safetensors.torch import load_file
    from tinyrun import adapter_section, cli, make_model_folder, make_text_data, write_recipe

    adapter = adapter_section("adalora", dropout=0.0) | {"target_modules": ["q_proj", "k_proj", "v_proj"]}
    recipe = write_recipe(tmp_path / "ada.yaml", make_model_folder(tmp_path / "model"), make_text_data(tmp_path / "t.jsonl"),
                          tmp_path / "run", adapter=adapter, train={"save_every": None, "lr": 5e-2})
    assert cli("train", recipe).exit_code == 0
    result = cli("inspect", tmp_path / "run")
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.output.splitlines()
    state = load_file(tmp_path / "run" / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model.").removesuffix(".lora_E"): v.shape[0] for k, v in state.items() if k.endswith("lora_E")}
    assert len(saved) == 6 and sum(saved.values()) == 2 * 6  # target_r 2 per matrix on average
    assert f"final rank per layer and module ({sum(saved.values())} live of {4 * 6}):" in lines
    header = next(line for line in lines if line.startswith("layer "))
    modules = header.split()[1:]
    assert modules == ["q_proj", "k_proj", "v_proj"]
    table = {row.split()[0]: row.split()[1:] for row in lines if row[:1].isdigit()}
    shown = {f"model.layers.{layer}.self_attn.{m}": int(r) for layer, ranks in table.items() for m, r in zip(modules, ranks)}
    assert shown == saved
    assert len(set(saved.values())) > 1, "every matrix kept the same rank: nothing was allocated"
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == saved
