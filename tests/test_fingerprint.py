"""What every recipe trains, pinned: restructuring the code must not move a single float.

Recorded once from the code as it was before the run was reshaped into objects (issue 18), with
`python tests/test_fingerprint.py record`, into tests/fingerprints/: for every registered variant on
the tiny Llama of tinyrun.py (chat data, dropout on where the variant takes it, fp32),

* ``<variant>``: one process, batch_size 2 x grad_accum 2;
* ``<variant>-2p``: two DDP processes (`accelerate launch`, configs/ddp.yaml), batch_size 1 x
  grad_accum 2 each (the same global batch of 4);
* ``<variant>-resumed`` (lora, adalora, lora_drop): the one-process run SIGKILLed after step 5 and
  resumed from its step-4 checkpoint.

Each case keeps the adapter file's sha256 and tensors, the metrics rows (without timings) and run.json's
values (without timings and memory). On the machine and torch build it was recorded with (the
`machine` entry) a case must match bitwise; elsewhere other kernels round differently, and the
tensors must agree to 1e-4 relative and the losses to 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import platform
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import launch
from test_resume import start_held_train, wait_for  # noqa: F401  (start_held_train: a fixture)
from tinyrun import adapter_section, cli, make_chat_data, make_model_folder, read_metrics, write_recipe

from lorafam.adapters import VARIANTS

HERE = Path(__file__).parent
RECORD = HERE / "fingerprints"
#: Variants resumed after a SIGKILL: plain LoRA, one with state carried across steps (AdaLoRA's
#: score EMAs and masks) and one with a prepare phase recorded in run.json (LoRA-drop).
RESUMED = ("lora", "adalora", "lora_drop")
#: LoRA-drop at a threshold that makes it share a pair (at its default all four layers keep their own).
ADAPTER_KEYS = {"lora_drop": {"threshold": 0.5}}
#: run.json keys that vary from run to run by nature.
UNSTABLE_INFO = {"seconds", "peak_memory", "resumed_from"}
UNSTABLE_ROW = {"tokens_per_s", "step_seconds"}


def machine() -> dict[str, str]:
    """What decides the bits of an fp32 run on one thread: the CPU's vector units and torch's build."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma")
                flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu_flags": flags,
            "python": platform.python_version()}


def write_assets(root: Path) -> tuple[Path, Path]:
    return make_model_folder(root / "model"), write_data(root)


def write_data(root: Path) -> Path:
    return make_chat_data(root / "chat.jsonl", rows=40)


def recipe(folder: Path, assets: tuple[Path, Path], variant: str, batch: int, accum: int, name: str) -> Path:
    model, data = assets
    train = {"batch_size": batch, "grad_accum": accum, "mixed_precision": "no", "save_every": 2}
    return write_recipe(folder / f"{name}.yaml", model, data, folder / name, adapter=adapter_section(variant) | ADAPTER_KEYS.get(variant, {}), train=train)


def fingerprint(run_dir: Path) -> dict[str, Any]:
    weights = run_dir / "adapter_model.safetensors"
    info = json.loads((run_dir / "run.json").read_text())
    return {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "rows": [{k: v for k, v in row.items() if k not in UNSTABLE_ROW} for row in read_metrics(run_dir)],
        "info": {k: v for k, v in info.items() if k not in UNSTABLE_INFO},
    }


def train_one_process(folder: Path, assets, variant: str) -> Path:
    path = recipe(folder, assets, variant, 2, 2, variant)
    result = cli("train", path)
    assert result.exit_code == 0, result.output + result.stderr
    return folder / variant


def train_two_processes(folder: Path, assets) -> dict[str, Path]:
    paths = [recipe(folder, assets, v, 1, 2, f"{v}-2p") for v in VARIANTS]
    result = launch(HERE / "dist_worker.py", folder / "ranks", *paths)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = {f"{v}-2p": folder / f"{v}-2p" for v in VARIANTS}
    for run_dir in runs.values():
        assert json.loads((run_dir / "run.json").read_text())["processes"] == 2  # two processes really ran
    return runs


