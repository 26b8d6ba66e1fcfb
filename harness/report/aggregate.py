"""Collect every `result.json` of one or more sweep folders into one flat table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from harness.results import result_files

log = logging.getLogger("harness.report")

KEYS = ["model", "method", "task", "seed", "status", "error", "job_dir"]
# Columns the report reads; present (maybe empty) even when no result carries them.
EXPECTED = KEYS + [
    "metrics.score", "metrics.score_before", "metrics.peak_memory_mb", "metrics.memory_source",
    "metrics.predicted_peak_memory_mb", "metrics.memory_phase",
    "metrics.tokens_per_s", "metrics.trainable_params", "metrics.total_params",
    "metrics.wall_setup_s", "metrics.wall_train_s", "metrics.wall_eval_s", "metrics.wall_total_s",
    "config.sweep_name", "config.model.name_or_path", "env.start_time", "env.end_time",
]
LISTS = ["metrics.train_losses", "metrics.score_samples"]  # kept in the frame, not in the CSV
# Mappings with a key per module: one JSON cell each, not a column per key
WHOLE = ["metrics.adalora_final_ranks", "metrics.eva_rank_pattern"]


READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # 2 added config_hash and status "cancelled"; 3 predicted memory; 4 forgetting;
# 5 CPU peak memory as malloc in use; 6 per-example outcomes; 7 peak memory of the training phase;
# 8 jobs across ranks; 9 CUDA paged memory and NVML errors


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("skipping unreadable %s: %s", path, e)
        return None
    if not isinstance(data, dict) or not {"model", "method", "status"} <= data.keys():
        log.warning("skipping %s: not a result file", path)
        return None
    if data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        log.warning("skipping %s: schema_version %r (this harness reads %s)", path,
                    data.get("schema_version"), ", ".join(map(str, READABLE_SCHEMA_VERSIONS)))
        return None
    return data


def collect(dirs: list[Path]) -> pd.DataFrame:
    """One row per readable result file under any of `dirs`, nested keys flattened with '.'."""
    records = []
    for folder in dirs:
        for path in result_files(folder):
            data = _read(path)
            if data is not None:
                metrics = data.get("metrics") or {}
                if metrics.get("score_meaningful") is False:  # random weights: never compared
                    metrics["score"] = metrics["score_before"] = None
                lists = {key: metrics.pop(key.split(".", 1)[1], None) for key in LISTS}
                whole = {key: metrics.pop(key.split(".", 1)[1]) for key in WHOLE if key.split(".", 1)[1] in metrics}
                flat = pd.json_normalize(data).iloc[0].to_dict()
                records.append({**flat, **lists, **whole, "job_dir": str(path.parent)})
    df = pd.DataFrame.from_records(records)
    for column in EXPECTED + LISTS:
        if column not in df.columns:
            df[column] = None
    return sort_rows(df)


OUTCOME_COLUMNS = ["job", "model", "method", "seed", "split", "stage", "example_id", "score"]


def collect_outcomes(df: pd.DataFrame) -> pd.DataFrame:
    """Every job's per-example outcomes (its `outcomes` file, schema 6), in long form: one row
    per job, split, stage (before/after training) and example, columns `OUTCOME_COLUMNS` (`job`
    is the job folder, as in results.csv). Jobs without the file (older results, failed jobs)
    have no rows; an unreadable file is skipped with a warning."""
    frames = []
    files = df["outcomes.file"] if "outcomes.file" in df else pd.Series(None, index=df.index)
    for row, name in zip(df.itertuples(index=False), files):
        if not isinstance(name, str):
            continue
        path = Path(row.job_dir) / name
        try:
            with open(path, encoding="utf-8") as f:
                records = [json.loads(line) for line in f if line.strip()]
            table = pd.DataFrame.from_records(records, columns=["split", "stage", "example_id", "score"])
        except (OSError, UnicodeDecodeError, ValueError) as e:
            log.warning("skipping the per-example outcomes %s: %s", path, e)
            continue
        table["example_id"] = table["example_id"].astype(str)
        table.insert(0, "job", row.job_dir)
        table.insert(1, "model", row.model)
        table.insert(2, "method", row.method)
        table.insert(3, "seed", row.seed)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=OUTCOME_COLUMNS)
    return pd.concat(frames, ignore_index=True)[OUTCOME_COLUMNS]


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by model, method, seed, job folder; key columns first, then the rest by name."""
    columns = KEYS + sorted(c for c in df.columns if c not in KEYS)
    return df.sort_values(["model", "method", "seed", "job_dir"], kind="stable")[columns] \
        .reset_index(drop=True)


def _cell(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def write_csv(df: pd.DataFrame, path: Path) -> None:
    """`results.csv`: every flat column but the long lists; same results, same bytes."""
    table = sort_rows(df.drop(columns=[c for c in LISTS if c in df.columns]))
    table = table.map(_cell)
    table.to_csv(path, index=False, lineterminator="\n")
