"""Learning-rate schedules: the multipliers transformers' get_scheduler defines, step for step."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from lorafam.optim import make_scheduler
from lorafam.recipe import TrainConfig

HF_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@pytest.mark.parametrize("schedule", sorted(HF_NAMES))
@pytest.mark.parametrize(("total", "warmup"), [(12, 0), (12, 3), (120, 10), (5, 5)])
def test_schedule_equals_transformers(schedule, total, warmup):
    cfg = TrainConfig(schedule=schedule, warmup_steps=warmup, max_steps=total)
    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5) for _ in range(2))
    ours_schedule = make_scheduler(ours, cfg, total)
    theirs_schedule = get_scheduler(HF_NAMES[schedule], theirs, num_warmup_steps=warmup, num_training_steps=total)
    seen = []
    for _ in range(total + 2):
        seen.append((ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]))
        for optimizer, scheduler in ((ours, ours_schedule), (theirs, theirs_schedule)):
            optimizer.step()
            scheduler.step()
    assert [a for a, _ in seen] == pytest.approx([b for _, b in seen], abs=1e-12)
    if warmup or schedule != "constant":
        assert len({a for a, _ in seen}) > 1  # the schedule moved: warmup or decay happened
