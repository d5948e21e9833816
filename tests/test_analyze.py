"""`lorafam analyze`: each paper's number against a direct computation, on hand-built weights and on
real run folders written by the real CLI (tiny Llama, tests/tinyrun.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafam.adapters import VARIANTS
from lorafam.adapters.dora import DoRALayer
from lorafam.analyze import (
    AdaptedRun,
    amplification_numbers,
    fit_line,
    magnitude_direction_change,
    random_directions,
    singular_basis,
    start_deltas,
    subspace_similarity,
    variants_with_artifacts,
    variants_with_factors,
)
from lorafam.recipe import validate_recipe
from lorafam.run import adapt
from tinyrun import adapter_section, cli, make_model_folder, make_text_data, write_recipe

PREFIX = "base_model.model."
LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]


# --------------------------------------------------------------------------------------------------
# Direct (numpy) computations the tests compare against


def np_phi(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """phi(i, j) straight from the paper's formula, one (i, j) at a time."""
    out = np.zeros((first.shape[1], second.shape[1]))
    for i in range(1, first.shape[1] + 1):
        for j in range(1, second.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(first[:, :i].T @ second[:, :j], "fro") ** 2 / min(i, j)
    return out


def np_right_basis(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, full_matrices=False)[2].T


def np_delta_m_d(weight: np.ndarray, start: np.ndarray) -> tuple[float, float]:
    m, m0 = np.linalg.norm(weight, axis=1), np.linalg.norm(start, axis=1)
    cos = (weight * start).sum(1) / (m * m0)
    return float(np.abs(m - m0).mean()), float((1 - cos).mean())


def base_weights(model_dir: Path) -> dict[str, np.ndarray]:
    weights = load_file(str(model_dir / "model.safetensors"))
    return {p: weights[f"{p}.weight"].double().numpy() for p in LAYERS}


def lora_update(tensors: dict[str, torch.Tensor], path: str, scale: float) -> np.ndarray:
    A = tensors[f"{PREFIX}{path}.lora_A.weight"].double().numpy()
    B = tensors[f"{PREFIX}{path}.lora_B.weight"].double().numpy()
    return scale * B @ A


# --------------------------------------------------------------------------------------------------
# The maths on hand-built tensors


def test_phi_of_a_subspace_with_itself_is_one_everywhere():
    torch.manual_seed(0)
    basis = singular_basis(torch.randn(8, 40), "A")
    phi = subspace_similarity(basis, basis)
    # ||U_i^T U_j||^2 = min(i, j): the smaller subspace always lies in the larger one.
    assert torch.allclose(phi, torch.ones(8, 8, dtype=torch.float64), atol=1e-12)


def test_phi_matches_the_papers_formula_and_swapping_runs_transposes_it():
    torch.manual_seed(1)
    a_small, a_large = torch.randn(4, 30), torch.randn(10, 30)
    first, second = singular_basis(a_small, "A"), singular_basis(a_large, "A")
    phi = subspace_similarity(first, second)
    expected = np_phi(np_right_basis(a_small.double().numpy()), np_right_basis(a_large.double().numpy()))
    assert phi.shape == (4, 10)
    np.testing.assert_allclose(phi.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(subspace_similarity(second, first).numpy(), phi.numpy().T, atol=1e-12)
    # Random subspaces overlap partly: the comparison above covered values inside (0, 1), not only
    # the ends an orthogonal or nested pair gives.
    assert float(((phi > 0.05) & (phi < 0.95)).double().mean()) > 0.5, phi


def test_phi_is_zero_for_orthogonal_subspaces_and_one_for_nested_ones():
    eye = torch.eye(6, dtype=torch.float64)
    assert float(subspace_similarity(eye[:, :2], eye[:, 2:5]).abs().max()) == 0
    nested = subspace_similarity(eye[:, :2], eye[:, :5])  # span(e1, e2) inside span(e1..e5)
    assert torch.equal(nested, torch.ones(2, 5, dtype=torch.float64))


def test_singular_basis_spans_the_input_side_of_A_and_the_output_side_of_B():
    torch.manual_seed(2)
    A, B = torch.randn(3, 20).double(), torch.randn(16, 3).double()
    right, left = singular_basis(A, "A"), singular_basis(B, "B")
    assert right.shape == (20, 3) and left.shape == (16, 3)
    # Projecting onto the basis leaves A's rows and B's columns unchanged: they span those spaces.
    assert torch.allclose(A @ right @ right.T, A, atol=1e-10)
    assert torch.allclose(left @ left.T @ B, B, atol=1e-10)


def test_delta_m_and_delta_d_on_hand_built_weights():
    start = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    weight = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # row 0: twice as long, same direction; row 1: turned 90 degrees
    delta_m, delta_d = magnitude_direction_change(weight, start)
    assert delta_m == pytest.approx((5 + 0) / 2)
    assert delta_d == pytest.approx((0 + 1) / 2)


def test_delta_m_and_delta_d_of_a_random_update_match_numpy():
    torch.manual_seed(3)
    start = torch.randn(12, 9)
    weight = start + 0.05 * torch.randn(4, 9).T.repeat(1, 3).T  # some update, any shape (12, 9)
    expected = np_delta_m_d(weight.double().numpy(), start.double().numpy())
    assert magnitude_direction_change(weight, start) == pytest.approx(expected, rel=1e-10)


def test_a_dora_layer_whose_magnitude_alone_moved_has_no_direction_change():
    torch.manual_seed(4)
    layer = DoRALayer(nn.Linear(10, 6), r=2, scaling=2.0, dropout=0.0)
    nn.init.normal_(layer.lora_A.weight)
    nn.init.zeros_(layer.lora_B.weight)  # the direction update stays zero
    layer.reset_magnitude()
    w0 = layer.base_weight().detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(6) + 0.5)
    merged = layer.merged().weight.detach()
    delta_m, delta_d = magnitude_direction_change(merged, w0)
    assert delta_d < 1e-12
    expected_m = (layer.lora_magnitude_vector.detach().double() - w0.double().norm(dim=1)).abs().mean()
    assert delta_m == pytest.approx(float(expected_m), rel=1e-5)
    assert delta_m > 0


def test_fit_line_recovers_a_slope_and_refuses_a_constant_x():
    fit = fit_line([0.0, 1.0, 2.0, 3.0], [1.0, -1.0, -3.0, -5.0])
    assert fit["slope"] == pytest.approx(-2) and fit["intercept"] == pytest.approx(1)
    assert fit["correlation"] == pytest.approx(-1)
    assert fit_line([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]) is None


def test_amplification_numbers_match_numpy():
    torch.manual_seed(5)
    W = torch.randn(24, 16)
    delta = 0.1 * torch.randn(24, 3) @ torch.randn(3, 16)
    got = amplification_numbers(W, delta, r=3, samples=4, seed=7)
    w, d = W.double().numpy(), delta.double().numpy()
    u, _, vt = np.linalg.svd(d)
    on_delta = np.linalg.norm(u[:, :3].T @ w @ vt[:3].T, "fro")
    uw, sw, vwt = np.linalg.svd(w)
    assert got["r"] == 3
    assert got["weight_norm"] == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-10)
    assert got["delta_norm"] == pytest.approx(np.linalg.norm(d, "fro"), rel=1e-10)
    assert got["projected_on_delta"] == pytest.approx(on_delta, rel=1e-8)
    assert got["projected_on_weight"] == pytest.approx(np.linalg.norm(uw[:, :3].T @ w @ vwt[:3].T, "fro"), rel=1e-8)
    assert got["amplification"] == pytest.approx(np.linalg.norm(d, "fro") / on_delta, rel=1e-8)
    # The random baseline: the same generator draws, recomputed here.
    generator = torch.Generator().manual_seed(7)
    draws = []
    for _ in range(4):
        left, right = random_directions(24, 3, generator).numpy(), random_directions(16, 3, generator).numpy()
        draws.append(np.linalg.norm(left.T @ w @ right, "fro"))
    assert got["projected_on_random"] == pytest.approx(np.mean(draws), rel=1e-10)


