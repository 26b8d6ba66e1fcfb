"""Starting job processes: each job runs in a fresh process of its own.

On a host without GPUs, job processes are forked from a multiprocessing "forkserver" that has
imported torch, transformers, PEFT and the rest once, so a sweep does not pay seconds of imports
per job; the server never touches a model. On a host with GPUs they are spawned (a fresh
interpreter each): a forked process cannot use CUDA once its parent has initialised it, and the
imports initialise it — PEFT imports bitsandbytes, whose import asks
torch.cuda.get_device_capability() which native library to load, and torch.cuda.is_available()
alone, which transformers and datasets call, readies CUDA in a way no fork survives (unless
PYTORCH_NVML_BASED_CUDA_CHECK=1). A GPU job pays its imports, seconds against its minutes of
training. If a job process dies without writing its result (killed, crashed), the launcher
writes one for it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
from pathlib import Path

from harness.errors import ConfigError, OutputUnwritable, one_line, unwritable
from harness.results import RESULT_NAME, new_result, now, write_json_atomic

# Imported once by the forkserver; every job process is forked from it with these loaded
# (harness.quiet first: it silences what the others print as they load).
PRELOAD = ["harness.quiet", "torch", "transformers", "transformers.models.auto.modeling_auto",
           "transformers.models.llama.modeling_llama", "peft", "bitsandbytes", "datasets", "evaluate", "harness.job"]


def slot_count(n_jobs: int, gpus: list[str]) -> int:
    """How many jobs of `hydra/launcher=local-gpus` run at once: `n_jobs` (below 1, as joblib's
    -1: one per GPU), but never more than the GPUs (a GPU per running job; the others wait for
    one); CPU jobs (no GPUs) side by side, `n_jobs` of them."""
    slots = n_jobs if n_jobs >= 1 else max(1, len(gpus))
    return min(slots, len(gpus)) if gpus else slots


@contextlib.contextmanager
def gpu_slot(folder: Path, slots: int, gpus: list[str]):
    """Hold one of `slots` GPU slots of a host for the duration of a job: a lock file per slot
    in `folder` (the sweep folder's .gpu-slots/), taken with flock, so concurrent jobs of a
    sweep never share a GPU, and a killed job's lock is released by the kernel. Yields the
    slot's index and the CUDA_VISIBLE_DEVICES value that shows the job only its GPU: slot i's
    entry of `gpus` (the host's, as the user's CUDA_VISIBLE_DEVICES names them), or "" for CPU
    jobs (`gpus` empty), which then see no GPU."""
    import fcntl
    import time

    if gpus and slots > len(gpus):
        raise ValueError(f"{slots} GPU slots for {len(gpus)} GPUs")
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(slots):
            handle = open(folder / f"slot-{index}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield index, gpus[index] if gpus else ""
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(0.2)


def job_context():
    """The multiprocessing context job processes (and model builds, and the settings checks)
    start from: the preloaded forkserver, or on a host with GPUs spawn (see the module's
    docstring)."""
    from harness.config import gpu_count

    method = "spawn" if gpu_count() > 0 else "forkserver"
    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver"):
        # inside a joblib (loky) worker: job processes would inherit loky's start method name,
        # which plain multiprocessing cannot restore
        multiprocessing.set_start_method(method, force=True)
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD)
    return context


def _reported(func, *args):
    """Run func(*args) and return ("ok", its value) or ("error", one line): what crosses back
    from the child process is always plain data (an exception may not unpickle)."""
    try:
        return "ok", func(*args)
    except ConfigError as e:
        return "error", str(e)
    except Exception as e:
        return "error", f"{type(e).__name__}: {one_line(e)}".rstrip(": ")


def call_in_server(func, *args):
    """func(*args) in a process forked from the preloaded server; its value. Whatever goes
    wrong there (an exception, the process killed or crashing) raises ConfigError with one
    line, at once: never a hang."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=job_context()) as pool:
        try:
            outcome, value = pool.submit(_reported, func, *args).result()
        except BrokenProcessPool:
            raise ConfigError(f"the process running {func.__name__} died (killed, or out of memory)")
    if outcome == "error":
        raise ConfigError(value)
    return value


def build_logging_progress(model_cfg: dict) -> str:
    """resolve_model_source in the build process, its progress lines (the pretraining's, with
    the time left) on stderr."""
    from harness.job import setup_logging
    from harness.models import resolve_model_source

    setup_logging(None)
    return resolve_model_source(model_cfg)


def build_model(model_cfg: dict) -> str:
    """Build (pretrain) a tiny or random-weight model into the cache in a process of its own,
    forked from the server, so that what building allocates (on a GPU too) is freed when it
    ends and never held by the launching process during the sweep. Returns its folder; a
    build that fails raises ConfigError naming the model (its half-built folder is removed)."""
    try:
        return call_in_server(build_logging_progress, model_cfg)
    except ConfigError as e:
        raise ConfigError(f"model {model_cfg.get('name')!r} cannot be built: {e}")


def run_job_process(payload: dict, out_dir: Path) -> int:
    """Run one job in a fresh process forked from the preloaded forkserver; its exit code. A
    job of several ranks (train.nproc_per_node > 1) runs torchrun's agent there instead, which
    starts the rank processes (harness/distributed.py)."""
    from harness.distributed import agent
    from harness.job import run_child

    target = agent if payload["config"]["train"].get("nproc_per_node", 1) > 1 else run_child
    process = job_context().Process(target=target, args=(payload, str(out_dir)), name="harness-job")
    process.start()
    try:
        process.join()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the job records itself as cancelled first
        process.join(timeout=5)  # a signal to the process group reached the job too
        if process.is_alive():  # only this process was signalled: pass it on
            os.kill(process.pid, signal.SIGTERM)
            process.join()
        raise
    return process.exitcode


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



def launch_job(payload: dict, out_dir: Path) -> dict | None:
    """Run the job of `payload` into `out_dir` and return its result; None if the job refused
    its configuration (it has printed why)."""
    from harness.job import UNWRITABLE_EXIT

    returncode = run_job_process(payload, out_dir)
    if returncode == 2:
        return None
    if returncode == UNWRITABLE_EXIT:  # the job could not write its result and has said why
        raise OutputUnwritable("")
    path = Path(out_dir) / RESULT_NAME
    if not path.is_file():
        try:
            write_json_atomic(path, result_for_dead_job(payload["config"], returncode, payload.get("command", ""),
                                                        payload.get("overrides", [])))
        except OSError as e:
            raise unwritable(e) or e
    return json.loads(path.read_text())
