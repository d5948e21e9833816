"""Run under a multi-process launcher by tests/test_distributed.py: train each recipe given on the
command line through lorafam's API, then let every process write what *it* holds of the variant
(adapter tensors, training state, decisions), so the test can check that all processes agree.

    accelerate launch --config_file configs/ddp.yaml --num_processes 2 tests/dist_worker.py OUT RECIPE...
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafam import api
from lorafam.adapters import VARIANTS, Variant
from lorafam.distributed import rank, world_size


def record_state_after_each_step(digests: list[str]) -> None:
    """After every optimizer step of any variant, a digest of its training state (AdaLoRA's
    sensitivity and uncertainty EMAs and masks, which the final adapter no longer holds)."""

    def recording(original):  # noqa: ANN001, ANN202
        @functools.wraps(original)
        def after_step(self, step, total):  # noqa: ANN001, ANN202
            logs = original(self, step, total)
            state = self.train_state()
            blob = b"".join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state))
            digests.append(f"{self.name}:{step}:{hashlib.sha256(blob).hexdigest()}:{len(state)}")
            return logs

        return after_step

    for cls in [Variant, *VARIANTS.values()]:
        if "after_step" in vars(cls):
            cls.after_step = recording(vars(cls)["after_step"])


def main() -> None:
    torch.set_flush_denormal(True)  # as the CLI does
    digests: list[str] = []
    record_state_after_each_step(digests)
    out, recipes = Path(sys.argv[1]), sys.argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        result = api.train(recipe, overwrite=True)
        variant = result.variant
        tensors = {f"adapter/{k}": v for k, v in variant.adapter_state_dict().items()}
        tensors |= {f"state/{k}": v for k, v in variant.train_state().items()}
        tensors |= {f"buffer/{name}": b for name, b in variant.model.named_buffers() if "base_layer" not in name}
        name = Path(recipe).stem
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, out / f"{name}-rank{rank()}.safetensors")
        facts = {"world_size": world_size(), "report": variant.report(), "prepare": result.info.prepare,
                 "state_after_each_step": digests[:]}
        digests.clear()
        (out / f"{name}-rank{rank()}.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
