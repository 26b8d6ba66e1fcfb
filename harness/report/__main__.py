"""`python -m harness.report SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--baseline METHOD]`: render a
sweep report, every method compared with the baseline (QLoRA unless --baseline names another)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from harness.config import check_writable
from harness.errors import ConfigError
from harness.report.aggregate import collect
from harness.results import result_files
from harness.report.render import BASELINE, default_title, render_sweep, sweep_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="sweep (or job) folders holding result.json files")
    parser.add_argument("--out", type=Path, help="report folder (default: reports/<sweep name>)")
    parser.add_argument("--baseline", metavar="METHOD",
                        help=f"the method every other is compared with (default: {BASELINE})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")

    for folder in args.sweep_dirs:
        if not folder.is_dir():
            return _error(f"no such folder: {folder}")
        if not result_files(folder):
            return _error(f"no result.json under {folder}")
    df = collect(args.sweep_dirs)
    if df.empty:
        return _error(f"no readable result.json under {', '.join(map(str, args.sweep_dirs))}")
    methods = sorted(df["method"].dropna().unique())
    baseline = args.baseline or BASELINE
    if baseline not in methods:
        if args.baseline:  # named by the user: a mistake
            return _error(f"--baseline {baseline!r}: no job of that method here (methods: {', '.join(methods)})")
        # the default, absent: the report a sweep renders, its verdicts saying there is no baseline
        print(f"warning: no {baseline} job here, so the verdicts say there is no baseline; compare with one of "
              f"the methods here with --baseline METHOD ({', '.join(methods)})", file=sys.stderr)
    out = args.out or Path("reports") / (sweep_name(df) or args.sweep_dirs[0].resolve().name)
    try:
        check_writable(out, "--out DIR")
    except ConfigError as e:
        return _error(str(e))
    index = render_sweep(df, out, default_title(df, args.sweep_dirs), baseline)
    print(index)
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