def test_random_directions_are_orthonormal_and_average_to_the_expected_projection():
    generator = torch.Generator().manual_seed(0)
    q = random_directions(30, 5, generator)
    assert torch.allclose(q.T @ q, torch.eye(5, dtype=torch.float64), atol=1e-12)
    # For uniform random r-frames, E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (n m).
    torch.manual_seed(1)
    W = torch.randn(30, 20)
    numbers = amplification_numbers(W, torch.randn(30, 20), r=5, samples=400, seed=3)
    expected = (25 * float(W.double().pow(2).sum()) / 600) ** 0.5
    assert numbers["projected_on_random"] == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("name", [*VARIANTS, "lora+pissa"])
def test_start_weight_and_update_add_up_to_the_merged_weight_for_every_variant(name, tiny_llama):
    """The analyses' W and Delta W: W is the original pre-trained weight (also under PiSSA, whose base
    holds a residual), W + Delta W the merged weight, for every registered variant."""
    variant_name, _, init = name.partition("+")
    section = adapter_section(variant_name, dropout=0.0) | ({"init": init} if init else {})
    recipe = validate_recipe({"model": {"name": "unused"}, "adapter": section, "data": {"train": "unused"}, "output_dir": "unused"})
    original = {p: tiny_llama.get_submodule(p).weight.detach().clone() for p in LAYERS}
    torch.manual_seed(0)
    variant = adapt(tiny_llama, recipe, [])
    adapted = AdaptedRun(run=None, model=tiny_llama, variant=variant, start_deltas=start_deltas(variant))
    with torch.no_grad():
        for p in variant.trainable_parameters():  # training moved every trainable tensor
            p.add_(0.05 * torch.randn_like(p))
    for path in LAYERS:
        torch.testing.assert_close(adapted.start_weight(path), original[path].double(), atol=1e-5, rtol=0)
        merged = variant.layers[path].merged().weight.detach().double()
        torch.testing.assert_close(adapted.start_weight(path) + adapted.update(path), merged, atol=1e-5, rtol=0)
        assert float(adapted.update(path).abs().max()) > 1e-3


