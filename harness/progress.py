"""Where a sweep is: after each job, one line with the jobs done of the sweep's total (ok, oom,
failed so far; diverged and skipped when there are any), the time since it started and an estimate of the time left.

The counts live in a small file in the sweep folder (`.progress.jsonl`: a first line with the
sweep's size and start, then one line per job that ended or model built before a job), so that they add up whichever
process runs the job: the launching process itself, a joblib worker of
`hydra/launcher=local-gpus`, or a SLURM task writing to the shared sweep folder. A rerun of the
sweep starts the file again; the jobs it skips (already complete) count as done at once, and
the time left is estimated from the jobs that ran.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PROGRESS_NAME = ".progress.jsonl"


def sweep_size(task_overrides: list[str], sweeper_params: dict | None) -> int:
    """The number of jobs of a sweep: the product of its swept values (the command line's,
    over a named sweep's `hydra.sweeper.params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (sweeper_params or {}).items()]
    overrides = {o.get_key_element(): o for o in parser.parse_overrides(lines)}
    overrides.update({o.get_key_element(): o for o in parser.parse_overrides(list(task_overrides))})
    size = 1
    for o in overrides.values():
        if o.is_sweep_override() and not o.is_interval_sweep():
            size *= len(list(o.sweep_string_iterator()))
    return size


def start(sweep_dir: Path, n_jobs: int) -> None:
    """A sweep of `n_jobs` jobs starts (or starts again) in `sweep_dir`."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / PROGRESS_NAME).write_text(json.dumps({"n_jobs": n_jobs, "started": time.time()}) + "\n")


def job_done(sweep_dir: Path, status: str, skipped: bool = False) -> str | None:
    """Count a job that ended with `status` (or was `skipped`: complete already) and return
    the sweep's progress line; None when the sweep has no progress file (a single job)."""
    path = sweep_dir / PROGRESS_NAME
    if not path.is_file():
        return None
    with open(path, "a") as f:  # one short append per job: whole lines, whichever process writes
        f.write(json.dumps({"status": status, "skipped": skipped, "at": time.time()}) + "\n")
    return line(path.read_text().splitlines())


def model_built(sweep_dir: Path | None, seconds: float) -> None:
    """A model was built (a tiny model pretrained) before a job, once per sweep: its time is
    not a job's, so the estimate of the time left leaves it out."""
    path = None if sweep_dir is None else sweep_dir / PROGRESS_NAME
    if path is not None and path.is_file():
        with open(path, "a") as f:
            f.write(json.dumps({"build_s": seconds}) + "\n")


def line(lines: list[str]) -> str:
    """The progress line from the file's lines (its head, then one per job ended or model built)."""
    from harness.train import clock

    head, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:] if x.strip()]
    jobs = [row for row in rows if "status" in row]
    building = sum(row["build_s"] for row in rows if "build_s" in row)
    n_jobs, done = head["n_jobs"], len(jobs)
    counts = {"ok": 0, "oom": 0, "diverged": 0, "failed": 0, "skipped": 0}
    for job in jobs:
        key = "skipped" if job["skipped"] else job["status"] if job["status"] in counts else "failed"
        counts[key] += 1
    elapsed = time.time() - head["started"]
    ran = done - counts["skipped"]
    if done >= n_jobs:
        left = "done"
    elif ran:
        left = f"~{clock(max(0.0, elapsed - building) / ran * (n_jobs - done))} left"
    else:
        left = "time left not known yet"
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v or k in ("ok", "oom", "failed"))
    return f"sweep: {done}/{n_jobs} jobs done ({shown}) | {clock(elapsed)} elapsed, {left}"
