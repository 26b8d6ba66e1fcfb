"""Small local copies of the real tasks' Hub datasets, in the Hub's own file layout.

Each function writes, under `root`, the files a `snapshot_download` of the dataset would
hold (parquet or JSON under the same folder and file names, and the README's `configs:`
block where the Hub repository has one), with a few made-up rows in the real columns. The
harness reads them with the same `datasets.load_dataset` call it uses for the Hub id.
"""

from __future__ import annotations

import json
import random
from pathlib import Path


def _parquet(path: Path, rows: list[dict]) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def _readme(root: Path, configs: str) -> None:
    (root / "README.md").write_text(f"---\nconfigs:\n{configs}---\n\n# Local test copy\n")


def _word_problem(rng: random.Random) -> dict:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    total = a + b
    return {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
            "answer": f"Tom has {a} + {b} = <<{a}+{b}={total}>>{total} apples.\n#### {total}"}


def gsm8k(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """openai/gsm8k: main/{train,test}-00000-of-00001.parquet, columns question, answer."""
    rng = random.Random(0)
    for config in ("main", "socratic"):
        _parquet(root / config / "train-00000-of-00001.parquet", [_word_problem(rng) for _ in range(n_train)])
        _parquet(root / config / "test-00000-of-00001.parquet", [_word_problem(rng) for _ in range(n_test)])
    _readme(root, "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train-*\n"
        f"  - split: test\n    path: {c}/test-*\n" for c in ("main", "socratic")))
    return root


def metamathqa(root: Path, gsm8k_root: Path) -> Path:
    """meta-math/MetaMathQA: one MetaMathQA-395K.json at the root (a JSON list of records),
    here rewrites of every question of the local GSM8K copy's train split, as MetaMathQA
    rewrites GSM8K's."""
    import datasets

    rows = []
    for p in datasets.Dataset.from_parquet(str(gsm8k_root / "main" / "train-00000-of-00001.parquet")):
        total = p["answer"].rsplit("#### ", 1)[1]
        rows.append({"type": "GSM_Rephrased", "query": p["question"].replace("Tom", "Tim"),
                     "original_question": p["question"], "response": f"Tim has {total} apples.\nThe answer is: {total}"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "MetaMathQA-395K.json").write_text(json.dumps(rows))
    return root


GOOD = ["a wonderful , moving film", "brilliant and funny", "a delight from start to finish", "warm , witty and wise"]
BAD = ["a dull , lifeless mess", "painfully boring", "the worst script in years", "tedious and flat"]


def sst2(root: Path, n_train: int = 60, n_validation: int = 16, n_test: int = 8) -> Path:
    """stanfordnlp/sst2: data/{train,validation,test}-00000-of-00001.parquet, columns idx,
    sentence, label (test labels hidden as -1)."""
    rng = random.Random(2)

    def rows(n, hidden=False):
        out = []
        for i in range(n):
            label = rng.randint(0, 1)
            out.append({"idx": i, "sentence": f"{rng.choice(GOOD if label else BAD)} ( take {i} ) ",
                        "label": -1 if hidden else label})
        return out

    for split, n in (("train", n_train), ("validation", n_validation)):
        _parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows(n))
    _parquet(root / "data" / "test-00000-of-00001.parquet", rows(n_test, hidden=True))
    _readme(root, "- config_name: default\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train", "validation", "test")))
    return root


def alpaca(root: Path, n: int = 60) -> Path:
    """tatsu-lab/alpaca: data/train-00000-of-00001-a09b74b3ef9c3b56.parquet, columns
    instruction, input, output, text."""
    rng = random.Random(3)
    rows = []
    for i in range(n):
        word = rng.choice(["cat", "river", "model", "garden", "number"])
        if rng.random() < 0.5:
            rows.append({"instruction": f"Write a short sentence about a {word} number {i}.", "input": "",
                         "output": f"The {word} is here today."})
        else:
            rows.append({"instruction": "Repeat the input.", "input": f"the {word} {i}", "output": f"the {word} {i}"})
    for r in rows:
        r["text"] = f"### Instruction:\n{r['instruction']}\n\n### Response:\n{r['output']}"
    _parquet(root / "data" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet", rows)
    return root


def wikitext(root: Path, n: int = 30) -> Path:
    """Salesforce/wikitext, config wikitext-2-raw-v1: wikitext-2-raw-v1/{train,validation,test}
    -00000-of-00001.parquet, column text (with WikiText's empty lines and headings)."""
    rng = random.Random(4)
    words = "the river city was built in a year by people who lived near the old bridge and market".split()
    config = "wikitext-2-raw-v1"
    for split in ("train", "validation", "test"):
        rows = []
        for i in range(n):
            rows += [{"text": ""}, {"text": f" = Heading {i} = \n"},
                     {"text": " " + " ".join(rng.choice(words) for _ in range(rng.randint(25, 50))) + " . \n"}]
        _parquet(root / config / f"{split}-00000-of-00001.parquet", rows)
    _readme(root, f"- config_name: {config}\n  data_files:\n" + "".join(
        f"  - split: {s}\n    path: {config}/{s}-*\n" for s in ("test", "train", "validation")))
    return root