def test_the_registry_queries_name_variants_without_a_list_of_names():
    with_factors = variants_with_factors()
    assert "lora" in with_factors and "glora" not in with_factors
    assert set(variants_with_artifacts()) == {"adalora", "glora", "lora_drop"}


# --------------------------------------------------------------------------------------------------
# Real run folders


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs made by `lorafam train`: LoRA r=4 and r=2, DoRA, GLoRA, AdaLoRA, LoRA-drop, one without checkpoints."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("analyze")
    model = make_model_folder(root / "model")
    data = make_text_data(root / "data.jsonl")
    specs = {
        "lora": (adapter_section("lora"), {}),
        "lora_r2": (adapter_section("lora") | {"r": 2, "alpha": 4}, {"seed": 11}),
        "dora": (adapter_section("dora"), {}),
        "glora": (adapter_section("glora", dropout=0.0), {}),
        "adalora": (adapter_section("adalora"), {}),
        "lora_drop": (adapter_section("lora_drop") | {"sample_ratio": 0.5, "threshold": 0.6}, {}),
        "no_checkpoints": (adapter_section("lora"), {"save_every": None}),
    }
    out = {"model": model}
    for name, (adapter, train) in specs.items():
        recipe = write_recipe(root / f"{name}.yaml", model, data, root / name, adapter=adapter, train=train)
        result = cli("train", recipe)
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def test_subspace_of_two_runs_matches_the_adapter_files(runs, tmp_path):
    result = cli("analyze", "subspace", runs["lora_r2"], runs["lora"], "--output", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "subspace.json").read_text())
    assert (tmp_path / "subspace.png").stat().st_size > 1000
    small, large = load_file(str(runs["lora_r2"] / "adapter_model.safetensors")), load_file(str(runs["lora"] / "adapter_model.safetensors"))
    assert [m["path"] for m in data["matrices"]] == LAYERS
    for entry in data["matrices"]:
        key = f"{PREFIX}{entry['path']}.lora_A.weight"
        expected = np_phi(np_right_basis(small[key].double().numpy()), np_right_basis(large[key].double().numpy()))
        assert (entry["rows"], entry["columns"]) == (2, 4)
        np.testing.assert_allclose(np.array(entry["phi"]), expected, atol=2e-6)  # JSON keeps 6 decimals