def train_resumed(folder: Path, assets, variant: str, start) -> Path:  # noqa: ANN001
    path = recipe(folder, assets, variant, 2, 2, f"{variant}-resumed")
    run_dir, hold = folder / f"{variant}-resumed", folder / f"hold-{variant}"
    process = start(path, 5, hold)
    wait_for(process, hold / "held")
    process.kill()
    assert process.wait() == -signal.SIGKILL
    result = cli("train", path, "--resume")
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == [4]
    return run_dir


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))


def assert_matches(case: str, run_dir: Path) -> None:
    recorded = json.loads((RECORD / "fingerprints.json").read_text())
    expected, got = recorded["cases"][case], fingerprint(run_dir)
    if recorded["machine"] == machine():  # the same arithmetic: the same bits
        assert got["sha256"] == expected["sha256"], f"{case}: the adapter differs from the recorded one"
        assert got["rows"] == expected["rows"], f"{case}: metrics differ from the recorded ones"
        assert got["info"] == expected["info"], f"{case}: run.json differs from the recorded one"
        return
    tensors, reference = load_file(run_dir / "adapter_model.safetensors"), load_file(RECORD / f"{case}.safetensors")
    assert tensors.keys() == reference.keys()
    for key in reference:
        assert relative_difference(reference[key], tensors[key]) < 1e-4, f"{case}: {key}"
    assert [r.keys() for r in got["rows"]] == [r.keys() for r in expected["rows"]]
    for got_row, row in zip(got["rows"], expected["rows"]):
        for key, value in row.items():  # losses, eval losses, lr, the variant's logs; counts exactly
            close = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            assert got_row[key] == close, f"{case}: step {row.get('step')} {key}"
    assert got["info"].keys() == expected["info"].keys()


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """conftest's ``assets`` train on the recorded chat data here."""
    return write_data(tmp_path_factory.mktemp("fingerprint"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_process_with_grad_accum_trains_the_recorded_adapter(variant, tmp_path, assets):
    assert_matches(variant, train_one_process(tmp_path, assets, variant))


def test_two_processes_train_the_recorded_adapters(tmp_path, assets):
    for case, run_dir in train_two_processes(tmp_path, assets).items():
        assert_matches(case, run_dir)


@pytest.mark.parametrize("variant", RESUMED)
def test_a_run_killed_and_resumed_trains_the_recorded_adapter(variant, tmp_path, assets, start_held_train):
    run_dir = train_resumed(tmp_path, assets, variant, start_held_train)
    assert_matches(f"{variant}-resumed", run_dir)
    # Resuming changes nothing: the same bits as the uninterrupted run (recorded on this machine;
    # elsewhere tests/test_resume.py compares the two runs of that machine).
    recorded = json.loads((RECORD / "fingerprints.json").read_text())
    if recorded["machine"] == machine():
        assert fingerprint(run_dir)["sha256"] == recorded["cases"][variant]["sha256"]


def record() -> None:
    """Train every case with the code as it is and write tests/fingerprints/."""
    import subprocess
    import tempfile

    from test_resume import HELD_CLI
    from tinyrun import cli_env

    torch.set_num_threads(1)  # as conftest's one_thread fixture does in the tests
    torch.set_flush_denormal(True)

    def start(path: Path, step: int, hold: Path) -> subprocess.Popen:
        hold.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([sys.executable, "-c", HELD_CLI, "train", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=cli_env() | {"LORAFAM_TEST_HOLD_STEP": str(step), "HOLD_DIR": str(hold)})

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        assets = write_assets(folder / "assets")
        runs = {v: train_one_process(folder, assets, v) for v in VARIANTS}
        runs |= train_two_processes(folder, assets)
        runs |= {f"{v}-resumed": train_resumed(folder, assets, v, start) for v in RESUMED}
        RECORD.mkdir(exist_ok=True)
        cases = {}
        for case, run_dir in runs.items():
            cases[case] = fingerprint(run_dir)
            save_file(load_file(run_dir / "adapter_model.safetensors"), RECORD / f"{case}.safetensors")
        (RECORD / "fingerprints.json").write_text(json.dumps({"machine": machine(), "cases": cases}, indent=1) + "\n")
        print(f"recorded {len(cases)} cases in {RECORD}")


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/test_fingerprint.py record")
    sys.path.insert(0, str(HERE))
    record()
