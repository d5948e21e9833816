"""`lorafam` under DeepSpeed on CPU processes, for tests/test_distributed.py.

The first time a DeepSpeed process group starts on a CPU, DeepSpeed compiles a shared-memory
all-reduce kernel (the ``deepspeed_shm_comm`` op): minutes of C++ on a CI machine, and a run killed
mid-compile leaves a lock file that hangs every later run. This test-only override tells DeepSpeed the
op cannot be built, so its collectives go through gloo, as they do on any platform without the op.
Nothing else is changed: the CLI runs as a user runs it.

    accelerate launch --config_file configs/deepspeed_zero2.yaml tests/deepspeed_worker.py train RECIPE
    accelerate launch --config_file configs/deepspeed_zero3.yaml tests/deepspeed_worker.py --each RECIPE[@N]...

``--each`` trains several recipes one after the other in the same processes, through lorafam.api as
the CLI does (it saves a launch per recipe); a refused recipe prints the CLI's error line and the next
one runs. ``RECIPE@N`` adds NaN to the loss of the N-th training micro-batch of that run, on every
process (see ``nan_loss``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from lorafam.tasks.causal_lm import CausalLMLoss


@contextmanager
def nan_loss(n: int | None) -> Iterator[None]:
    """The loss of the n-th training micro-batch is NaN and its gradients are not, so only lorafam's
    own check of the loss can keep DeepSpeed from applying that step (lorafam.trainer.optimizer_step)."""
    forward, calls = CausalLMLoss.forward, []

    def forward_with_nan(self, *args, **kwargs):  # noqa: ANN001, ANN202
        out = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == n:
                out["loss_sum"] = out["loss_sum"] + float("nan")  # d(x + c)/dx = 1: the gradient stays finite
        return out

    CausalLMLoss.forward = forward_with_nan
    try:
        yield
    finally:
        CausalLMLoss.forward = forward


def main() -> None:
    import deepspeed.ops
    import torch

    from lorafam import api
    from lorafam.cli import main as cli_main
    from lorafam.errors import LorafamError

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if sys.argv[1] != "--each":
        sys.argv[0] = "lorafam"
        cli_main()
        return
    torch.set_flush_denormal(True)  # as the CLI does
    for item in sys.argv[2:]:
        recipe, _, nan_at = item.partition("@")
        try:
            with nan_loss(int(nan_at) if nan_at else None):
                api.train(recipe, overwrite=True)
        except LorafamError as e:
            print(f"error: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
