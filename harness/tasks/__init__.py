"""Tasks: each task config names a builder module in this package that returns its splits.

A builder is a module `harness/tasks/<builder>.py` with `build(task_cfg) -> datasets.DatasetDict`
holding `train`, `validation` and `test` splits. Every example has a `prompt` and an `answer`
string: training is causal LM on prompt+answer with the loss on the answer only. How the
test split is scored is the task config's `scoring`:

- `generate`: greedy generation, compared with `answer` by the task's `evaluate` metric;
- `choice`: each example also has `choices` (strings) and `label` (the right one's index,
  whose text is `answer`); the prediction is the choice of highest log-likelihood after the
  prompt, compared with `label` by the metric (accuracy);
- `none`: nothing is scored (task=lengths: examples that are only lengths, `length` and
  `token_seed` columns, whose token ids harness/data.py draws).

Builders of real datasets read them with `load_split` (a Hub id at a pinned revision, or a
local folder in the same file layout) and cut their sizes with `take`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from harness.errors import ConfigError

SPLITS = ("train", "validation", "test")
SCORINGS = ("generate", "choice", "none")
COLUMNS = {"generate": {"prompt", "answer"}, "choice": {"prompt", "answer", "choices", "label"},
           "none": {"length", "token_seed"}}


def builders() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load_task(task_cfg: dict):
    builder = task_cfg["builder"]
    if builder not in builders():
        raise ConfigError(f"task.builder={builder!r} is unknown (allowed: {', '.join(builders())})")
    if task_cfg["scoring"] not in SCORINGS:
        raise ConfigError(
            f"task.scoring={task_cfg['scoring']!r} is unknown (allowed: {', '.join(SCORINGS)})"
        )
    import datasets

    datasets.disable_progress_bars()  # the job logs what it loaded; a bar per map is noise
    splits = importlib.import_module(f"{__name__}.{builder}").build(task_cfg)
    for split in SPLITS:
        missing = COLUMNS[task_cfg["scoring"]] - set(splits[split].column_names)
        if missing:
            raise ConfigError(f"task {task_cfg['name']!r}: split {split!r} lacks columns {sorted(missing)}")
    return splits


def check_local_folder(source: dict, key: str) -> bool:
    """True if `source["path"]` names a local folder (False: a Hub id); a ConfigError naming
    `key` if that folder does not exist."""
    from harness.models import is_local_path

    path = str(source.get("path") or "")
    local = bool(path) and is_local_path(path)
    if local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"{key}.path={path!r}: no such folder (a local copy of the dataset, or a Hub id)")
    return local


def converted(dataset, convert):
    """`dataset` as task examples: `convert` maps a row to the task's columns, which replace
    the dataset's own."""
    return dataset.map(convert, remove_columns=dataset.column_names)


def load_split(source: dict, split: str, key: str = "task.dataset", columns=()):
    """One split of a dataset through `datasets.load_dataset`: `source` has `path` (a Hub id,
    read at `revision`, or a local folder holding the same files, e.g. a `snapshot_download`)
    and `name` (the Hub config, or null). A source that cannot be read, or lacks one of
    `columns`, is a ConfigError."""
    import datasets

    path = str(source["path"])
    local = check_local_folder(source, key)
    kwargs = {"cache_dir": local_cache_dir(Path(path).expanduser())} if local else {"revision": source.get("revision")}
    try:
        if source.get("data_files"):  # one file of a large dataset (a shard), not all of it
            kwargs["data_files"] = {split: source["data_files"]}
        dataset = datasets.load_dataset(str(Path(path).expanduser()) if local else path, source.get("name"),
                                        split=split, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if local else f" at revision {source.get('revision')}"
        raise ConfigError(f"{key}: cannot read split {split!r} of {path!r}{where} "
                          f"(name={source.get('name')!r}): {first}")
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"{key}: split {split!r} of {path!r} lacks the columns {missing} "
                          f"(it has {dataset.column_names})")
    return dataset


