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

from harness.config import CONF_DIR, check_composes, check_group_choices, validate
from harness.errors import ConfigError
from harness.launch import launch_job
from harness.results import RESULT_NAME, config_hash, reusable

log = logging.getLogger("harness")


def method_list() -> str:
    """One line per method for --help: its name and the first line of its config's comment."""
    lines = []
    for path in sorted((CONF_DIR / "method").glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"  {path.stem:<14} {first}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("harness_method_list", method_list, replace=True)
failed_jobs: list[str] = []  # jobs of this multirun that ended in "error" or "cancelled"

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
    are left empty (or hold only Hydra's multirun.yaml), up to the working directory. A folder
    holding a result of an earlier run is kept."""
    if (out_dir / RESULT_NAME).exists():
        return
    shutil.rmtree(out_dir, ignore_errors=True)
    cwd, folder = Path.cwd().resolve(), out_dir.parent
    while folder != cwd and cwd in folder.parents:
        if {p.name for p in folder.iterdir()} - {"multirun.yaml"}:
            break
        shutil.rmtree(folder)
        folder = folder.parent


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
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        validate(config)
    except ConfigError as e:
        refuse(str(e), out_dir)
    except MissingMandatoryValue as e:
        refuse(f"{e.full_key} must be set: add {e.full_key}=... to the command line", out_dir)
    except OmegaConfBaseException as e:
        refuse(str(e).splitlines()[0], out_dir)

    path = out_dir / RESULT_NAME
    if prepare_folder(out_dir, config_hash(config), config["force"]):
        return str(path)
    command = shlex.join(["python", "-m", "harness", *sys.argv[1:]])
    overrides = list(hydra_cfg.overrides.task)
    payload = {"config": config, "command": command, "overrides": overrides, "launched_at": time.time()}
    result = launch_job(payload, out_dir)
    if result is None:  # the job refused its configuration and has said why
        remove_new_job_folder(out_dir)
        sys.exit(2)
    log.info(summary(result, path))
    if result["status"] in ("error", "cancelled"):
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(1)
        failed_jobs.append(str(path))  # let the rest of the sweep run; exit non-zero at the end
    return str(path)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
        check_composes(sys.argv[1:])
    except ConfigError as e:
        refuse(str(e))
    cancel_on_sigterm()
    try:
        run()
    except ValueError as e:  # Hydra's own command-line checks, e.g. both --multirun and --cfg
        refuse(str(e))
    except KeyboardInterrupt:
        print("cancelled: the running job recorded itself as cancelled; rerun the same command "
              "(same hydra.sweep.dir for a sweep) to resume", file=sys.stderr)
        sys.exit(130)
    if failed_jobs:
        log.error("%d job(s) ended in error or were cancelled: %s", len(failed_jobs), ", ".join(failed_jobs))
        sys.exit(1)


if __name__ == "__main__":
    main()
