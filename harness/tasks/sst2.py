"""SST-2: sentiment of movie-review sentences, scored by choice log-likelihood (accuracy).

Test: SST-2's validation split (the test split's labels are hidden). Validation: a part of
the train split kept out of training. Each example's `choices` are the task's `choices`
(label 0, label 1); the model is trained to write the right one after the prompt, and scored
by which choice it gives the higher log-likelihood.
"""

from __future__ import annotations

from harness.tasks import converted, labelled_splits, two_choices

COLUMNS = ("sentence", "label")
PROMPT = "Review: {sentence}\nSentiment:"


def build(task_cfg: dict):
    import datasets

    choices = two_choices(task_cfg, "for label 0 and label 1")
    train, validation, test = labelled_splits(task_cfg, COLUMNS)

    def convert(example):
        label = int(example["label"])
        return {"prompt": PROMPT.format(sentence=example["sentence"].strip()), "answer": choices[label],
                "choices": choices, "label": label}

    return datasets.DatasetDict({"train": converted(train, convert), "validation": converted(validation, convert),
                                 "test": converted(test, convert)})
