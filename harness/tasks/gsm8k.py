"""GSM8K: grade-school math word problems, scored by the final number of a greedy answer.

Test: GSM8K's test split. Training: GSM8K's train split, or with `train_source: metamathqa`
MetaMathQA (GSM8K and MATH questions rewritten and answered by GPT-3.5; rows rewritten from a
validation question are dropped). Validation: a part of GSM8K's train split kept out of
training. Sizes are `n_train`, `n_validation`, `n_test`
(null: all), taken after a shuffle by the task's `seed`.

A worked GSM8K answer ends in "#### 72"; it is trained on as the reasoning (calculator
annotations "<<48/2=24>>" removed) followed by "The answer is 72." The metric
(harness/metrics/number_match) compares the final numbers of answer and generation.
"""

from __future__ import annotations

import re

from harness.errors import ConfigError
from harness.tasks import converted, load_split, shuffled, take

TRAIN_SOURCES = ("gsm8k", "metamathqa")
PROMPT = "Question: {question}\nAnswer:"
GSM8K_COLUMNS = ("question", "answer")
METAMATHQA_COLUMNS = ("query", "response", "original_question")


def worked_answer(answer: str) -> str:
    """GSM8K's answer text as the model is taught to write it."""
    reasoning, _, final = answer.partition("####")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return f" {reasoning}\nThe answer is {final.strip()}."


def from_gsm8k(example: dict) -> dict:
    return {"prompt": PROMPT.format(question=example["question"].strip()), "answer": worked_answer(example["answer"])}


def from_metamathqa(example: dict) -> dict:
    # Responses already end in "The answer is: 18".
    return {"prompt": PROMPT.format(question=example["query"].strip()), "answer": " " + example["response"].strip()}


def build(task_cfg: dict):
    import datasets

    source = task_cfg["train_source"]
    if source not in TRAIN_SOURCES:
        raise ConfigError(f"task.train_source={source!r}: allowed values are {', '.join(TRAIN_SOURCES)}")
    seed = task_cfg["seed"]
    gsm_train = shuffled(load_split(task_cfg["dataset"], "train", columns=GSM8K_COLUMNS), seed)
    n_val = task_cfg["n_validation"]
    validation = take(gsm_train, n_val, "task.n_validation")
    if source == "gsm8k":
        rest = gsm_train.select(range(n_val, len(gsm_train)))
        train, convert = take(rest, task_cfg["n_train"], "task.n_train"), from_gsm8k
    else:  # MetaMathQA rewrites GSM8K's train questions: drop those of the validation part
        held_out = {q.strip() for q in validation["question"]}
        meta = load_split(task_cfg["metamathqa"], "train", "task.metamathqa", columns=METAMATHQA_COLUMNS)
        meta = meta.filter(lambda row: row["original_question"].strip() not in held_out
                           and row["query"].strip() not in held_out)
        train = take(shuffled(meta, seed), task_cfg["n_train"], "task.n_train")
        convert = from_metamathqa
    test = take(shuffled(load_split(task_cfg["dataset"], "test", columns=GSM8K_COLUMNS), seed), task_cfg["n_test"],
                "task.n_test")
    return datasets.DatasetDict({"train": converted(train, convert), "validation": converted(validation, from_gsm8k),
                                 "test": converted(test, from_gsm8k)})