def test_subspace_of_B_uses_left_singular_vectors(runs, tmp_path):
    result = cli("analyze", "subspace", runs["lora_r2"], runs["lora"], "--matrix", "B", "--module", "v_proj", "--layer", "1", "--output", tmp_path)
    assert result.exit_code == 0, result.output
    [entry] = json.loads((tmp_path / "subspace.json").read_text())["matrices"]
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_B.weight"
    small, large = (load_file(str(runs[r] / "adapter_model.safetensors"))[key].double().numpy() for r in ("lora_r2", "lora"))
    left = lambda b: np.linalg.svd(b, full_matrices=False)[0]  # noqa: E731
    np.testing.assert_allclose(np.array(entry["phi"]), np_phi(left(small), left(large)), atol=2e-6)


def test_subspace_of_a_run_with_itself_is_one(runs, tmp_path):
    result = cli("analyze", "subspace", runs["lora"], runs["lora"], "--output", tmp_path)
    assert result.exit_code == 0, result.output
    for entry in json.loads((tmp_path / "subspace.json").read_text())["matrices"]:
        np.testing.assert_allclose(np.array(entry["phi"]), np.ones((4, 4)), atol=1e-6)


def test_subspace_of_one_run_compares_its_update_with_W(runs, tmp_path):
    result = cli("analyze", "subspace", runs["lora"], "--base-directions", "6", "--output", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "subspace.json").read_text())
    weights = base_weights(runs["model"])
    adapter = load_file(str(runs["lora"] / "adapter_model.safetensors"))
    for entry in data["matrices"]:
        update = lora_update(adapter, entry["path"], 8 / 4)
        expected = np_phi(np_right_basis(update)[:, :4], np_right_basis(weights[entry["path"]])[:, :6])
        np.testing.assert_allclose(np.array(entry["phi"]), expected, atol=2e-6)


def test_decomposition_of_a_lora_run_matches_each_checkpoint(runs, tmp_path):
    result = cli("analyze", "decomposition", runs["lora"], "--output", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "decomposition.json").read_text())
    assert data["steps"] == [6, 8, 10, 12]  # keep_last 3 checkpoints + the final adapter (step 12)
    assert set(data["modules"]) == {"q_proj", "v_proj"}
    for module in ("q_proj", "v_proj"):
        assert (tmp_path / f"decomposition_{module}.png").stat().st_size > 1000
    weights = base_weights(runs["model"])
    for entry in data["modules"].values():
        assert len(entry["points"]) == 2 * 4  # 2 layers x 4 steps
        for point in entry["points"]:
            file = runs["lora"] / ("adapter_model.safetensors" if point["step"] == 12 else f"checkpoints/step-{point['step']:06d}/adapter_model.safetensors")
            start = weights[point["path"]]
            expected = np_delta_m_d(start + lora_update(load_file(str(file)), point["path"], 2.0), start)
            assert (point["delta_m"], point["delta_d"]) == pytest.approx(expected, rel=1e-6)
        xs, ys = [p["delta_d"] for p in entry["points"]], [p["delta_m"] for p in entry["points"]]
        assert entry["fit"]["slope"] == pytest.approx(np.polyfit(xs, ys, 1)[0], rel=1e-6)
        at_8 = [p for p in entry["points"] if p["step"] == 8]
        slope_8 = np.polyfit([p["delta_d"] for p in at_8], [p["delta_m"] for p in at_8], 1)[0]
        assert entry["fit_by_step"]["8"]["slope"] == pytest.approx(slope_8, rel=1e-6)


