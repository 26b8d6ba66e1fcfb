"""`python -m harness`: the Hydra app. One job, or with `-m` a sweep of jobs.

Each job is checked here, then run in a fresh process of its own, so that its peak memory is
its own, also inside a multirun; that process writes `result.json` into the job's Hydra
output folder. If it dies without writing one (killed, crashed), this process writes the
result for it.

On a host without GPUs, job processes are forked from a multiprocessing "forkserver" that has
imported torch, transformers, PEFT and the rest once, so a sweep does not pay seconds of imports
per job; on a host with GPUs they are spawned, since no forked process can use CUDA once those
imports have touched it (harness/launch.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import (CONF_DIR, check_group_choices, check_library_settings, compose_jobs, host_gpus,
                            resolved, validate)
from harness import progress
from harness.errors import ConfigError, OutputUnwritable, unwritable
from harness.callbacks import FAILED_IN_SWEEP, REPORT_FAILED, SWEEP
from harness.launch import build_model, call_in_server, gpu_slot, launch_job, slot_count
from harness.models import is_built, what_is_built
from harness.results import RESULT_NAME, config_hash, reusable

log = logging.getLogger("harness")


def method_list() -> str:
    """One line per method for --help: its name and the first line of its config's comment."""
    lines, paths = [], sorted((CONF_DIR / "method").glob("*.yaml"))
    width = max(len(path.stem) for path in paths)
    for path in paths:
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"  {path.stem:<{width}} {first}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("harness_method_list", method_list, replace=True)

def prepare_folder(out_dir: Path, wanted_hash: str, force: bool) -> bool:
    """Resume: True if the job's folder already holds its result. Otherwise clear leftovers
    of a killed write and keep a result of another configuration aside (never lost)."""
    path = out_dir / RESULT_NAME
    keep, reason = reusable(path, wanted_hash)
    if keep and not force:
        log.info("skipped %s: %s", out_dir.name, reason)
        return True
    for tmp in out_dir.glob(f".{RESULT_NAME}.*.tmp"):
        tmp.unlink()
    if path.is_file() and "configuration changed" in reason:
        old_hash = json.loads(path.read_text()).get("config_hash")
        path.rename(out_dir / f"result.{old_hash}.json")
        log.info("kept the earlier result as result.%s.json", old_hash)
    log.info("running %s: %s", out_dir.name, "force=true" if keep else reason)
    return False


def cancel_on_sigterm() -> None:
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C, so running jobs end as cancelled."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def refuse(message: str, out_dir: Path | None = None) -> None:
    """A user mistake: one line on stderr, exit code 2, and nothing left behind."""
    if out_dir is not None:
        remove_new_job_folder(out_dir)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def remove_new_job_folder(out_dir: Path) -> None:
    """Remove the folder Hydra made for a job that never ran, and the folders above it that
    are left empty (or hold only Hydra's multirun.yaml and the sweep's progress file), up to
    the working directory. A folder holding a result of an earlier run is kept."""
    if (out_dir / RESULT_NAME).exists():
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    cwd, folder = Path.cwd().resolve(), out_dir.parent
    while folder != cwd and cwd in folder.parents:
        if {p.name for p in folder.iterdir()} - {"multirun.yaml", progress.PROGRESS_NAME}:
            break
        shutil.rmtree(folder)
        folder = folder.parent


def say_progress(sweep_dir: Path | None, status: str, skipped: bool = False) -> None:
    """The sweep's progress line after a job (harness/progress.py); nothing for a single job."""
    if sweep_dir is None:
        return
    try:
        line = progress.job_done(sweep_dir, status, skipped)
    except (OSError, ValueError) as e:  # a full disk, a torn line: the results matter, not this line
        log.warning("no progress line (%s)", e)
        return
    if line:
        log.info(line)


