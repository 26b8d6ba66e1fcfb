"""How long the report takes for a large sweep: 500 jobs x 500 test examples.

    python benchmarks/report_render.py              # the committed run
    python benchmarks/report_render.py --jobs 50    # a quick look

Writes a fabricated sweep (no training) into a temporary folder: 5 models x 10 methods x 10
seeds, each job a schema-6 result.json and a predictions.jsonl of its test examples before and
after training and its validation examples after (1,500 rows a job, with prediction text), then
times `build_report` on it (reading every file, the paired statistics, the figures, the CSVs
and the page) in this process, `--repeats` times. Target: under 15 s on 2 CPU cores. Results
go to benchmarks/results/report_render.md (and .json) with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
TARGET_S = 15.0
MODELS = ("m-0.1b", "m-0.5b", "m-1b", "m-3b", "m-7b")
METHODS = ("qlora", "lora", "lora8", "adalora", "dora", "vera", "ia3", "prompt", "prefix", "full")


def fabricate(root: Path, n_jobs: int, n_examples: int) -> None:
    """`n_jobs` jobs over MODELS x METHODS x seeds, each scored on `n_examples` examples."""
    rng = np.random.default_rng(0)
    ease = rng.normal(0, 1, n_examples)
    jobs = [(model, method, seed) for seed in range(10) for model in MODELS for method in METHODS][:n_jobs]
    for n, (model, method, seed) in enumerate(jobs):
        size = 10 ** (8 + MODELS.index(model) / 2)
        skill = 0.1 * METHODS.index(method) / len(METHODS)
        test = (ease + skill + rng.normal(0, 0.7, n_examples) > 0).astype(float)
        validation = (ease + skill + rng.normal(0, 0.7, n_examples) > 0).astype(float)
        rows = ([{"split": "test", "stage": "before", "example_id": i, "score": 0.0, "prediction": "0"}
                 for i in range(n_examples)]
                + [{"split": "test", "stage": "after", "example_id": i, "score": float(s), "prediction": f"{i + 7}"}
                   for i, s in enumerate(test)]
                + [{"split": "validation", "stage": "after", "example_id": i, "score": float(s), "prediction": "3"}
                   for i, s in enumerate(validation)])
        job = root / f"{n}_{model}_{method}_s{seed}"
        job.mkdir(parents=True)
        (job / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        memory = size * (2 if method == "full" else 0.6) / 2**20
        result = {
            "schema_version": 6, "config_hash": f"{n:016x}", "status": "ok", "error": None,
            "model": model, "method": method, "task": "arithmetic", "seed": seed,
            "config": {"model": {"name": model, "name_or_path": f"org/{model}"}, "method": {"name": method},
                       "task": {"name": "arithmetic"}, "train": {"max_steps": 100}, "seed": seed,
                       "sweep_name": "render-benchmark"},
            "metrics": {"peak_memory_mb": memory * (1 + 0.01 * seed), "memory_source": "cuda_max_reserved",
                        "predicted_peak_memory_mb": memory, "tokens_per_s": 1e4 / (1 + METHODS.index(method)),
                        "score": float(test.mean()), "score_before": 0.0, "validation_score": float(validation.mean()),
                        "trainable_params": 10**6, "total_params": int(size), "train_losses": list(np.linspace(3, 1, 100)),
                        "wall_setup_s": 5.0, "wall_train_s": 100.0, "wall_eval_s": 10.0},
            "outcomes": {"file": "predictions.jsonl", "rows": len(rows)},
            "env": {"harness_version": "0.1.0", "device_name": "NVIDIA H200", "hostname": "node",
                    "start_time": "2026-12-01T00:00:00+00:00", "end_time": "2026-12-01T01:00:00+00:00"},
        }
        (job / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-save", action="store_true", help="print only, do not write benchmarks/results")
    args = parser.parse_args()
    from harness.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep"
        fabricate(sweep, args.jobs, args.examples)
        times = []
        for i in range(args.repeats):
            start = time.perf_counter()
            build_report([sweep], Path(tmp) / f"report{i}")
            times.append(time.perf_counter() - start)
            print(f"render {i + 1}: {times[-1]:.2f} s", flush=True)
        rows = sum(1 for _ in open(Path(tmp) / "report0" / "examples.csv")) - 1
    median = statistics.median(times)
    record = {"jobs": args.jobs, "examples": args.examples, "outcome_rows": rows, "seconds": times,
              "median_s": median, "target_s": TARGET_S, "meets_target": median < TARGET_S,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": sys.version.split()[0]},
              "command": "python benchmarks/report_render.py" + (f" --jobs {args.jobs}" if args.jobs != 500 else "")}
    text = (f"# Report rendering time\n\n`{record['command']}` on {record['machine']['cores']} CPU cores "
            f"({record['machine']['cpu']}), Python {record['machine']['python']}.\n\n"
            f"{args.jobs} jobs x {args.examples} test examples ({rows:,} per-example rows read and written to "
            f"examples.csv): `build_report` took {', '.join(f'{t:.1f}' for t in times)} s "
            f"(median {median:.1f} s; target under {TARGET_S:.0f} s: {'met' if median < TARGET_S else 'NOT met'}).\n")
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "report_render.json").write_text(json.dumps(record, indent=1) + "\n")
        (RESULTS / "report_render.md").write_text(text)


if __name__ == "__main__":
    main()