def test_decomposition_of_a_dora_run_whose_direction_never_moved(runs, tmp_path):
    """A DoRA run where only the magnitude changed (its B zeroed in every saved file): Delta D = 0."""
    run = tmp_path / "dora_magnitude_only"
    shutil.copytree(runs["dora"], run)
    files = [run / "adapter_model.safetensors", *sorted(run.glob("checkpoints/step-*/adapter_model.safetensors"))]
    for file in files:
        tensors = load_file(str(file))
        save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    for manifest in run.glob("checkpoints/step-*/complete.json"):  # re-seal the edited checkpoints
        info = json.loads(manifest.read_text())
        body = (manifest.parent / "adapter_model.safetensors").read_bytes()
        info["files"]["adapter_model.safetensors"] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        manifest.write_text(json.dumps(info))
    result = cli("analyze", "decomposition", run, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    data = json.loads((tmp_path / "out" / "decomposition.json").read_text())
    weights = base_weights(runs["model"])
    points = [p for entry in data["modules"].values() for p in entry["points"]]
    assert len(points) == 4 * 4
    for point in points:
        file = run / ("adapter_model.safetensors" if point["step"] == 12 else f"checkpoints/step-{point['step']:06d}/adapter_model.safetensors")
        magnitude = load_file(str(file))[f"{PREFIX}{point['path']}.lora_magnitude_vector"].double().numpy()
        assert point["delta_d"] < 1e-10
        assert point["delta_m"] == pytest.approx(np.abs(magnitude - np.linalg.norm(weights[point["path"]], axis=1)).mean(), rel=1e-5)
        assert point["delta_m"] > 1e-4
    assert all(entry["fit"] is None for entry in data["modules"].values())  # Delta D does not vary: no slope


def test_decomposition_without_checkpoints_says_how_to_get_them(runs, tmp_path):
    result = cli("analyze", "decomposition", runs["no_checkpoints"], "--output", tmp_path / "out")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "train.save_every" in result.output
    assert not (tmp_path / "out").exists()


def test_amplification_of_a_lora_run_matches_numpy(runs, tmp_path):
    result = cli("analyze", "amplification", runs["lora"], "--samples", "3", "--output", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "amplification.json").read_text())
    weights = base_weights(runs["model"])
    adapter = load_file(str(runs["lora"] / "adapter_model.safetensors"))
    assert [row["path"] for row in data["layers"]] == LAYERS
    for row in data["layers"]:
        w, d = weights[row["path"]], lora_update(adapter, row["path"], 2.0)
        u, _, vt = np.linalg.svd(d)
        on_delta = np.linalg.norm(u[:, :4].T @ w @ vt[:4].T, "fro")
        assert row["r"] == 4
        assert row["delta_norm"] == pytest.approx(np.linalg.norm(d, "fro"), rel=1e-6)
        assert row["projected_on_delta"] == pytest.approx(on_delta, rel=1e-6)
        assert row["amplification"] == pytest.approx(np.linalg.norm(d, "fro") / on_delta, rel=1e-6)
    assert "factor" in result.output  # the table


def test_amplification_works_for_a_variant_without_low_rank_factors(runs, tmp_path):
    result = cli("analyze", "amplification", runs["glora"], "--module", "q_proj", "--output", tmp_path)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "amplification.json").read_text())["layers"]
    assert [r["module"] for r in rows] == ["q_proj", "q_proj"] and all(r["amplification"] > 0 for r in rows)


def test_ranks_draw_what_adalora_and_lora_drop_decided(runs, tmp_path):
    result = cli("analyze", "ranks", runs["adalora"], "--output", tmp_path / "adalora")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adalora" / "adalora_ranks.png").stat().st_size > 1000
    result = cli("analyze", "ranks", runs["lora_drop"], "--output", tmp_path / "drop")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "drop" / "lora_drop_importance.png").stat().st_size > 1000
    assert "kept" in result.output
    # train writes the same picture into the run folder itself
    assert (runs["lora_drop"] / "lora_drop_importance.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["ranks", "{lora}"], "nothing to draw; analyze ranks shows those of glora, adalora, lora_drop runs"),
        (["subspace", "{lora}", "{glora}"], "whose layers have no low-rank A, B pair"),
        (["subspace", "{lora}", "--matrix", "C"], "--matrix 'C': choose A (input side) or B (output side)"),
        (["amplification", "{lora}", "--module", "k_proj"], "--module k_proj matches no adapted layer"),
        (["amplification", "{lora}", "--layer", "7"], "--layer 7 matches no adapted layer"),
        (["amplification", "{missing}"], "does not exist; pass the output_dir of a lorafam train run"),
        (["decomposition", "{model}"], "is not a lorafam run folder"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(runs, tmp_path, args, message):
    paths = {k: str(v) for k, v in runs.items()} | {"missing": str(tmp_path / "nope")}
    result = cli("analyze", *[a.format(**paths) for a in args], "--output", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert message in result.output
    assert not (tmp_path / "out").exists()
