"""A step does not depend on its layout, and training runs on several processes.

At a fixed global batch, batch_size x grad_accum x processes may change the trained adapter only by
float rounding: each optimizer step is the mean over all of its label tokens (lorafam.trainer), and
adapter dropout draws each example's masks from the example's own key (lorafam.adapters.dropout). The
data are chat pairs of very different lengths with response-only labels, so micro-batches hold
different numbers of label tokens (a per-micro-batch mean would weigh them wrongly; see
test_micro_batches_really_differ_in_label_tokens). Multi-process runs are real: two gloo processes
started by `accelerate launch` with configs/ddp.yaml, as the README tells users to launch them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from deepspeed_worker import nan_loss
from tinyrun import adapter_section, cli, cli_env, cli_subprocess, make_chat_data, read_metrics, word_tokenizer, write_recipe

from lorafam.data import prepare_data
from lorafam.recipe import load_recipe
from lorafam.run import ADAPTER_WEIGHTS
from lorafam.tasks import get_task
from lorafam.trainer import BatchLayout

ROOT = Path(__file__).parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
STEPS = 6


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """conftest's ``assets`` train on chat pairs here (see the module docstring)."""
    return make_chat_data(tmp_path_factory.mktemp("layout") / "chat.jsonl", rows=72)


def recipe(tmp_path: Path, assets, name: str, batch: int, accum: int, variant: str = "lora", **train) -> Path:
    model, data = assets
    section = adapter_section(variant)  # dropout on (unless the variant refuses it): its masks follow the example
    settings = {"max_steps": STEPS, "batch_size": batch, "grad_accum": accum, "optimizer": "sgd", "lr": 0.05,
                "mixed_precision": "no", "save_every": 2, "log_every": 1} | train
    return write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / name, adapter=section, train=settings,
                        data_keys={"max_length": 40})


def train_in_process(path: Path) -> Path:
    """`lorafam train PATH` in this process; returns the run folder."""
    result = cli("train", path)
    assert result.exit_code == 0, result.output + result.stderr
    return Path(load_recipe(path).output_dir)


def with_changes(path: Path, target: Path, adapter: dict | None = None, train: dict | None = None) -> Path:
    """A copy of the recipe at ``path`` with some keys changed, its run in a folder named after it."""
    raw = load_recipe(path).model_dump(mode="json")
    raw["adapter"] |= adapter or {}
    raw["train"] |= train or {}
    raw["output_dir"] = str(target.with_suffix(""))
    target.write_text(json.dumps(raw))  # JSON is YAML
    return target


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a|| over the adapter's tensors (each non-zero after training)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        norm = a[key].double().norm()
        assert norm > 0, f"{key} is all zeros: nothing was trained"
        worst = max(worst, float((a[key].double() - b[key].double()).norm() / norm))
    return worst


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r and "phase" not in r]


# --------------------------------------------------------------------------------------------------
# One process: batch size x grad_accum


def test_micro_batches_really_differ_in_label_tokens(tmp_path, assets):
    """The layouts below would train different adapters under a per-micro-batch mean."""
    spec = load_recipe(recipe(tmp_path, assets, "probe", 2, 4))
    data = prepare_data(spec.data, word_tokenizer_with_template(), spec.model.task, spec.train.seed)
    from lorafam.data import make_collator

    collate, task = make_collator(word_tokenizer_with_template(), spec.model.task), get_task(spec.model.task)
    counts = [task.label_count(collate([data.train[i] for i in idx]))
              for idx in BatchLayout(2, 4).micro_batches(len(data.train), spec.train.seed, 1, 0)]
    assert len(counts) == 4 and len(set(counts)) > 1, counts


@pytest.mark.parametrize("batch, accum, processes", [(2, 3, 1), (4, 2, 1), (1, 4, 2), (3, 1, 1)])
def test_a_step_groups_its_examples_by_length_without_changing_which_it_takes(batch, accum, processes):
    """Given the rows' lengths, each process's examples of a step go into its micro-batches shortest
    first (less padding); the examples, and how many each micro-batch holds, stay as without.
    That the adapter stays the same to float rounding is what the grad_accum tests below show."""
    lengths = torch.randint(1, 128, (53,), generator=torch.Generator().manual_seed(0)).tolist()
    layout = BatchLayout(batch, accum, processes)
    for step in range(1, 3 * layout.steps_per_epoch(53) + 1):  # across epochs
        for rank in range(processes):
            plain = layout.micro_batches(53, 7, step, rank)
            grouped = layout.micro_batches(53, 7, step, rank, lengths)
            assert [len(b) for b in grouped] == [len(b) for b in plain]
            assert sorted(sum(grouped, [])) == sorted(sum(plain, []))
            flat = [lengths[i] for b in grouped for i in b]
            # One micro-batch is padded to its longest row whatever its order: left as it was.
            assert flat == sorted(flat) if accum > 1 else grouped == plain


