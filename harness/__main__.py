"""`python -m harness`: the Hydra app. One job, or with `-m` a sweep of jobs.

Each job is checked here, then run in a fresh process of its own, so that its peak memory is
its own, also inside a multirun; that process writes `result.json` into the job's Hydra
output folder. If it dies without writing one (killed, crashed), this process writes the
result for it.

Job processes are forked from a multiprocessing "forkserver" that has imported torch,
transformers, PEFT and the rest once, so a sweep does not pay seconds of imports per job; the
server itself never touches a model or a GPU.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
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
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from harness.config import check_group_choices, validate
from harness.errors import ConfigError
from harness.results import RESULT_NAME, new_result, now, write_json_atomic

log = logging.getLogger("harness")
failed_jobs: list[str] = []  # jobs of this multirun that ended in status "error"

# Imported once by the forkserver; every job process is forked from it with these loaded.
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "bitsandbytes",
           "datasets", "evaluate", "harness.job"]


def run_job_process(payload: dict, out_dir: Path) -> int:
    """Run one job in a fresh process forked from the preloaded forkserver; its exit code."""
    from harness.job import run_child

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    process = context.Process(target=run_child, args=(payload, str(out_dir)), name="harness-job")
    process.start()
    process.join()
    return process.exitcode


def refuse(message: str, out_dir: Path | None = None) -> None:
    """A user mistake: one line on stderr, exit code 2, and no job folder left behind."""
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def result_for_dead_job(config: dict, returncode: int, command: str, overrides: list[str]) -> dict:
    """The result of a job process that exited without writing one."""
    from harness.results import environment

    if returncode == -signal.SIGKILL:
        status, error = "oom", "job process killed by SIGKILL (on Linux, usually the kernel's OOM killer)"
    elif returncode < 0:
        status, error = "error", f"job process killed by signal {signal.Signals(-returncode).name}"
    else:
        status, error = "error", f"job process exited with code {returncode} without writing a result"
    result = new_result(config, status, error)
    result["env"] = {**environment(None, command, overrides, {}), "end_time": now()}
    return result


def summary(result: dict, path: Path) -> str:
    m = result["metrics"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    return (f"{result['status']}: {result['model']} {result['method']} {result['task']} seed {result['seed']}"
            f" | score {fmt(m['score_before'], '.3f')} -> {fmt(m['score'], '.3f')}"
            f" | peak {fmt(m['peak_memory_mb'], ',.0f')} MiB ({m['memory_source']})"
            f" | {fmt(m['tokens_per_s'], ',.0f')} tokens/s"
            f"{' | ' + result['error'] if result['error'] else ''}\n  result: {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def run(cfg: DictConfig) -> str:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        validate(config)
    except ConfigError as e:
        refuse(str(e), out_dir)
    except MissingMandatoryValue as e:
        refuse(f"{e.full_key} must be set: add {e.full_key}=... to the command line", out_dir)
    except OmegaConfBaseException as e:
        refuse(str(e).splitlines()[0], out_dir)

    command = shlex.join(["python", "-m", "harness", *sys.argv[1:]])
    overrides = list(hydra_cfg.overrides.task)
    payload = {"config": config, "command": command, "overrides": overrides, "launched_at": time.time()}
    returncode = run_job_process(payload, out_dir)
    if returncode == 2:  # the job refused its configuration and has said why
        shutil.rmtree(out_dir, ignore_errors=True)
        sys.exit(2)

    path = out_dir / RESULT_NAME
    if not path.is_file():
        write_json_atomic(path, result_for_dead_job(config, returncode, command, overrides))
    result = json.loads(path.read_text())
    log.info(summary(result, path))
    if result["status"] == "error":
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(1)
        failed_jobs.append(str(path))  # let the rest of the sweep run; exit non-zero at the end
    return str(path)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        refuse(str(e))
    try:
        run()
    except ValueError as e:  # Hydra's own command-line checks, e.g. both --multirun and --cfg
        refuse(str(e))
    if failed_jobs:
        log.error("%d job(s) ended in error: %s", len(failed_jobs), ", ".join(failed_jobs))
        sys.exit(1)


if __name__ == "__main__":
    main()
