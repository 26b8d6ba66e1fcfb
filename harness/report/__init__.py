"""Sweep reports: collect result.json files, compare methods with QLoRA, write an HTML page.

    from harness.report import build_report
    build_report([Path("outputs/sweeps/2026-11-29_21-08-00")], Path("reports/my-sweep"))
"""

from harness.report.render import build_report

__all__ = ["build_report"]
