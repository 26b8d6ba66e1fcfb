"""Hydra callbacks: render the sweep's report when a multirun ends."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("harness")


def report_dir(config: DictConfig) -> Path:
    """`report.out`, else reports/<sweep_name> for a named sweep, else <sweep dir>/report."""
    if config.report.out:
        return Path(config.report.out)
    if config.sweep_name != "adhoc":
        return Path("reports") / config.sweep_name
    return Path(config.hydra.sweep.dir) / "report"


class ReportOnMultirunEnd(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not config.report.enabled:
            return
        from harness.report import build_report

        try:
            index = build_report([Path(config.hydra.sweep.dir)], report_dir(config))
            log.info("report: %s", index)
        except Exception as e:  # the results are safe on disk; the report can be rebuilt later
            log.error("could not render the report (%s); rebuild it with: python -m harness.report %s",
                      e, config.hydra.sweep.dir)
