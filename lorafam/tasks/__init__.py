"""The task registry. Adding a task: one new file in this folder and one line here."""

from __future__ import annotations

from lorafam.tasks.base import LossOutput, Task
from lorafam.tasks.causal_lm import CausalLM
from lorafam.tasks.classification import SequenceClassification
from lorafam.tasks.preference import Preference

TASKS: dict[str, Task] = {task.name: task for task in [CausalLM(), SequenceClassification(), Preference()]}


def get_task(name: str) -> Task:
    """The registered task for a recipe's ``model.task`` (validated by the recipe schema)."""
    return TASKS[name]


__all__ = ["TASKS", "LossOutput", "Task", "get_task"]
