"""SST-2: sentiment of movie-review sentences, scored by choice log-likelihood (accuracy).

Test: SST-2's validation split (the test split's labels are hidden). Validation: a part of
the train split kept out of training. Each example's `choices` are the task's `choices`
(label 0, label 1); the model is trained to write the right one after the prompt, and scored
by which choice it gives the higher log-likelihood.
"""

from __future__ import annotations

from harness.errors import ConfigError
from harness.tasks import converted, load_split, shuffled, take

COLUMNS = ("sentence", "label")
PROMPT = "Review: {sentence}\nSentiment:"


def build(task_cfg: dict):
    import datasets

    choices = list(task_cfg["choices"])
    if len(choices) != 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ConfigError(f"task.choices={choices!r}: give two non-empty strings, for label 0 and label 1")
    seed = task_cfg["seed"]
    train_all = shuffled(load_split(task_cfg["dataset"], "train", columns=COLUMNS), seed)
    n_val = task_cfg["n_validation"]
    validation = take(train_all, n_val, "task.n_validation")
    train = take(train_all.select(range(n_val, len(train_all))), task_cfg["n_train"], "task.n_train")
    test = take(shuffled(load_split(task_cfg["dataset"], "validation", columns=COLUMNS), seed), task_cfg["n_test"], "task.n_test")

    def convert(example):
        label = int(example["label"])
        return {"prompt": PROMPT.format(sentence=example["sentence"].strip()), "answer": choices[label],
                "choices": choices, "label": label}

    return datasets.DatasetDict({"train": converted(train, convert), "validation": converted(validation, convert),
                                 "test": converted(test, convert)})
