"""PIQA: physical commonsense (Bisk et al. 2020): which of two solutions reaches a goal, scored
by choice log-likelihood (accuracy). Used as a capability check (`capability=piqa`): the base
model's accuracy before and after fine-tuning on another task.

Test: PIQA's validation split (the test split's labels are hidden), shuffled by the task's
seed; `n_test` of it. Train and validation are empty: PIQA is scored, not trained on, here.
"""

from __future__ import annotations

from harness.tasks import converted, load_split, shuffled, take

COLUMNS = ("goal", "sol1", "sol2", "label")
PROMPT = "Goal: {goal}\nSolution:"


def build(task_cfg: dict):
    import datasets

    test = take(shuffled(load_split(task_cfg["dataset"], "validation", columns=COLUMNS), task_cfg["seed"]),
                task_cfg["n_test"], "capability.n_test")

    def convert(example):
        choices = [" " + example["sol1"].strip(), " " + example["sol2"].strip()]
        label = int(example["label"])
        return {"prompt": PROMPT.format(goal=example["goal"].strip()), "answer": choices[label],
                "choices": choices, "label": label}

    test = converted(test, convert)
    return datasets.DatasetDict({"train": test.select([]), "validation": test.select([]), "test": test})
