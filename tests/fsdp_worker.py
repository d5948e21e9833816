"""`lorafam train` under Accelerate's FSDP2 engine on CPU processes, for tests/test_distributed.py.

Accelerate 1.15 enables FSDP only for accelerator devices: on a CPU-only machine its state keeps
plain data parallelism and drops the FSDP plugin. This test-only override marks the process group
as GPU-like *before* lorafam creates its Accelerator, so Accelerate takes the FSDP2 code path a GPU
run takes (fully_shard per decoder layer, DTensor parameters, sharded gradients and optimizer
state) on gloo CPU processes. Nothing else is changed: the CLI runs as a user runs it.

    accelerate launch --config_file configs/fsdp2.yaml tests/fsdp_worker.py train RECIPE [--resume]

With LORAFAM_TEST_SIGTERM_AFTER_STEP=N every process sends itself SIGTERM after optimizer step N,
as a launcher forwarding Ctrl-C would: the run must checkpoint (gathering the shards) and stop.
"""

from __future__ import annotations

import os
import signal
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

PartialState(cpu=True)
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU

import lorafam.trainer as trainer  # noqa: E402
from lorafam.cli import main  # noqa: E402

if "LORAFAM_TEST_SIGTERM_AFTER_STEP" in os.environ:
    stop_after, step_once = int(os.environ["LORAFAM_TEST_SIGTERM_AFTER_STEP"]), trainer.optimizer_step

    def optimizer_step(s, step, skip_nonfinite):  # noqa: ANN001, ANN202
        outcome = step_once(s, step, skip_nonfinite)
        if step == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return outcome

    trainer.optimizer_step = optimizer_step

if __name__ == "__main__":
    sys.argv[0] = "lorafam"
    main()
