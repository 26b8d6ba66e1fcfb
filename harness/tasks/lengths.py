"""task=lengths: examples of set lengths in tokens, of random token ids, for memory and speed at
realistic lengths (a batch of 2 x 2048 holds 4,096 tokens, as torchtune's packed rows do).
Every example is `task.seq_len` tokens, or its length is drawn from `task.lengths` with the
task's seed; the token ids are drawn when the examples are tokenized (harness/data.py), from the
model's own vocabulary, and every token carries the loss. Nothing is scored (`scoring: none`)."""

from __future__ import annotations

import random

from harness.errors import ConfigError


def build(task_cfg: dict):
    import datasets

    lengths = task_cfg.get("lengths")
    if lengths is not None and (not lengths or any(not isinstance(n, int) or n < 2 for n in lengths)):
        raise ConfigError(f"task.lengths={lengths!r}: a list of lengths in tokens, each 2 or more (or null: "
                          "every example task.seq_len tokens)")
    if task_cfg["seq_len"] is None or (lengths and max(lengths) > task_cfg["seq_len"]):
        raise ConfigError(f"task.seq_len={task_cfg['seq_len']!r}: task=lengths needs it, at least the longest of "
                          "task.lengths")
    rng = random.Random(task_cfg["seed"])

    def split(n: int, offset: int):
        drawn = [rng.choice(lengths) if lengths else task_cfg["seq_len"] for _ in range(n)]
        return datasets.Dataset.from_dict({"prompt": [""] * n, "answer": [""] * n, "length": drawn,
                                           "token_seed": [task_cfg["seed"] * 1_000_003 + offset + i for i in range(n)]})

    return datasets.DatasetDict({"train": split(task_cfg["n_train"], 0),
                                 "validation": split(task_cfg.get("n_validation") or 0, 10**6),
                                 "test": split(task_cfg.get("n_test") or 0, 2 * 10**6)})