def summary(result: dict, path: Path) -> str:
    m = result["metrics"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    return (f"{result['status']}: {result['model']} {result['method']} {result['task']} seed {result['seed']}"
            f" | score {fmt(m['score_before'], '.3f')} -> {fmt(m['score'], '.3f')}"
            f" | peak {fmt(m['peak_memory_mb'], ',.0f')} MiB ({m['memory_source']})"
            f" | {fmt(m['tokens_per_s'], ',.0f')} tokens/s"
            f"{' | ' + result['error'] if result['error'] else ''}\n  result: {path}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    try:
        config = resolved(cfg)
        validate(config)
    except ConfigError as e:
        refuse(str(e), out_dir)

    path = out_dir / RESULT_NAME
    sweep_dir = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    if prepare_folder(out_dir, config_hash(config), config["force"]):
        say_progress(sweep_dir, "ok", skipped=True)
        return str(path)
    if not is_built(config["model"]):
        # Build (and pretrain) a tiny or random-weight model once into the cache before the
        # job starts, so that no job's measured memory or time includes building it.
        log.info(what_is_built(config["model"]))
        started = time.time()
        try:
            build_model(config["model"])
        except ConfigError as e:
            refuse(str(e), out_dir)
        progress.model_built(sweep_dir, time.time() - started)  # not a job's time: left out of the estimate
    command = shlex.join(["python", "-m", "harness", *sys.argv[1:]])
    overrides = list(hydra_cfg.overrides.task)
    payload = {"config": config, "command": command, "overrides": overrides, "launched_at": time.time(),
               "env": {k: str(v) for k, v in (hydra_cfg.job.env_set or {}).items()}}  # the server predates them
    launcher = str(hydra_cfg.launcher.get("_target_", ""))
    if launcher.endswith("JoblibLauncher"):  # hydra/launcher=local-gpus: one GPU per running job
        gpus = [] if config["device"] == "cpu" else host_gpus()
        slots = slot_count(int(hydra_cfg.launcher.n_jobs), gpus)
        with gpu_slot(Path(hydra_cfg.sweep.dir) / ".gpu-slots", slots, gpus) as (slot, visible):
            payload["env"].update(HARNESS_GPU_SLOT=str(slot), CUDA_VISIBLE_DEVICES=visible)
            if not gpus:
                # CPU jobs side by side: share the cores instead of each taking all of them
                payload["env"]["HARNESS_CPU_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // slots))
            log.info("%s: GPU slot %d of %d (CUDA_VISIBLE_DEVICES=%s)", out_dir.name, slot, slots, visible)
            result = launch_job(payload, out_dir)
    else:
        result = launch_job(payload, out_dir)
    if result is None:  # the job refused its configuration and has said why
        remove_new_job_folder(out_dir)
        sys.exit(2)
    log.info(summary(result, path))
    say_progress(sweep_dir, result["status"])
    if result["status"] in ("error", "cancelled") and hydra_cfg.mode != RunMode.MULTIRUN:
        sys.exit(1)  # in a sweep the other jobs run; the exit code comes from the results at its end
    return str(path)


def preflight(argv: list[str]) -> None:
    """Before the first job: every value the command will run composes and is valid, and
    the libraries take the settings passed to them (checked in a process forked from the job
    server, which the jobs fork from next)."""
    configs = compose_jobs(argv)
    for config in configs:
        validate(config)
        nproc = config["train"]["nproc_per_node"]
        if nproc > 1 and "hydra/launcher=local-gpus" in argv:  # it gives each job one GPU of the host
            raise ConfigError(f"train.nproc_per_node={nproc} with hydra/launcher=local-gpus: that launcher gives "
                              "each job one GPU; run jobs of several ranks with the default launcher (or slurm)")
    if configs:
        call_in_server(check_library_settings, configs)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
        preflight(sys.argv[1:])
    except ConfigError as e:
        refuse(str(e))
    cancel_on_sigterm()
    logging.raiseExceptions = False  # a full disk: no traceback per log line (the failed write says it)
    FAILED_IN_SWEEP.clear()
    REPORT_FAILED.clear()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let a launcher's exception reach the handlers below
    try:
        run()
    except ValueError as e:  # Hydra's own command-line checks, e.g. both --multirun and --cfg
        refuse(str(e))
    except KeyboardInterrupt:
        print("cancelled: the running job recorded itself as cancelled; rerun the same command "
              "(same hydra.sweep.dir for a sweep) to resume", file=sys.stderr)
        sys.exit(130)
    except OutputUnwritable as e:
        stop_unwritable(e)
    except Exception as e:
        if (stop := unwritable(e)) is not None:  # Hydra's own files of the next job
            stop_unwritable(stop)
        if type(e).__name__ not in LOST_JOB_ERRORS:
            raise
        lost_jobs(e)
    if FAILED_IN_SWEEP:
        log.error("%d job(s) ended in error or were cancelled: %s", len(FAILED_IN_SWEEP), ", ".join(FAILED_IN_SWEEP))
    if REPORT_FAILED:
        print(f"error: {REPORT_FAILED[0]}", file=sys.stderr)
    if FAILED_IN_SWEEP or REPORT_FAILED:
        sys.exit(1)


def stop_unwritable(stop: OutputUnwritable) -> None:
    """The disk refused a write: say which file (unless the job process has), exit 1."""
    if str(stop):
        print(f"error: {stop}", file=sys.stderr)
    sys.exit(1)


# submitit's errors for a job that died without returning (killed, node failure, no output)
LOST_JOB_ERRORS = ("UncompletedJobError", "FailedJobError")


def wait_for_other_slurm_tasks(folder: Path, poll_s: float = 3.0) -> None:
    """submitit gives up at the first lost task while the array's other tasks still run: wait
    until each has written its result (submitit's *_result.pkl) or SLURM no longer lists it."""
    import subprocess

    if not folder.is_dir() or shutil.which("squeue") is None:
        return
    while True:
        pending = [t.name for t in folder.iterdir() if t.is_dir() and not any(t.glob("*_result.pkl"))]
        if not pending:
            return
        listed = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(pending)], capture_output=True,
                                text=True).stdout.split()
        if not listed:
            return
        log.info("a job died; waiting for the other %d job(s) of the array: %s", len(listed), " ".join(listed))
        time.sleep(poll_s)


def lost_jobs(error: Exception) -> None:
    """A launcher lost a job (on SLURM: killed hard, its node died): the results of the other
    jobs are on disk; render the report from them, say which job, and exit 1. A rerun of the
    same command reruns what is missing."""
    sweep_dir = SWEEP.get("dir")
    if sweep_dir is not None:
        wait_for_other_slurm_tasks(Path(sweep_dir) / ".submitit")
    try:
        from harness.report import build_report

        log.info("report: %s", build_report([sweep_dir], SWEEP["report"]))
    except Exception as report_error:  # not a sweep, or no result at all
        log.warning("no report: %s", report_error)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: a job died without a result ({type(error).__name__}: {first}); the other jobs' results are in "
          f"{sweep_dir or 'the sweep folder'}; rerun the same command to run what is missing", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
