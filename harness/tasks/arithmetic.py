"""A synthetic arithmetic task: `12+07=` -> `19`, generated deterministically from a seed.

All distinct problems `a op b` (0 <= a, b <= max_operand) are enumerated, shuffled with
`task.seed`, and cut into disjoint test, validation and train splits, so no test problem is
ever trained on. The training seed (`seed`) does not change the data.
"""

from __future__ import annotations

import operator
import random

from harness.errors import ConfigError

OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def build(task_cfg: dict):
    import datasets

    ops = task_cfg["operations"]
    bad = [op for op in ops if op not in OPERATIONS]
    if bad or not ops:
        raise ConfigError(
            f"task.operations={ops!r}: allowed characters are {''.join(OPERATIONS)}"
        )
    n = task_cfg["max_operand"] + 1
    problems = [(a, op, b) for op in ops for a in range(n) for b in range(n)]
    random.Random(task_cfg["seed"]).shuffle(problems)

    sizes = {s: task_cfg[f"n_{s}"] for s in ("test", "validation", "train")}
    if sum(sizes.values()) > len(problems):
        raise ConfigError(
            f"task arithmetic: n_train+n_validation+n_test={sum(sizes.values())} exceeds the "
            f"{len(problems)} distinct problems with max_operand={n - 1}, operations={ops!r}"
        )
    # Fixed width ("07+12=019") puts every digit at the same place in every example, which a
    # small model learns far faster than variable-width numbers.
    width = len(str(n - 1)) if task_cfg["fixed_width"] else 0
    result_width = max(len(str(abs(OPERATIONS[op](a, b)))) for a, op, b in problems) if width else 0

    def answer(a, op, b):
        value = OPERATIONS[op](a, b)
        return ("-" if value < 0 else "") + f"{abs(value):0{result_width}d}"

    splits, start = {}, 0
    for split, size in sizes.items():
        chunk = problems[start : start + size]
        start += size
        splits[split] = datasets.Dataset.from_dict(
            {
                "prompt": [f"{a:0{width}d}{op}{b:0{width}d}=" for a, op, b in chunk],
                "answer": [answer(a, op, b) for a, op, b in chunk],
            }
        )
    return datasets.DatasetDict(splits)
