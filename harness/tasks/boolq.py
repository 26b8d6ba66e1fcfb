"""BoolQ: yes/no questions about a Wikipedia passage (Clark et al. 2019), scored by choice
log-likelihood (accuracy).

Test: BoolQ's validation split (the test split's labels are hidden). Validation: a part of the
train split kept out of training. The prompt is the passage, then the question; the choices
are the task's `choices` for false and true (" no", " yes": one token each, so one forward
pass scores both).
"""

from __future__ import annotations

from harness.tasks import converted, labelled_splits, two_choices

COLUMNS = ("question", "answer", "passage")
PROMPT = "{passage}\nQuestion: {question}?\nAnswer:"


def build(task_cfg: dict):
    import datasets

    choices = two_choices(task_cfg, "for false and for true")
    train, validation, test = labelled_splits(task_cfg, COLUMNS)

    def convert(example):
        label = int(bool(example["answer"]))
        return {"prompt": PROMPT.format(passage=example["passage"].strip(), question=example["question"].strip()),
                "answer": choices[label], "choices": choices, "label": label}

    return datasets.DatasetDict({"train": converted(train, convert), "validation": converted(validation, convert),
                                 "test": converted(test, convert)})
