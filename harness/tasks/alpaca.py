"""Alpaca: follow an instruction (with an optional input), scored by ROUGE-L of the greedy
answer against the reference output (harness/metrics/rouge_l).

The dataset has a train split only: test, validation and train are disjoint parts of it
(`n_test`, `n_validation`, `n_train`, taken in that order after a shuffle by `seed`).
Prompts use the Alpaca template's sections, without its preamble.
"""

from __future__ import annotations

from harness.tasks import converted, load_split, one_split_cut

COLUMNS = ("instruction", "input", "output")
WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
WITHOUT_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def convert(example: dict) -> dict:
    template = WITH_INPUT if example["input"].strip() else WITHOUT_INPUT
    prompt = template.format(instruction=example["instruction"].strip(), input=example["input"].strip())
    return {"prompt": prompt, "answer": example["output"].strip()}


def build(task_cfg: dict):
    import datasets

    train, validation, test = one_split_cut(load_split(task_cfg["dataset"], "train", columns=COLUMNS), task_cfg)
    return datasets.DatasetDict({"train": converted(train, convert), "validation": converted(validation, convert),
                                 "test": converted(test, convert)})
