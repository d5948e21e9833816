"""The papers' own analyses, run on the user's own runs (`lorafam analyze ...`).

* ``subspace``: the LoRA paper's subspace similarity (Hu et al. 2021, arXiv:2106.09685, section 7.2).
  For two runs, the singular directions of their A matrices (or B) are compared:
  phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j), U_i the top-i directions of one run, V_j the top-j of
  the other; 1 when one subspace contains the other, near max(i, j)/n for random ones. A (r x in) is
  compared through its right-singular vectors, the input directions the update reads, as in the
  paper; B (out x r) through its left-singular vectors, the output directions it writes (the paper's
  footnote: "a similar analysis can be carried out with B and the left-singular unitary matrices").
  With one run, the update's directions are compared with the pre-trained W's own singular
  directions instead (the paper's appendix does this for W_q and Delta W_q: does Delta W reuse W's
  top directions?).
* ``decomposition``: DoRA's weight-decomposition analysis (Liu et al. 2024, arXiv:2402.09353,
  section 3.2, Figure 2): per adapted layer and saved step, the mean magnitude change
  Delta M = mean_n |m_n^t - m_n^0| and direction change Delta D = mean_n (1 - cos(W_n^t, W_n^0)) of the
  merged weight against the weight the run started from. The paper's vector-wise norm runs over each
  "column" of its W in R^{d x k}; in DoRA's code (and PEFT's) that is the norm over dim=1 of a
  PyTorch (out, in) weight, i.e. one magnitude per output unit, which is what n indexes here.
* ``amplification``: the LoRA paper's section 7.3: ||Delta W||_F, the part of W in Delta W's top-r
  singular directions ||U^T W V||_F (U, V: Delta W's top-r left/right singular vectors), the same for
  W's own top-r directions and for random orthonormal directions (seeded, averaged), and the
  amplification factor ||Delta W||_F / ||U^T W V||_F.
* ``ranks``: what a variant decided during training (AdaLoRA's final ranks, LoRA-drop's kept
  layers), drawn by the variant's own ``write_artifacts``.

"W" is the weight the run started from and "Delta W" what training added to it: the merged weight
at init and the change of the merged weight since. For most variants that is W0 and
``delta_weight()``; for PiSSA, whose base holds a residual, it is the original W and the change of
s B A. Only merged weights are needed, so decomposition and amplification work for every variant.
The maths are pure functions on tensors (top of this file); the rest loads runs and writes files.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.table import Table

from lorafam.errors import LorafamError

Side = Literal["A", "B"]

# --------------------------------------------------------------------------------------------------
# The maths: pure functions on tensors


def singular_basis(matrix: torch.Tensor, side: Side) -> torch.Tensor:
    """Orthonormal columns, by descending singular value, spanning one side of ``matrix``.

    ``side="A"``: right-singular vectors (the row space, in the input dimension; for LoRA's A,
    r x in, the paper's choice); ``side="B"``: left-singular vectors (the column space, in the
    output dimension; for B, out x r). At most min(rows, cols) columns.
    """
    u, _, vh = torch.linalg.svd(matrix.detach().to("cpu", torch.float64), full_matrices=False)
    return vh.T if side == "A" else u


def subspace_similarity(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """phi(i, j) = ||first[:, :i]^T second[:, :j]||_F^2 / min(i, j) for every i, j (1-based).

    ``first`` (n x p) and ``second`` (n x q) have orthonormal columns ordered by importance (see
    ``singular_basis``). Entry [i-1, j-1] of the p x q result is phi(i, j), in [0, 1]: the share of
    the smaller of the two subspaces that lies in the larger. Swapping the arguments transposes it.
    """
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"the bases live in different spaces ({first.shape[0]} vs {second.shape[0]} dims)")
    overlap = (first.to(torch.float64).T @ second.to(torch.float64)).pow(2)
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ||first_i^T second_j||_F^2
    i = torch.arange(1, first.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, second.shape[1] + 1, dtype=torch.float64)[None, :]
    return cumulative / torch.minimum(i, j)


def magnitude_direction_change(weight: torch.Tensor, start: torch.Tensor) -> tuple[float, float]:
    """DoRA's (Delta M, Delta D) of ``weight`` against ``start``, both (out, in).

    Delta M = mean over output units n of | ||weight_n|| - ||start_n|| |; Delta D = mean over n of
    1 - cos(weight_n, start_n), with weight_n the n-th row (output unit). In float64: after a few
    hundred steps 1 - cos is ~1e-6, below float32's resolution of a cosine near 1.
    """
    weight, start = weight.detach().double(), start.detach().double()
    delta_m = (torch.linalg.vector_norm(weight, dim=1) - torch.linalg.vector_norm(start, dim=1)).abs().mean()
    delta_d = (1 - F.cosine_similarity(weight, start, dim=1, eps=1e-30)).mean()
    return float(delta_m), float(delta_d)


def fit_line(x: list[float], y: list[float], resolution: float = 0.0) -> dict[str, float] | None:
    """Least-squares y = slope * x + intercept and Pearson's r; None when x does not vary by more
    than ``resolution`` (its rounding noise), where no slope is defined."""
    if len(x) < 2 or max(x) - min(x) <= resolution:
        return None
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    sxx, syy = float((dx * dx).sum()), float((dy * dy).sum())
    slope = float((dx * dy).sum()) / sxx
    correlation = float((dx * dy).sum()) / math.sqrt(sxx * syy) if syy > 0 else 0.0
    return {"slope": slope, "intercept": float(ys.mean()) - slope * float(xs.mean()), "correlation": correlation}


def projected_norm(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """||left^T W right||_F: the part of W inside the directions left (out x r) and right (in x r)."""
    return float(torch.linalg.matrix_norm(left.T.double() @ weight.double() @ right.double()))


def random_directions(n: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """r random orthonormal directions in R^n (QR of a Gaussian matrix: uniform on the Stiefel manifold)."""
    q, upper = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(upper))  # the sign fix makes the draw uniform


def amplification_numbers(
    weight: torch.Tensor, delta: torch.Tensor, r: int, samples: int = 10, seed: int = 0
) -> dict[str, float | int | None]:
    """The LoRA paper's Table 7 numbers for one matrix W and its update Delta W, at rank r.

    ``projected_on_delta``: ||U^T W V||_F with U, V Delta W's top-r left/right singular vectors;
    ``projected_on_weight``: the same with W's own top-r directions; ``projected_on_random``: the
    mean over ``samples`` draws of random orthonormal U, V (a torch generator seeded with ``seed``);
    ``amplification``: ||Delta W||_F / projected_on_delta (None when either is zero).
    """
    weight, delta = weight.detach().to("cpu", torch.float64), delta.detach().to("cpu", torch.float64)
    r = max(1, min(r, *weight.shape))
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    on_delta = projected_norm(weight, u[:, :r], vh[:r].T)
    weight_singular = torch.linalg.svdvals(weight)
    on_weight = float(weight_singular[:r].pow(2).sum().sqrt())  # ||U_W^T W V_W||_F = top-r energy
    generator = torch.Generator().manual_seed(seed)
    on_random = sum(
        projected_norm(weight, random_directions(weight.shape[0], r, generator), random_directions(weight.shape[1], r, generator))
        for _ in range(samples)
    ) / max(samples, 1)
    delta_norm = float(torch.linalg.matrix_norm(delta))
    return {
        "r": r,
        "weight_norm": float(torch.linalg.matrix_norm(weight)),
        "delta_norm": delta_norm,
        "projected_on_delta": on_delta,
        "projected_on_weight": on_weight,
        "projected_on_random": on_random,
        "amplification": delta_norm / on_delta if on_delta > 0 and delta_norm > 0 else None,
    }


# --------------------------------------------------------------------------------------------------
# Runs: the adapted model, the weight it started from, its checkpoints


@dataclass
class AdaptedRun:
    """A finished run's model with its adapter loaded, and each layer's update at init."""

    run: Any  # lorafam.run.LoadedRun
    model: torch.nn.Module
    variant: Any  # lorafam.adapters.Variant
    #: delta_weight() of each layer right after the adapter was built, where it is not exactly zero
    #: (PiSSA's principal part, DoRA's rounding): the run's starting weight is W0 + this.
    start_deltas: dict[str, torch.Tensor] = field(default_factory=dict)

    def start_weight(self, path: str) -> torch.Tensor:
        """The merged weight the run started from (the original pre-trained W), float64 on the CPU."""
        weight = self.variant.layers[path].base_weight().detach().to("cpu", torch.float64)
        start = self.start_deltas.get(path)
        return weight if start is None else weight + start.double()

    def update(self, path: str) -> torch.Tensor:
        """Delta W: the merged weight now minus the one the run started from, float64 on the CPU."""
        delta = self.variant.layers[path].delta_weight().detach().to("cpu", torch.float64)
        start = self.start_deltas.get(path)
        return delta if start is None else delta - start.double()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.variant.load_adapter_state_dict(tensors)

    def expert_weights(self, module: str | None, layer: int | None) -> list[tuple[str, str, str, Any]]:
        """(parameter path, block index, 'experts.down_proj', its ExpertLoRALayer) of the adapted fused
        weights ``--module`` (a suffix of 'experts.down_proj') and ``--layer`` select."""
        from lorafam.adapters.base import grid_positions

        paths = {path.split(".base_layer")[0] + "." + lay.parameter_name: lay for path, lay in self.variant.expert_layers.items()}
        where = grid_positions(list(paths))
        chosen = []
        for path, expert_layer in paths.items():
            block, name = where[path][0], ".".join(path.rsplit(".", 2)[-2:])
            if (module is None or name == module or name.endswith("." + module)) and (layer is None or block == str(layer)):
                chosen.append((path, block, name, expert_layer))
        return chosen

    def expert_matrices(self, module: str | None, layer: int | None) -> Iterator[tuple[str, str, str, int, torch.Tensor, torch.Tensor]]:
        """(parameter path, block index, 'experts.down_proj', expert, W_e, Delta W_e) of every expert of the
        selected fused weights (``expert_weights``), as (out, in) float64 on the CPU. W_e is the
        pre-trained weight (PiSSA's principal part added back)."""
        for path, block, name, expert_layer in self.expert_weights(module, layer):
            original = expert_layer._canonical(expert_layer.original_weight()).detach().to("cpu", torch.float64)
            adapted = expert_layer.adapted_canonical().detach().to("cpu", torch.float64)
            for e in range(expert_layer.num_experts):
                yield path, block, name, e, original[e], adapted[e] - original[e]


def load_run(folder: str | Path) -> AdaptedRun:
    """Load a finished run folder's model and adapter, noting each layer's update at init first."""
    from lorafam.modeling import head_modules, load_model
    from lorafam.run import adapt, load_adapter_weights, open_run

    run = open_run(folder)
    model = load_model(run.recipe.model, run.label_names)
    variant = adapt(model, run.recipe, head_modules(model, run.recipe.model.task), run.info.prepare)
    start = start_deltas(variant)
    load_adapter_weights(variant, run.folder)
    return AdaptedRun(run=run, model=model, variant=variant, start_deltas=start)


@torch.no_grad()
def start_deltas(variant: Any) -> dict[str, torch.Tensor]:
    """Each layer's ``delta_weight()`` as built, before any weights load, where it is not exactly zero.

    Every variant starts as the base model, so W0 + this is the original pre-trained weight: W0
    itself where the update starts at zero (B = 0), W_res + s B0 A0 for PiSSA.
    """
    start = {}
    for path, layer in variant.layers.items():
        delta = layer.delta_weight().detach().to("cpu", torch.float32)  # the precision it was computed in
        if torch.count_nonzero(delta):
            start[path] = delta
    return start


def saved_states(run: Any, warn: Callable[[str], None]) -> list[tuple[int, Path]]:
    """(step, adapter file) of every complete checkpoint and of the final adapter, by step.

    Damaged checkpoints are reported through ``warn`` and left out. The final adapter replaces a
    checkpoint of the same step.
    """
    from lorafam.checkpoint import verify_checkpoint
    from lorafam.run import ADAPTER_WEIGHTS, CHECKPOINTS

    states: dict[int, Path] = {}
    root = run.folder / CHECKPOINTS
    for folder in sorted(root.glob("step-*")) if root.is_dir() else []:
        match = re.fullmatch(r"step-(\d+)", folder.name)
        if not match or not folder.is_dir():
            continue
        try:
            verify_checkpoint(folder)
        except LorafamError as e:
            warn(f"warning: skipping checkpoint {folder}: {e}")
            continue
        states[int(match.group(1))] = folder / ADAPTER_WEIGHTS
    if not states:
        raise LorafamError(
            f"{run.folder} has no checkpoints ({CHECKPOINTS}/step-NNNNNN/): this analysis follows the weights "
            "over training; train with train.save_every set, e.g. --set train.save_every=10"
        )
    final_step = run.info.steps
    if final_step is not None:
        states[final_step] = run.folder / ADAPTER_WEIGHTS
    return sorted(states.items())


def select_paths(paths: Iterable[str], module: str | None, layer: int | None, what: str) -> list[str]:
    """The adapted module paths matching ``--module`` (a name suffix) and ``--layer`` (block index)."""
    from lorafam.adapters.base import grid_positions

    paths = list(paths)
    where = grid_positions(paths)
    chosen = [
        p for p in paths
        if (module is None or p == module or p.endswith("." + module) or where[p][1] == module)
        and (layer is None or where[p][0] == str(layer))
    ]
    if not chosen:
        modules = ", ".join(dict.fromkeys(m for _, m in where.values()))
        layers = sorted({int(lay) for lay, _ in where.values() if lay.isdigit()})
        span = f" in layers {layers[0]}-{layers[-1]}" if layers else ""
        asked = " ".join(f"--{k} {v}" for k, v in (("module", module), ("layer", layer)) if v is not None)
        raise LorafamError(f"{asked} matches no adapted layer of {what}; it adapts {modules}{span}")
    return chosen


def linear_paths(adapted: Any, module: str | None, layer: int | None, run: str, experts_match: bool) -> list[str]:
    """The adapted linear layers ``--module``/``--layer`` select; none (rather than an error) where
    they select only fused expert weights."""
    try:
        return select_paths(adapted.variant.layers, module, layer, run)
    except LorafamError:
        if not experts_match:  # neither a linear layer nor an expert weight matches
            raise
        return []


def output_folder(output: Path | None, run_folder: Path) -> Path:
    """``--output``, or RUN/analysis; a file in the way is an error before anything is computed."""
    folder = Path(output) if output is not None else Path(run_folder) / "analysis"
    if folder.exists() and not folder.is_dir():
        raise LorafamError(f"--output {folder} is a file; give a folder for the analysis files")
    return folder


@dataclass
class Result:
    """What an analysis computed (also written as JSON), the files it wrote and a table to print."""

    data: dict[str, Any]
    files: list[Path]
    table: Table | None = None
    notes: list[str] = field(default_factory=list)


def write_json(path: Path, obj: Any) -> Path:
    from lorafam.run import write_json as atomic_json

    atomic_json(path, obj)
    return path


# --------------------------------------------------------------------------------------------------
# lorafam analyze subspace


def variants_with_factors() -> list[str]:
    """Names of the registered variants whose layers have a low-rank pair (``Variant.has_low_rank_factors``)."""
    from lorafam.adapters import VARIANTS

    return [name for name, cls in VARIANTS.items() if cls.has_low_rank_factors]


def adapter_rank(adapted: AdaptedRun, path: str) -> int:
    """The rank of a layer's update: its low-rank pair's (AdaLoRA: the live triplets), else adapter.r."""
    pair = adapted.variant.layers[path].low_rank_factors()
    return pair[1].shape[0] if pair is not None else adapted.variant.config.r


def _factors(adapted: AdaptedRun, paths: list[str], side: Side) -> dict[str, torch.Tensor]:
    out = {}
    for path in paths:
        pair = adapted.variant.layers[path].low_rank_factors()
        if pair is None:
            raise LorafamError(
                f"{adapted.run.folder} is a {adapted.variant.name} run, whose layers have no low-rank A, B pair to "
                f"compare; subspace with two runs works for {', '.join(variants_with_factors())} (with one run it "
                "compares any variant's update with W)"
            )
        out[path] = singular_basis(pair[1] if side == "A" else pair[0], side)
    return out


def _expert_factors(adapted: AdaptedRun, module: str | None, layer: int | None, side: Side) -> dict[str, torch.Tensor]:
    """The singular basis of each expert's A_e (or B_e), keyed 'path.to.experts.down_proj[e]'."""
    out = {}
    for path, _, _, expert_layer in adapted.expert_weights(module, layer):
        B, A = expert_layer.factors()
        for e in range(expert_layer.num_experts):
            out[f"{path}[{e}]"] = singular_basis((A[e] if side == "A" else B[e]).detach(), side)
    return out


def _expert_keys(adapted: AdaptedRun, module: str | None, layer: int | None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """('path.to.experts.down_proj[e]', W_e, Delta W_e) of the experts ``--module`` / ``--layer`` select."""
    return [(f"{path}[{e}]", weight, delta) for path, _, _, e, weight, delta in adapted.expert_matrices(module, layer)]


def subspace(
    run_a: Path,
    run_b: Path | None,
    *,
    module: str | None,
    layer: int | None,
    side: Side,
    output: Path | None,
    base_directions: int | None = None,
) -> Result:
    """phi(i, j) between two runs' A (or B) subspaces per shared adapted matrix; with one run,
    between its update's directions and W's. Writes subspace.json and subspace.png."""
    if side not in ("A", "B"):
        raise LorafamError(f"--matrix {side!r}: choose A (input side) or B (output side)")
    if base_directions is not None and base_directions < 1:
        raise LorafamError(f"--base-directions {base_directions}: give a positive number of W's directions")
    from lorafam.run import open_run

    open_run(run_a)
    if run_b is not None:
        open_run(run_b)
    folder = output_folder(output, Path(run_a))
    first = load_run(run_a)
    experts = _expert_keys(first, module, layer)
    paths = linear_paths(first, module, layer, str(run_a), bool(experts))
    space = "input space: right-singular vectors of A" if side == "A" else "output space: left-singular vectors of B"
    matrices: dict[str, dict[str, Any]] = {}
    if run_b is not None:
        bases_a = _factors(first, paths, side) | _expert_factors(first, module, layer, side)
        del first, experts
        second = load_run(run_b)
        bases_b = _factors(second, [p for p in paths if p in second.variant.layers], side)
        bases_b |= _expert_factors(second, module, layer, side)
        shared = [p for p in bases_a if p in bases_b]
        if not shared:
            raise LorafamError(f"{run_a} and {run_b} adapt no module in common; pick runs of the same model")
        for path in shared:
            if bases_a[path].shape[0] != bases_b[path].shape[0]:
                raise LorafamError(f"{path} has different shapes in {run_a} and {run_b}: runs of different models?")
            matrices[path] = {"rows": bases_a[path].shape[1], "columns": bases_b[path].shape[1],
                              "phi": subspace_similarity(bases_a[path], bases_b[path])}
        compared = {"rows": f"{run_a} ({side}, top-i directions)", "columns": f"{run_b} ({side}, top-j directions)"}
    else:
        for path in paths:
            weight, delta = first.start_weight(path), first.update(path)
            n = min(weight.shape)
            rank = min(adapter_rank(first, path), n)
            # The paper's appendix looks at W's top 10% (at least as many as Delta W has).
            count = min(n, base_directions or max(rank, math.ceil(0.1 * n)))
            phi = subspace_similarity(singular_basis(delta, side)[:, :rank], singular_basis(weight, side)[:, :count])
            matrices[path] = {"rows": rank, "columns": count, "phi": phi}
        for key, weight, delta in experts:  # each expert of a fused weight is its own matrix
            n = min(weight.shape)
            rank = min(first.variant.config.r, n)
            count = min(n, base_directions or max(rank, math.ceil(0.1 * n)))
            phi = subspace_similarity(singular_basis(delta, side)[:, :rank], singular_basis(weight, side)[:, :count])
            matrices[key] = {"rows": rank, "columns": count, "phi": phi}
        compared = {"rows": f"{run_a}: Delta W's top-i directions", "columns": "the pre-trained W's top-j directions"}

    from lorafam.adapters.base import grid_positions

    where = grid_positions(list(matrices))
    layers_present = sorted({where[p][0] for p in matrices}, key=_layer_order)
    shown_layer = str(layer) if layer is not None else layers_present[len(layers_present) // 2]
    shown = [p for p in matrices if where[p][0] == shown_layer]
    data = {
        "analysis": "subspace similarity (LoRA paper, section 7.2)",
        "matrix": side,
        "space": space,
        "compared": compared,
        "definition": "phi[i-1][j-1] = ||U_i^T V_j||_F^2 / min(i, j)",
        "matrices": [
            {"path": p, "layer": where[p][0], "module": where[p][1], **{k: v for k, v in m.items() if k != "phi"},
             "phi": [[round(float(x), 6) for x in row] for row in m["phi"]]}
            for p, m in matrices.items()
        ],
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_json(folder / "subspace.json", data)]
    files.append(_plot_subspace(folder / "subspace.png", shown, matrices, where, compared, side))

    table = Table(title=f"subspace similarity phi(i, j) of {side} ({space})")
    for col in ("layer", "module", "i max", "j max", "phi(1,1)", "phi(i max, j max)"):
        table.add_column(col, justify="left" if col in ("layer", "module") else "right")
    listed = list(matrices) if len(matrices) <= 40 else shown
    for p in listed:
        m = matrices[p]
        table.add_row(where[p][0], where[p][1], str(m["rows"]), str(m["columns"]),
                      f"{float(m['phi'][0, 0]):.3f}", f"{float(m['phi'][-1, -1]):.3f}")
    notes = [f"subspace.png shows layer {shown_layer}" + ("" if layer is not None else " (pass --layer N for another)")]
    if len(listed) < len(matrices):
        notes.append(f"table lists layer {shown_layer}; all {len(matrices)} matrices are in subspace.json")
    return Result(data=data, files=files, table=table, notes=notes)


def _layer_order(layer: str) -> tuple[bool, int | str]:
    return (not layer.isdigit(), int(layer) if layer.isdigit() else layer)


def _plot_subspace(path: Path, shown: list[str], matrices: dict, where: dict, compared: dict, side: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    from lorafam.plots import new_figure, save_png

    heights = [1.2 + min(0.25 * matrices[p]["rows"], 4) for p in shown]
    fig = new_figure(8, sum(heights) + 0.6)
    axes = fig.subplots(len(shown), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, p in zip(axes, shown):
        m = matrices[p]
        image = ax.imshow(m["phi"].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=(0.5, m["columns"] + 0.5, m["rows"] + 0.5, 0.5))
        ax.set_title(f"layer {where[p][0]} {where[p][1]}: phi(i, j) of {side}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("i", fontsize=8)
        fig.colorbar(image, ax=ax)
    axes[-1].set_xlabel("j", fontsize=8)
    fig.suptitle(f"rows: {compared['rows']}\ncolumns: {compared['columns']}", fontsize=8)
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# lorafam analyze decomposition


def decomposition(run_dir: Path, *, module: str | None, layer: int | None, output: Path | None,
                  warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Result:
    """DoRA's Delta M / Delta D per adapted layer and saved step; decomposition.json and one scatter
    PNG per module type with the fitted slope of Delta M against Delta D."""
    from lorafam.adapters.base import grid_positions
    from lorafam.run import load_tensors, open_run

    run = open_run(run_dir)
    states = saved_states(run, warn)  # no checkpoints: an error before the model loads
    folder = output_folder(output, Path(run_dir))
    adapted = load_run(run_dir)
    has_experts = bool(adapted.expert_weights(module, layer))
    paths = linear_paths(adapted, module, layer, str(run_dir), has_experts)
    where = grid_positions(list(adapted.variant.layers))
    points: dict[str, list[dict[str, Any]]] = {}
    with torch.no_grad():
        for step, file in states:
            adapted.load_state(load_tensors(file))
            for p in paths:  # one layer's weights at a time: no copy of the whole model is kept
                start = adapted.start_weight(p)
                delta_m, delta_d = magnitude_direction_change(start + adapted.update(p), start)
                points.setdefault(where[p][1], []).append(
                    {"path": p, "layer": where[p][0], "step": step, "delta_m": delta_m, "delta_d": delta_d}
                )
            for path, block, name, e, start, delta in adapted.expert_matrices(module, layer):  # each expert a matrix
                delta_m, delta_d = magnitude_direction_change(start + delta, start)
                points.setdefault(name, []).append(
                    {"path": f"{path}[{e}]", "layer": block, "expert": e, "step": step, "delta_m": delta_m, "delta_d": delta_d}
                )
    modules = {}
    for name, rows in points.items():
        # 1 - cos of fp32 weights in float64 is exact to ~1e-15: below 1e-12 Delta D is rounding.
        fit = fit_line([r["delta_d"] for r in rows], [r["delta_m"] for r in rows], resolution=1e-12)
        by_step = {
            str(step): fit_line([r["delta_d"] for r in rows if r["step"] == step],
                                [r["delta_m"] for r in rows if r["step"] == step], resolution=1e-12)
            for step, _ in states
        }
        modules[name] = {"fit": fit, "fit_by_step": by_step, "points": rows}
    data = {
        "analysis": "weight decomposition (DoRA paper, section 3.2)",
        "variant": adapted.variant.name,
        "steps": [s for s, _ in states],
        "definition": "per output unit n (row of the (out, in) weight): delta_m = mean |m_n^t - m_n^0|, "
        "delta_d = mean (1 - cos(W_n^t, W_n^0)); fit: delta_m = slope * delta_d + intercept",
        "modules": modules,
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_json(folder / "decomposition.json", data)]
    for name, entry in modules.items():
        files.append(_plot_decomposition(folder / f"decomposition_{_file_safe(name)}.png", name, entry, adapted.variant.name))
    table = Table(title=f"Delta M vs Delta D of {adapted.variant.name} over steps {', '.join(map(str, data['steps']))}")
    for col in ("module", "points", "slope", "correlation", "mean Delta M", "mean Delta D"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, entry in modules.items():
        rows, fit = entry["points"], entry["fit"]
        table.add_row(
            name, str(len(rows)),
            "n/a" if fit is None else f"{fit['slope']:.4g}",
            "n/a" if fit is None else f"{fit['correlation']:.3f}",
            f"{sum(r['delta_m'] for r in rows) / len(rows):.4g}",
            f"{sum(r['delta_d'] for r in rows) / len(rows):.4g}",
        )
    notes = ["slope n/a: Delta D does not vary (e.g. only magnitudes changed)"] if any(
        e["fit"] is None for e in modules.values()) else []
    return Result(data=data, files=files, table=table, notes=notes)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _plot_decomposition(path: Path, name: str, entry: dict[str, Any], variant: str) -> Path:
    from lorafam.plots import new_figure, save_png

    rows, fit = entry["points"], entry["fit"]
    fig = new_figure(6, 4.5)
    ax = fig.add_subplot()
    steps = sorted({r["step"] for r in rows})
    markers = "o^sDvP*X<>"
    for k, step in enumerate(steps):
        mine = [r for r in rows if r["step"] == step]
        ax.scatter([r["delta_d"] for r in mine], [r["delta_m"] for r in mine], s=18,
                   marker=markers[k % len(markers)], label=f"step {step}")
        if len(rows) <= 80:
            for r in mine:
                ax.annotate(r["layer"], (r["delta_d"], r["delta_m"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if fit is not None:
        xs = [min(r["delta_d"] for r in rows), max(r["delta_d"] for r in rows)]
        ax.plot(xs, [fit["slope"] * x + fit["intercept"] for x in xs], "k--", linewidth=1,
                label=f"fit: slope {fit['slope']:.3g} (r = {fit['correlation']:.2f})")
    ax.set_xlabel("Delta D (mean 1 - cos per output unit)")
    ax.set_ylabel("Delta M (mean |magnitude change|)")
    ax.set_title(f"{variant}: {name}, weight decomposition (DoRA Fig. 2)", fontsize=9)
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=7)
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------------
# lorafam analyze amplification


def amplification(run_dir: Path, *, module: str | None, layer: int | None, output: Path | None,
                  rank: int | None = None, samples: int = 10, seed: int = 0) -> Result:
    """The LoRA paper's section 7.3 per adapted matrix; amplification.json and a table."""
    from lorafam.run import open_run

    if rank is not None and rank < 1:
        raise LorafamError(f"--rank {rank}: give a positive rank")
    if samples < 1:
        raise LorafamError(f"--samples {samples}: give at least 1 random draw")
    open_run(run_dir)
    folder = output_folder(output, Path(run_dir))
    adapted = load_run(run_dir)
    experts = list(adapted.expert_matrices(module, layer))
    paths = linear_paths(adapted, module, layer, str(run_dir), bool(experts))
    from lorafam.adapters.base import grid_positions

    where = grid_positions(list(adapted.variant.layers))
    rows = []
    with torch.no_grad():
        for p in paths:
            r = rank or adapter_rank(adapted, p)
            numbers = amplification_numbers(adapted.start_weight(p), adapted.update(p), r, samples, seed)
            rows.append({"path": p, "layer": where[p][0], "module": where[p][1], **numbers})
        for path, block, name, e, weight, delta in experts:  # each expert of a fused weight is its own matrix
            numbers = amplification_numbers(weight, delta, rank or adapted.run.recipe.adapter.r, samples, seed)
            rows.append({"path": f"{path}[{e}]", "layer": block, "module": f"{name}[{e}]", "expert": e, **numbers})
    data = {
        "analysis": "Delta W vs W (LoRA paper, section 7.3)",
        "variant": adapted.variant.name,
        "random_samples": samples,
        "seed": seed,
        "definition": "projected_on_X = ||U^T W V||_F with U, V the top-r left/right singular vectors of X "
        "(Delta W, W, or random orthonormal directions averaged over random_samples draws); "
        "amplification = ||Delta W||_F / projected_on_delta",
        "layers": rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_json(folder / "amplification.json", data)]
    table = Table(title=f"||U^T W V||_F in the top-r directions of Delta W, of W, and random ({adapted.variant.name})")
    for col in ("layer", "module", "r", "||W||", "||dW||", "dW dirs", "W dirs", "random", "factor"):
        table.add_column(col, justify="left" if col in ("layer", "module") else "right")
    for row in rows:
        amp = row["amplification"]
        table.add_row(
            row["layer"], row["module"], str(row["r"]), f"{row['weight_norm']:.3g}", f"{row['delta_norm']:.3g}",
            f"{row['projected_on_delta']:.3g}", f"{row['projected_on_weight']:.3g}",
            f"{row['projected_on_random']:.3g}", "n/a" if amp is None else f"{amp:.3g}",
        )
    return Result(data=data, files=files, table=table)


# --------------------------------------------------------------------------------------------------
# lorafam analyze ranks


def variants_with_artifacts() -> list[str]:
    """Names of the registered variants that draw what they decided (``Variant.draws_artifacts``)."""
    from lorafam.adapters import VARIANTS

    return [name for name, cls in VARIANTS.items() if cls.draws_artifacts]


def ranks(run_dir: Path, *, output: Path | None) -> Result:
    """The variant's own pictures of what training decided, written into the output folder."""
    from lorafam.merge import load_adapted
    from lorafam.run import open_run

    run = open_run(run_dir)
    folder = output_folder(output, Path(run_dir))
    if run.recipe.adapter.variant not in variants_with_artifacts():
        raise LorafamError(
            f"{run_dir} is a {run.recipe.adapter.variant} run: it decides no ranks or layers during training, so there "
            f"is nothing to draw; analyze ranks shows those of {', '.join(variants_with_artifacts())} runs"
        )
    _, variant = load_adapted(run)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    files = variant.write_artifacts(folder)
    if not files:
        if created:
            folder.rmdir()
        raise LorafamError(f"{run_dir}: the {variant.name} run recorded no decision to draw (did training finish?)")
    return Result(data={"files": [str(f) for f in files]}, files=files, notes=variant.report())