def word_tokenizer_with_template():
    from tinyrun import WORD_CHAT_TEMPLATE

    tokenizer = word_tokenizer()
    tokenizer.chat_template = WORD_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("batch, accum", [(4, 2), (2, 4)])
def test_grad_accum_trains_the_same_adapter_as_one_big_batch(batch, accum, tmp_path, assets):
    reference = train_in_process(recipe(tmp_path, assets, "b8", 8, 1))
    layout = train_in_process(recipe(tmp_path, assets, f"b{batch}x{accum}", batch, accum))
    assert relative_difference(load_file(reference / ADAPTER_WEIGHTS), load_file(layout / ADAPTER_WEIGHTS)) < 1e-5
    assert losses(layout) == pytest.approx(losses(reference), rel=1e-6)


def test_the_variants_own_loss_term_counts_once_per_step(tmp_path, assets):
    """AdaLoRA's orthogonality penalty is added once per optimizer step, whatever the accumulation."""
    reference = train_in_process(recipe(tmp_path, assets, "ada8", 8, 1, variant="adalora"))
    layout = train_in_process(recipe(tmp_path, assets, "ada2x4", 2, 4, variant="adalora"))
    assert relative_difference(load_file(reference / ADAPTER_WEIGHTS), load_file(layout / ADAPTER_WEIGHTS)) < 1e-5
    penalties = [[r["orth_reg"] for r in read_metrics(run) if "orth_reg" in r] for run in (reference, layout)]
    assert penalties[0] == pytest.approx(penalties[1], rel=1e-6) and len(penalties[0]) == STEPS


# --------------------------------------------------------------------------------------------------
# Two processes under `accelerate launch`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    # The checkout under test, also for a worker script in tests/ (whose own folder heads sys.path)
    # and wherever else an editable install of lorafam points.
    return cli_env() | {"PYTHONPATH": str(ROOT)}


def launch(*args: str, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    launcher = [ACCELERATE, "launch", "--config_file", ROOT / "configs" / "ddp.yaml",
                "--num_processes", processes, "--main_process_port", free_port()]
    return cli_subprocess(*args, launcher=launcher, env=launch_env(), timeout=timeout, cwd=ROOT)


def test_two_processes_train_the_same_adapter_as_one_and_only_the_main_one_writes(tmp_path, assets):
    reference = train_in_process(recipe(tmp_path, assets, "one", 8, 1))
    path = recipe(tmp_path, assets, "two", 4, 1)
    result = launch("-m", "lorafam", "train", path)
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "two"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 8  # two processes really ran
    assert "2 processes on cpu" in result.stdout and "engine: DDP (gloo) on 2 process(es)" in result.stdout
    assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 processes" in " ".join(result.stdout.split())
    assert relative_difference(load_file(reference / ADAPTER_WEIGHTS), load_file(run_dir / ADAPTER_WEIGHTS)) < 1e-5
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)
    # One writer: every step logged once (two writers would append each row twice), one line per
    # step on stdout, and the checkpoint written whole once.
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert sum(line.startswith("step 1/") for line in result.stdout.splitlines()) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_two_bf16_processes_train_the_same_adapter_with_their_frozen_weights_held_as_copied(tmp_path, assets):
    """train.frozen_weights: hold (the default) under DDP: each process holds its own frozen weights
    in bf16 (their fp32 values in its own file) and the run trains, and evaluates in fp32, exactly
    as with autocast's copies."""
    runs = {}
    for mode in ("hold", "copy"):
        path = recipe(tmp_path, assets, mode, 4, 1, mixed_precision="bf16", frozen_weights=mode, eval_every=3)
        result = launch("-m", "lorafam", "train", path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert ("M held in bfloat16 through the steps" in result.stdout) == (mode == "hold"), result.stdout
        runs[mode] = tmp_path / mode
    rows = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_seconds")} for r in read_metrics(run)]
            for run in runs.values()]
    assert rows[0] == rows[1] and any("eval_loss" in r for r in rows[0])
    held, copied = (load_file(run / ADAPTER_WEIGHTS) for run in runs.values())
    assert held.keys() == copied.keys()
    for key in held:
        assert torch.equal(held[key], copied[key]), key


