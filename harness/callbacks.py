"""Hydra callbacks: render the sweep's report when a multirun ends; keep a long sweep's
launching process flat."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness import progress
from harness.errors import one_line
from harness.results import result_files
from harness.progress import sweep_size

log = logging.getLogger("harness")


def report_dir(config: DictConfig) -> Path:
    """`report.out`, else reports/<sweep_name> for a named sweep, else <sweep dir>/report."""
    if config.report.out:
        return Path(config.report.out)
    if config.sweep_name != "adhoc":
        return Path("reports") / config.sweep_name
    return Path(config.hydra.sweep.dir) / "report"


FAILED_IN_SWEEP: list[str] = []  # results of the sweep that ended in error or cancelled
REPORT_FAILED: list[str] = []  # why the report at the end of the sweep could not be rendered


def failed_results(sweep_dir: Path) -> list[str]:
    """The result files under `sweep_dir` whose job ended in error or was cancelled. After a
    sweep they are all from this run (a rerun reruns such jobs), whatever the launcher."""
    failed = []
    for path in result_files(sweep_dir):
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            continue
        if status in ("error", "cancelled"):
            failed.append(str(path))
    return failed


SWEEP: dict = {}  # this process's multirun: its folder and report folder, set when it starts


class ReportOnMultirunEnd(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        SWEEP.update(dir=Path(config.hydra.sweep.dir), report=report_dir(config))
        params = config.hydra.sweeper.get("params")
        n_jobs = sweep_size(list(config.hydra.overrides.task), dict(params) if params else None)
        progress.start(Path(config.hydra.sweep.dir), n_jobs)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        FAILED_IN_SWEEP[:] = failed_results(sweep_dir)
        REPORT_FAILED.clear()
        if not config.report.enabled:
            return
        try:  # Hydra turns an exception of a callback into a warning: catch everything here
            from harness.report import build_report

            index = build_report([sweep_dir], report_dir(config), baseline=config.report.baseline)
        except Exception as e:  # the results are safe on disk; the report can be rebuilt later
            REPORT_FAILED.append(f"the report could not be rendered ({type(e).__name__}: {one_line(e)}); the "
                                 f"results are in {sweep_dir}; rebuild it with: python -m harness.report {sweep_dir}")
            return
        log.info("report: %s", index)


class ReleaseJobConfigs(Callback):
    """Hydra's launchers keep every job's JobReturn until the sweep ends, each holding two
    deep copies of the job's config and Hydra's own (about 140 KiB of OmegaConf nodes a job:
    the launching process grew 14 MiB per 100 jobs). Nothing reads them after the job (the
    results are on disk), so they are dropped once the job has ended. Registered first in
    conf/config.yaml: Hydra calls on_job_end in reverse order, so every other callback sees
    the whole JobReturn before this one empties it."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        job_return.cfg = None
        job_return.hydra_cfg = None
