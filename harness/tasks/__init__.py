"""Tasks: each task config names a builder module in this package that returns its splits.

A builder is a module `harness/tasks/<builder>.py` with `build(task_cfg) -> datasets.DatasetDict`
holding `train`, `validation` and `test` splits. Every example has a `prompt` and an `answer`
string: training is causal LM on prompt+answer with the loss on the answer only. How the
test split is scored is the task config's `scoring` (`generate`: greedy generation compared
with the answer by the task's `evaluate` metric).
"""

from __future__ import annotations

import importlib
import pkgutil

from harness.errors import ConfigError

SPLITS = ("train", "validation", "test")
SCORINGS = ("generate",)


def builders() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load_task(task_cfg: dict):
    builder = task_cfg["builder"]
    if builder not in builders():
        raise ConfigError(f"task.builder={builder!r} is unknown (allowed: {', '.join(builders())})")
    if task_cfg["scoring"] not in SCORINGS:
        raise ConfigError(
            f"task.scoring={task_cfg['scoring']!r} is unknown (allowed: {', '.join(SCORINGS)})"
        )
    splits = importlib.import_module(f"{__name__}.{builder}").build(task_cfg)
    for split in SPLITS:
        missing = {"prompt", "answer"} - set(splits[split].column_names)
        if missing:
            raise ConfigError(f"task {task_cfg['name']!r}: split {split!r} lacks columns {sorted(missing)}")
    return splits