def test_a_cpu_launch_that_starts_one_process_is_refused(tmp_path, assets):
    """`accelerate launch --cpu --num_processes 2` starts one process: say so instead of training alone."""
    launcher = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--main_process_port", free_port()]
    result = cli_subprocess("-m", "lorafam", "train", recipe(tmp_path, assets, "cpu", 4, 1), launcher=launcher, cwd=ROOT)
    assert result.returncode != 0
    assert "error: accelerate launch --cpu (use_cpu: true) starts a single process" in result.stderr
    assert not (tmp_path / "cpu").exists()


# Variants with state beyond their layers: the processes must agree on it, and the run must equal
# a single-process run of the same global batch.
STATEFUL = {
    "adalora": {},
    "lora_drop": {},
    "delta_lora": {"start_step": 1},
    "vera": {},
}


def test_variant_state_agrees_on_every_process_and_matches_one_process(tmp_path, assets):
    recipes = [
        with_changes(recipe(tmp_path, assets, variant, 4, 1, variant=variant), tmp_path / f"{variant}-two.yaml", adapter=keys)
        for variant, keys in STATEFUL.items()
    ]
    result = launch(ROOT / "tests" / "dist_worker.py", tmp_path / "ranks", *recipes)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for variant, path in zip(STATEFUL, recipes):
        ranks = [load_file(tmp_path / "ranks" / f"{path.stem}-rank{r}.safetensors") for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys()
        for key in ranks[0]:  # bitwise: each process holds the same weights, scores, masks, buffers
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{variant}: {key} differs between processes"
        facts = [json.loads((tmp_path / "ranks" / f"{path.stem}-rank{r}.json").read_text()) for r in (0, 1)]
        assert facts[0] == facts[1] and facts[0]["world_size"] == 2
        if variant == "adalora":  # the scores and masks after every step, not only the final masks
            digests = [d.split(":") for d in facts[0]["state_after_each_step"]]
            scored = [d for d in digests if int(d[3]) > 4]  # masks of 4 layers, plus scores until the final ranks
            assert len(digests) == STEPS and len(scored) >= 3 and len({d[2] for d in scored}) == len(scored), digests
        if variant == "lora_drop":
            assert facts[0]["prepare"]["kept"], "no layer kept"
        if variant == "vera":
            assert any("vera_A" in k for k in ranks[0])

        # ... and the same training as one process with one batch of the same global size.
        one = train_in_process(with_changes(path, tmp_path / f"{variant}-one.yaml", train={"batch_size": 8}))
        two = Path(load_recipe(path).output_dir)
        assert relative_difference(load_file(one / ADAPTER_WEIGHTS), load_file(two / ADAPTER_WEIGHTS)) < 1e-5, variant


# --------------------------------------------------------------------------------------------------
# FSDP2: parameters, gradients and optimizer state sharded across the processes


def launch_fsdp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`lorafam ARGS` under configs/fsdp2.yaml on 2 CPU processes (tests/fsdp_worker.py says why a
    worker: Accelerate enables FSDP for GPUs only)."""
    launcher = [ACCELERATE, "launch", "--config_file", ROOT / "configs" / "fsdp2.yaml", "--num_processes", "2",
                "--main_process_port", free_port(), ROOT / "tests" / "fsdp_worker.py"]
    return cli_subprocess(*args, launcher=launcher, env=launch_env() | (env or {}), timeout=600, cwd=ROOT)


def test_fsdp2_trains_the_same_adapter_as_one_process_and_saves_it_whole(tmp_path, assets):
    reference = train_in_process(recipe(tmp_path, assets, "one", 8, 1, variant="dora"))
    path = recipe(tmp_path, assets, "fsdp", 4, 1, variant="dora")
    result = launch_fsdp("train", path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "engine: FSDP2 on 2 process(es)" in result.stdout
    run_dir = tmp_path / "fsdp"
    saved, expected = load_file(run_dir / ADAPTER_WEIGHTS), load_file(reference / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}  # whole, same keys
    assert relative_difference(expected, saved) < 1e-5
    assert json.loads((run_dir / "adapter_config.json").read_text()) == json.loads((reference / "adapter_config.json").read_text())


def test_fsdp2_interrupted_and_resumed_matches_the_uninterrupted_run(tmp_path, assets):
    path = recipe(tmp_path, assets, "whole", 4, 1)
    assert launch_fsdp("train", path).returncode == 0
    expected = load_file(tmp_path / "whole" / ADAPTER_WEIGHTS)

    path = recipe(tmp_path, assets, "stopped", 4, 1)
    stopped = launch_fsdp("train", path, env={"LORAFAM_TEST_SIGTERM_AFTER_STEP": "3"})
    assert stopped.returncode != 0
    assert "interrupted by SIGTERM after step 3; checkpoint saved to" in stopped.stderr
    assert (tmp_path / "stopped" / "checkpoints" / "step-000003" / "complete.json").is_file()
    resumed = launch_fsdp("train", path, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 3/" in resumed.stdout
    got = load_file(tmp_path / "stopped" / ADAPTER_WEIGHTS)
    for key in expected:  # bitwise: the gathered optimizer state went back into its shards exactly
        assert torch.equal(got[key], expected[key]), key


def test_qlora_under_fsdp2_shards_the_4bit_weights_and_trains_the_same_adapter(tmp_path, assets):
    """Packed in the compute dtype (lorafam.quant.quant_storage), the 4-bit weights are sharded; packed
    in uint8, Accelerate would keep them whole on every process and say so."""
    nf4 = {"quantization": "nf4", "compute_dtype": "bfloat16"}
    one = with_changes(recipe(tmp_path, assets, "q", 8, 1, save_every=None, max_steps=4), tmp_path / "q-one.yaml")
    raw = json.loads(one.read_text())
    raw["model"] |= nf4
    one.write_text(json.dumps(raw))
    two = with_changes(one, tmp_path / "q-fsdp.yaml", train={"batch_size": 4})
    reference = train_in_process(one)
    result = launch_fsdp("train", two)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "engine: FSDP2 on 2 process(es)" in result.stdout
    assert "Params4bit" not in result.stderr  # Accelerate's warning that it left them whole
    saved, expected = load_file(tmp_path / "q-fsdp" / ADAPTER_WEIGHTS), load_file(reference / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    assert relative_difference(expected, saved) < 1e-5


def test_a_variant_that_needs_whole_parameters_refuses_fsdp2_in_one_line(tmp_path, assets):
    result = launch_fsdp("train", recipe(tmp_path, assets, "ada", 4, 1, variant="adalora"))
    assert result.returncode != 0
    assert "error: adapter.variant: adalora cannot train with sharded parameters (FSDP2): its budget ranks" in result.stderr


# --------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO: optimizer state and gradients partitioned (ZeRO-2), parameters too (ZeRO-3)


def launch_deepspeed(config: Path, extensions: Path, *args: str) -> subprocess.CompletedProcess:
    """tests/deepspeed_worker.py ARGS under the Accelerate config CONFIG on 2 CPU processes (the worker
    says why a worker). DeepSpeed gets its own extensions folder: an op it compiles, or leaves
    half-compiled when killed, never touches (or hangs on) the machine's shared cache."""
    launcher = [ACCELERATE, "launch", "--config_file", config, "--num_processes", "2",
                "--main_process_port", free_port(), ROOT / "tests" / "deepspeed_worker.py"]
    env = launch_env() | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    return cli_subprocess(*args, launcher=launcher, env=env, timeout=600, cwd=ROOT)


def test_deepspeed_zero2_trains_the_same_adapter_as_one_process(tmp_path, assets):
    """grad_accum 2: DeepSpeed must neither divide the step's loss again nor step after each micro-batch."""
    reference = train_in_process(recipe(tmp_path, assets, "one", 8, 1, save_every=None))
    path = recipe(tmp_path, assets, "zero2", 2, 2, save_every=None)
    result = launch_deepspeed(ROOT / "configs" / "deepspeed_zero2.yaml", tmp_path / "extensions", "train", path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = " ".join(result.stdout.split())
    assert "engine: DeepSpeed ZeRO-2 on 2 process(es)" in stdout
    assert "global batch 8 = batch_size 2 x grad_accum 2 x 2 processes" in stdout
    run_dir = tmp_path / "zero2"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 8 and info["status"] == "complete"
    saved, expected = load_file(run_dir / ADAPTER_WEIGHTS), load_file(reference / ADAPTER_WEIGHTS)
    assert {k: (v.shape, v.dtype) for k, v in saved.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
    assert relative_difference(expected, saved) < 1e-5
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-6)
    assert json.loads((run_dir / "adapter_config.json").read_text()) == json.loads((reference / "adapter_config.json").read_text())
    # One writer: every step logged once, one line per step on stdout.
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert sum(line.startswith("step 1/") for line in result.stdout.splitlines()) == 1


def zero3_partitioning_everything(folder: Path) -> Path:
    """configs/deepspeed_zero3.yaml with a DeepSpeed config file that also partitions tensors of fewer
    than 100k values, which DeepSpeed otherwise leaves whole on every process
    (stage3_param_persistence_threshold): on a real model that spares the LoRA factors but not the
    base weights or larger adapter tensors (a classifier head, VeRA's shared projections); on the tiny
    test model it would spare everything, and gathering would go untested."""
    auto = {key: "auto" for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")}
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"}}
    (folder / "zero3.json").write_text(json.dumps({"zero_optimization": zero} | auto))
    shipped = (ROOT / "configs" / "deepspeed_zero3.yaml").read_text()
    assert "  zero_stage: 3\n" in shipped and "mixed_precision: 'no'" in shipped
    # A config file replaces the stage and offload keys; mixed precision is then the file's (lorafam's).
    keep = [line for line in shipped.splitlines() if not line.startswith(("  zero_stage", "  offload", "  zero3_save", "mixed_precision"))]
    text = "\n".join(keep).replace("deepspeed_config:", f"deepspeed_config:\n  deepspeed_config_file: {folder / 'zero3.json'}")
    (folder / "zero3.yaml").write_text(text + "\n")
    return folder / "zero3.yaml"


def skipped_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if r.get("skipped")]


def test_deepspeed_zero3_gathers_the_adapter_runs_variant_hooks_and_skips_nonfinite_steps(tmp_path, assets):
    accum = 2  # 2 processes x batch 2 x grad_accum 2 against 1 process x batch 8
    runs = {  # name: (variant, adapter keys, train keys, step whose loss is made NaN)
        "dora": ("dora", {}, {}, None),
        "vera": ("vera", {}, {}, None),
        "delta_lora": ("delta_lora", {"start_step": 1}, {}, None),  # copies A and B after every step
        "nan_loss": ("lora", {}, {"on_nan": "skip"}, 3),  # DeepSpeed must drop what it accumulated
        "nan_grads": ("lora", {}, {"on_nan": "skip", "lr": 1e30}, None),  # finite loss, NaN gradients from step 2
    }
    two, items = {}, []
    for name, (variant, adapter, train, nan_step) in runs.items():
        path = recipe(tmp_path, assets, f"{name}-two", 2, accum, variant=variant, save_every=None, **train)
        two[name] = with_changes(path, path, adapter=adapter)
        # A NaN loss (finite gradients) in the first micro-batch of that step, on every process.
        items.append(f"{two[name]}@{(nan_step - 1) * accum + 1}" if nan_step else str(two[name]))
    refused = [
        recipe(tmp_path, assets, "adalora-two", 2, accum, variant="adalora", save_every=None),
        recipe(tmp_path, assets, "saving-two", 2, accum),  # save_every: 2
    ]
    config = zero3_partitioning_everything(tmp_path)
    result = launch_deepspeed(config, tmp_path / "extensions", "--each", *items, *refused)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = " ".join(result.stdout.split())
    assert "engine: DeepSpeed ZeRO-3 on 2 process(es)" in stdout

    for name, (variant, adapter, train, nan_step) in runs.items():
        one_recipe = with_changes(two[name], tmp_path / f"{name}-one.yaml", train={"batch_size": 8, "grad_accum": 1})
        with nan_loss(nan_step):  # the worker's injection; here a step is one micro-batch
            one = train_in_process(one_recipe)
        run_dir = Path(load_recipe(two[name]).output_dir)
        saved, expected = load_file(run_dir / ADAPTER_WEIGHTS), load_file(one / ADAPTER_WEIGHTS)
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}, name  # whole
        assert relative_difference(expected, saved) < 1e-5, name
        assert skipped_steps(run_dir) == skipped_steps(one), name
    assert skipped_steps(tmp_path / "nan_loss-two") == [3]
    assert "step 3: loss is nan; optimizer step skipped (train.on_nan: skip)" in stdout
    assert skipped_steps(tmp_path / "nan_grads-two")[0] == 2
    assert "step 2: gradient norm is inf (DeepSpeed discarded this step's gradients); optimizer step skipped" in stdout
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "nan_grads-two" / ADAPTER_WEIGHTS).values())

    assert ("error: adapter.variant: adalora cannot train with sharded parameters (DeepSpeed ZeRO-3): its budget "
            "ranks every triplet") in result.stderr
    assert ("error: train.save_every: lorafam writes no checkpoints under DeepSpeed (DeepSpeed ZeRO-3), whose "
            "optimizer state is partitioned across the processes") in result.stderr
