"""Experiment trackers (``train.report_to``) through Accelerate's tracker integrations.

A run reports to the trackers the recipe names what it writes to metrics.jsonl (loss, lr, tokens/s,
the variant's terms, eval metrics; one call per row, at the row's step), the resolved recipe as the
run's configuration, and the variant's plots (AdaLoRA's rank map, ...) as images where the tracker
takes images. metrics.jsonl is written whatever trackers are chosen. Logs of trackers that write
files (TensorBoard, ...) go to ``RUN_DIR/trackers/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafam.errors import LorafamError

#: Names ``train.report_to`` takes: Accelerate's trackers (accelerate.utils.LoggerType).
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
#: The package each tracker needs, for the error a missing one gets.
PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}


def check_installed(names: list[str]) -> None:
    """One clear error for a named tracker whose package is not installed (Accelerate only warns)."""
    from accelerate.tracking import _available_trackers

    available = {str(t) for t in _available_trackers}
    missing = [n for n in names if n not in available]
    if missing:
        packages = " ".join(PACKAGES.get(n, n) for n in missing)
        raise LorafamError(
            f"train.report_to: {', '.join(missing)} is not installed; pip install {packages}, or remove it from train.report_to"
        )


def flat_config(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The recipe as one level of ``section.key`` entries with scalar values, as every tracker's
    configuration accepts (TensorBoard's hyperparameters refuse lists and None)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_config(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class Trackers:
    """The trackers of one run. A no-op without any (the default)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict[str, Any], mixed_precision: str):
        self.accelerator = None
        if not names:
            return
        check_installed(names)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        from lorafam.hardware import process_group

        cpu, _ = process_group()
        # Accelerate refuses a second Accelerator with another precision in one process: an earlier
        # run's (the Python API, a notebook, a test process) is dropped, as the training's own
        # Engine does (the process group is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        # The same precision and device as the training's own Accelerator: they share one state.
        self.accelerator = Accelerator(
            log_with=list(names), project_dir=str(run_dir / "trackers"), mixed_precision=mixed_precision, cpu=cpu
        )
        self.accelerator.init_trackers(run_dir.name, config=flat_config(config))

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (its ``step`` is the x axis)."""
        if self.accelerator is None:
            return
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "phase" in row:  # a variant's preparatory run: its own series
            values = {f"{row['phase']}/{k}": v for k, v in values.items()}
        if values:
            self.accelerator.log(values, step=int(row["step"]))

    def log_images(self, paths: list[Path], step: int) -> None:
        """PNG plots, to every tracker that takes images."""
        if self.accelerator is None or not paths:
            return
        import numpy as np
        from matplotlib.image import imread

        images = {Path(p).stem: (imread(p)[..., :3] * 255).astype(np.uint8) for p in paths if Path(p).suffix == ".png"}
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images(images, step=step)

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
