"""`--resume` of a 2-process DDP run killed with SIGKILL, with grad_accum 2, and the one-line refusal
to resume it on another number of processes, all through `accelerate launch --config_file
configs/ddp.yaml` as the README tells users to run it.

The kill is SIGKILL to the launcher's whole process group (launcher, and the two workers it started):
what a scheduler or the OOM killer does to a job. SIGKILL to the launcher alone leaves its workers
running as orphans, which no launcher can prevent and no resume should race with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import transformers
from safetensors.torch import load_file
from test_distributed import ACCELERATE, ROOT, STEPS, free_port, launch, launch_env, recipe, train_data  # noqa: F401  (train_data: the chat pairs conftest's assets use here)
from test_resume import HELD_CLI, assert_same_adapter, comparable
from tinyrun import cli, read_metrics

from lorafam.run import ADAPTER_WEIGHTS

WAIT_S = 600


def start_held_launch(script, path, hold_step: int, hold, logs):
    """2 DDP processes running `lorafam train PATH`, rank 0 held after logging ``hold_step`` until
    HOLD/release exists (rank 1 then waits in the next step's all-reduce)."""
    hold.mkdir()
    command = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "configs" / "ddp.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(script), "train", str(path)]
    env = launch_env() | {"LORAFAM_TEST_HOLD_STEP": str(hold_step), "HOLD_DIR": str(hold)}
    return subprocess.Popen(command, stdout=logs.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


def test_ddp_run_killed_mid_way_resumes_with_grad_accum_bitwise_and_refuses_another_process_count(tmp_path, assets):
    straight = launch("-m", "lorafam", "train", recipe(tmp_path, assets, "straight", 2, 2))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    info = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 8  # 2 x grad_accum 2 x 2 processes really ran
    expected = load_file(tmp_path / "straight" / ADAPTER_WEIGHTS)
    expected_rows = comparable(read_metrics(tmp_path / "straight"))

    path, run_dir = recipe(tmp_path, assets, "killed", 2, 2), tmp_path / "killed"
    script, hold, logs = tmp_path / "held_lorafam.py", tmp_path / "hold", tmp_path / "killed.log"
    script.write_text(HELD_CLI)
    process = start_held_launch(script, path, 3, hold, logs)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (hold / "held").exists():
            assert process.poll() is None, f"launch exited ({process.returncode}) before step 3: {logs.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"step 3 not reached within {WAIT_S} s"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers, at once
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert not (run_dir / ADAPTER_WEIGHTS).exists()

    # One process may not continue a 2-process run: one line, nothing touched.
    transformers.utils.logging.disable_progress_bar()  # stderr: exactly what the CLI prints (as cli_env does)
    try:
        refused = cli("train", path, "--resume")
    finally:
        transformers.utils.logging.enable_progress_bar()
    assert refused.exit_code != 0
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in refused.stderr, refused.stderr
    assert lines[0] == (
        f"error: checkpoint {run_dir}/checkpoints/step-000002 was written on 2 process(es); this run has 1: "
        "resume it on 2 (accelerate launch --num_processes 2), or start over with --overwrite"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    assert json.loads((run_dir / "run.json").read_text())["processes"] == 2  # run.json as the killed run left it
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3]

    resumed = launch("-m", "lorafam", "train", path, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/step-000002 (step 2/{STEPS})" in " ".join(resumed.stdout.split())
    assert json.loads((run_dir / "run.json").read_text())["resumed_from"] == [2]
    assert_same_adapter(run_dir, expected)  # bitwise, not only to float rounding
    assert comparable(read_metrics(run_dir)) == expected_rows  # steps 3.. logged once, by the resumed run
