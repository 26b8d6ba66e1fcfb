"""ASDiv: math word problems of elementary school (Miao et al. 2020), scored by the number of a
greedy answer (number_match).

ASDiv has a single labelled split (the Hub's `validation`, 2,305 problems). Its problems whose
answer is a number (2,159; the others are names, yes/no, times or ratios, which a number cannot match)
are shuffled by the task's seed, then cut into test (`n_test`), validation (`n_validation`)
and train (`n_train` of the rest), so no problem is both trained on and scored.

The Hub writes the answer's unit in parentheses ("9 (apples)"); the model is taught to answer
"The answer is 9." (the marker number_match reads first, as for GSM8K).
"""

from __future__ import annotations

import re

from harness.tasks import converted, load_split, one_split_cut

COLUMNS = ("body", "question", "answer")
PROMPT = "{body}\nQuestion: {question}\nAnswer:"
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def number_of(answer: str) -> str | None:
    """The answer's number ("9 (apples)" -> "9"), or None when it is not a number."""
    value = answer.split(" (")[0].strip()
    return value if NUMBER.fullmatch(value) else None


def convert(example: dict) -> dict:
    return {"prompt": PROMPT.format(body=example["body"].strip(), question=example["question"].strip()),
            "answer": f" The answer is {number_of(example['answer'])}."}


def build(task_cfg: dict):
    import datasets

    rows = load_split(task_cfg["dataset"], "validation", columns=COLUMNS)
    train, validation, test = one_split_cut(rows.filter(lambda r: number_of(r["answer"]) is not None), task_cfg)
    return datasets.DatasetDict({split: converted(data, convert) for split, data in
                                 (("train", train), ("validation", validation), ("test", test))})