def local_cache_dir(folder: Path) -> str:
    """A `datasets` cache folder of its own for a local dataset folder, named by its files'
    paths, sizes and times: `datasets` keys a local folder whose README lists its configs by
    the folder's name and those patterns only, so two copies named alike (or one copy changed
    in place) would share a stale cache."""
    import hashlib

    import datasets

    files = sorted(p for p in folder.resolve().rglob("*") if p.is_file())
    stamp = "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in files)
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "harness-local" / digest)


def take(dataset, n: int | None, key: str):
    """The first `n` examples (all for null), or a ConfigError naming `key` if there are fewer."""
    if n is None:
        return dataset
    if n > len(dataset):
        raise ConfigError(f"{key}={n} exceeds the {len(dataset)} examples available (null takes all)")
    return dataset.select(range(n))


def labelled_splits(task_cfg: dict, columns, test_split: str = "validation"):
    """(train, validation, test) of a dataset whose test labels are hidden: validation is the
    first `n_validation` of the shuffled train split, train the next `n_train`, test the first
    `n_test` of the shuffled labelled `test_split`."""
    seed = task_cfg["seed"]
    train_all = shuffled(load_split(task_cfg["dataset"], "train", columns=columns), seed)
    n_val = task_cfg["n_validation"]
    validation = take(train_all, n_val, "task.n_validation")
    train = take(train_all.select(range(n_val, len(train_all))), task_cfg["n_train"], "task.n_train")
    test = take(shuffled(load_split(task_cfg["dataset"], test_split, columns=columns), seed),
                task_cfg["n_test"], "task.n_test")
    return train, validation, test


def one_split_cut(rows, task_cfg: dict):
    """(train, validation, test) of a dataset with a single split: `rows` shuffled by the task's
    seed, then its first `n_test`, the next `n_validation` and `n_train` of the rest, disjoint."""
    if task_cfg["n_test"] is None:
        raise ConfigError(f"task.n_test=null: {task_cfg['name']} has one split to cut test, validation and train "
                          "from; give n_test a number")
    rows = shuffled(rows, task_cfg["seed"])
    n_test, n_val = task_cfg["n_test"], task_cfg["n_validation"]
    test = take(rows, n_test, "task.n_test")
    validation = take(rows.select(range(n_test, len(rows))), n_val, "task.n_validation")
    train = take(rows.select(range(n_test + n_val, len(rows))), task_cfg["n_train"], "task.n_train")
    return train, validation, test


def two_choices(task_cfg: dict, meaning: str) -> list[str]:
    """The task's two `choices` (label 0, label 1), or a ConfigError saying what they mean."""
    choices = list(task_cfg["choices"] or [])
    if len(choices) != 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ConfigError(f"task.choices={task_cfg['choices']!r}: give two non-empty strings, {meaning}")
    return choices


def shuffled(dataset, seed: int):
    """`dataset` in an order fixed by the task's data seed (not the training seed)."""
    return dataset.shuffle(seed=seed)


def general_texts(forgetting_cfg: dict) -> list[str]:
    """The general text (outside the task) the forgetting metric scores: lines of a dataset (e.g.
    WikiText) with at least `min_words` words, or for `source: synthetic` lines of the tiny
    models' pretraining corpus (harness/pretrain.py) drawn with another seed; `n_texts` of them."""
    n = forgetting_cfg["n_texts"]
    if forgetting_cfg["source"] == "synthetic":
        from harness.pretrain import corpus

        return corpus(n, forgetting_cfg["seed"], forgetting_cfg["max_operand"], forgetting_cfg["held_out_below"])
    if forgetting_cfg["source"] != "dataset":
        raise ConfigError(f"forgetting.source={forgetting_cfg['source']!r}: allowed values are dataset, synthetic")
    source = forgetting_cfg["dataset"]
    column = forgetting_cfg["text_column"]
    rows = load_split(source, source["split"], "forgetting.dataset", columns=(column,))[column]
    texts = [t.strip() for t in rows if len(t.split()) >= forgetting_cfg["min_words"]][:n]
    if not texts:
        raise ConfigError(f"forgetting.dataset: no text of {forgetting_cfg['min_words']}+ words in column "
                          f"{forgetting_cfg['text_column']!r}")
    return texts
