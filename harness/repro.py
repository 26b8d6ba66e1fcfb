"""`python -m harness.repro PATH [--jobs K]`: rerun recorded jobs and compare their numbers.

PATH is a result.json, a job folder or a sweep folder. Each job is rerun from the config its
result recorded, in a fresh process like any job, and its metrics are compared with the
recorded ones. Exit code 0 if every metric is within tolerance, 1 if any is not, 2 for bad
input.

Tolerances. Losses and scores must be bit-identical when the recorded job ran on a CPU with
deterministic algorithms (the harness's default there); otherwise (GPUs) losses may differ
by 2% relative and scores by 0.02. Parameter counts and weight bytes must be identical.
Peak memory may differ by 25% and throughput by 50%: they depend on the machine's load.
`--metrics` restricts the comparison to some of them (the status is always compared).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.results import RESULT_NAME, read_result

EXACT = "identical"


@dataclass
class Check:
    job: str
    metric: str
    recorded: object
    rerun: object
    tolerance: str
    ok: bool


def find_results(path: Path) -> list[Path]:
    """The result files a path stands for: the file itself, a job folder, or a sweep folder."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / RESULT_NAME).is_file():
        return [path / RESULT_NAME]
    return sorted(path.rglob(RESULT_NAME))


def deterministic(result: dict) -> bool:
    env = result["env"]
    return str(env.get("device", "")).startswith("cpu") and bool(
        (env.get("determinism") or {}).get("deterministic_algorithms"))


def tolerances(result: dict) -> dict[str, tuple[str, float]]:
    """metric -> (kind, bound): kind 'exact', 'rel' (relative) or 'abs'."""
    exact = deterministic(result)
    return {
        "train_losses": ("exact", 0.0) if exact else ("rel", 0.02),
        "score_before": ("exact", 0.0) if exact else ("abs", 0.02),
        "score": ("exact", 0.0) if exact else ("abs", 0.02),
        "trainable_params": ("exact", 0.0),
        "weight_bytes": ("exact", 0.0),
        "peak_memory_mb": ("rel", 0.25),
        "tokens_per_s": ("rel", 0.5),
    }


def within(a, b, kind: str, bound: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list) or isinstance(b, list):
        return len(a) == len(b) and all(within(x, y, kind, bound) for x, y in zip(a, b))
    if kind == "exact":
        return a == b
    if kind == "abs":
        return abs(a - b) <= bound
    return abs(a - b) <= bound * max(abs(a), abs(b), 1e-12)


def describe(kind: str, bound: float) -> str:
    return EXACT if kind == "exact" else f"±{bound:g}" if kind == "abs" else f"±{bound:.0%}"


def shown(value) -> str:
    if isinstance(value, list):
        return f"{len(value)} steps, last {value[-1]:.6g}" if value else "none"
    if isinstance(value, float) and not math.isnan(value):
        return f"{value:.6g}"
    return str(value)


def compare(recorded: dict, rerun: dict, job: str = "", only=None) -> list[Check]:
    """One Check per metric of `tolerances` (or of `only`)."""
    checks = []
    for metric, (kind, bound) in tolerances(recorded).items():
        if only and metric not in only:
            continue
        a, b = recorded["metrics"].get(metric), rerun["metrics"].get(metric)
        checks.append(Check(job, metric, a, b, describe(kind, bound), within(a, b, kind, bound)))
    checks.append(Check(job, "status", recorded["status"], rerun["status"], EXACT,
                        recorded["status"] == rerun["status"]))
    return checks


# Keys added to `train` after results were first recorded, at the values that do what the
# harness did before they existed (schema 5: torch.compile and AdamW's implementation).
ADDED_TRAIN_KEYS = {"compile": False, "adamw_impl": "default"}


def rerun(result: dict, workdir: Path) -> dict:
    """Run the recorded job again into `workdir`; returns the new result. Keys the recorded
    configuration predates get the values that reproduce it (ADDED_TRAIN_KEYS)."""
    from harness.launch import launch_job

    config = {**result["config"], "train": {**ADDED_TRAIN_KEYS, **result["config"]["train"]}}
    payload = {"config": config, "command": "python -m harness.repro", "overrides": result["env"].get("overrides", [])}
    new = launch_job(payload, workdir)
    if new is None:
        raise SystemExit(f"error: the recorded configuration of {result['model']}/{result['method']} "
                         "no longer runs (see the line above)")
    return new


def table(checks: list[Check]) -> str:
    rows = [("job", "metric", "recorded", "rerun", "tolerance", "verdict")]
    rows += [(c.job, c.metric, shown(c.recorded), shown(c.rerun), c.tolerance, "ok" if c.ok else "MISMATCH")
             for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def check_results(paths: list[Path], only=None) -> list[Check]:
    """Rerun each recorded result and compare; the checks of all of them."""
    checks = []
    with tempfile.TemporaryDirectory(prefix="harness-repro-") as tmp:
        for i, path in enumerate(paths):
            recorded = read_result(path)
            job = path.parent.name
            checks += compare(recorded, rerun(recorded, Path(tmp) / str(i)), job, only)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path, help="a result.json, a job folder or a sweep folder")
    parser.add_argument("--jobs", type=int, default=None, help="rerun only K jobs, sampled (seeded)")
    parser.add_argument("--metrics", default=None,
                        help="compare only these metrics (comma-separated), e.g. the ones that must be identical: "
                             "train_losses,score,trainable_params,weight_bytes")
    args = parser.parse_args(argv)
    only = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    known = list(tolerances({"env": {}}))
    if only and (unknown := [m for m in only if m not in known]):
        print(f"error: --metrics {unknown[0]!r}: allowed metrics are {', '.join(known)}", file=sys.stderr)
        return 2
    if not args.path.exists():
        print(f"error: {args.path} does not exist (give a result.json, a job folder or a sweep folder)",
              file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be a positive integer", file=sys.stderr)
        return 2
    paths = find_results(args.path)
    if not paths:
        print(f"error: no {RESULT_NAME} under {args.path}", file=sys.stderr)
        return 2
    for path in paths:
        try:
            read_result(path)
        except Exception as e:
            print(f"error: {path} is not a valid result ({type(e).__name__}: {str(e).splitlines()[0]})",
                  file=sys.stderr)
            return 2
    if args.jobs and args.jobs < len(paths):
        paths = sorted(random.Random(0).sample(paths, args.jobs))
    checks = check_results(paths, only)
    print(table(checks))
    bad = [c for c in checks if not c.ok]
    print(f"\n{len(paths)} job(s) rerun: " + (f"{len(bad)} mismatch(es)" if bad else "all within tolerance"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
