"""One job across several processes on one node: PyTorch FSDP2 (`fully_shard`) over torch.distributed.

With `train.nproc_per_node=N` (N > 1) the launcher (harness/launch.py) starts the job as N
rank processes with torchrun's own machinery (`torch.distributed.launcher.elastic_launch`,
what `torchrun --standalone --nproc_per_node N` runs), from an agent process forked like any
job process. Each rank runs `rank_main` below, which runs the job (harness/job.py) with these
differences:

- the ranks join one process group (NCCL on GPUs, gloo on a CPU); rank r uses `cuda:r`;
- each rank loads the model on the CPU, the method is applied there, and `shard` wraps each
  decoder layer, then the whole model, with `fully_shard`, which moves each rank's shard of
  every parameter to its device (a bitsandbytes 4-bit weight moves with its quantization state);
- each optimizer step's global batch (`train.batch_size`, the same stream as one process)
  is split across the ranks (`rank_batches`); gradients are averaged across ranks by FSDP, the
  loss is weighted so that the update and the logged loss equal one process's;
- evaluation runs on every rank alike (generation with `synced_gpus`), rank 0 records it;
- only rank 0 writes result.json. A rank whose job does not end `ok` exits 1, so that torchrun
  stops the others at once; it leaves its status in `.rank-R-result.json` for the agent, which
  writes the job's result when rank 0 could not (`agent`).

Which methods shard is data: a method config with `fsdp: true` (tested: full, lora, qlora,
dora); the others are refused before launch in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger("harness.distributed")

PAYLOAD_NAME = ".payload.json"  # the job's payload, for the rank processes (removed when they end)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_result_name(r: int) -> str:
    return f".rank-{r}-result.json"


# --------------------------------------------------------------------------- the agent


def agent(payload: dict, out_dir: str) -> None:
    """Body of a distributed job's agent process (forked like a job process): start the ranks
    with torchrun's elastic launch, wait for them, and write the job's result if rank 0 did
    not (a rank killed, or one that failed first). Exits like a job process: 0, 1, 2 (bad
    configuration), 3 (result unwritable)."""
    import shutil
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from harness.job import UNWRITABLE_EXIT, die_with_parent, setup_logging
    from harness.results import RESULT_NAME

    die_with_parent()
    os.environ.update(payload.get("env", {}))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(None)
    logging.getLogger("torch.distributed").setLevel(logging.WARNING)  # the agent's own chatter
    nproc = payload["config"]["train"]["nproc_per_node"]
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("HARNESS_CPU_THREADS", str(max(1, cores // nproc)))
    payload_file = out / PAYLOAD_NAME
    payload_file.write_text(json.dumps(payload))
    logs = tempfile.mkdtemp(prefix="harness-torchrun-")  # torchrun's own files (the ranks log to the job's)
    # The ranks are processes of their own (`python -m harness.distributed`), as torchrun starts
    # them: torchrun then reports every rank that has failed when it looks, so the first failure
    # can be told from the others it causes. (Forked ranks, from this process with the libraries
    # imported, would start seconds sooner, but torchrun reports one failed rank of those, in
    # rank order: a killed rank 1 came back as rank 0's broken connection.)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs),
                          signals_to_handle="SIGTERM,SIGINT")
    code, started = 0, time.time()
    try:
        elastic_launch(config, sys.executable)("-m", "harness.distributed", str(payload_file), str(out))
    except ChildFailedError as e:
        # the rank that failed first: one killed by a signal (the others then lose their
        # connection to it and exit 1, in the same look or later), else the earliest
        failed_rank, failure = min(e.failures.items(), key=lambda item: (item[1].exitcode >= 0, item[1].timestamp))
        if failure.exitcode in (2, UNWRITABLE_EXIT):  # a bad configuration, an unwritable disk: said already
            code = failure.exitcode
        else:
            code = 1
            record_failed_rank(payload, out, failed_rank, failure.exitcode, started)
    except Exception as e:  # the agent itself was signalled (Ctrl-C, SIGTERM) or could not start the ranks
        code = 1
        if not written_since(out / RESULT_NAME, started):
            from harness.launch import result_for_dead_job
            from harness.results import write_json_atomic

            result = result_for_dead_job(payload["config"], 1, payload.get("command", ""), payload.get("overrides", []))
            cancelled = type(e).__name__ == "SignalException"
            result.update(status="cancelled" if cancelled else "error",
                          error=f"cancelled by {e}" if cancelled else f"torchrun: {type(e).__name__}: {e}")
            write_json_atomic(out / RESULT_NAME, result)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        payload_file.unlink(missing_ok=True)
        for leftover in out.glob(".rank-*-result.json"):
            leftover.unlink()
    sys.exit(code)


def written_since(path: Path, started: float) -> bool:
    """Whether `path` was written by this run of the job (not left by an earlier, failed one)."""
    return path.is_file() and path.stat().st_mtime >= started - 1  # file times may round down


def record_failed_rank(payload: dict, out: Path, failed_rank: int, exitcode: int, started: float) -> None:
    """The job's result when rank `failed_rank` ended it: rank 0's own result when rank 0
    failed first and wrote one; otherwise rank 0's result (if any) with the failed rank's
    status and error (from its `.rank-R-result.json`, or from how it died)."""
    from harness.launch import result_for_dead_job
    from harness.results import RESULT_NAME, write_json_atomic

    path = out / RESULT_NAME
    written = json.loads(path.read_text()) if written_since(path, started) else None
    if failed_rank == 0 and written is not None:
        return
    rank_file = out / rank_result_name(failed_rank)
    if rank_file.is_file():
        outcome = json.loads(rank_file.read_text())
    else:
        dead = result_for_dead_job(payload["config"], exitcode, payload.get("command", ""), payload.get("overrides", []))
        outcome = {"status": dead["status"], "error": dead["error"].replace("job process", "process", 1)}
    result = written or result_for_dead_job(payload["config"], exitcode, payload.get("command", ""),
                                            payload.get("overrides", []))
    result.update(status=outcome["status"], error=f"rank {failed_rank} of {payload['config']['train']['nproc_per_node']}: "
                                                  f"{outcome['error']}")
    write_json_atomic(path, result)


# --------------------------------------------------------------------------- a rank


def init(device_name: str):
    """Join the job's process group and return this rank's device: `cuda:LOCAL_RANK` (NCCL)
    where the job runs on GPUs, the CPU (gloo) otherwise."""
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    cuda = device_name != "cpu" and torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def launch_facts(device) -> dict:
    """What env.launch records of a distributed job: the world size, the launcher, and each
    rank's host and device (a collective: every rank calls it)."""
    import socket

    import torch
    import torch.distributed as dist

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"host": socket.gethostname(), "device": str(device), "name": name})
    return {"world_size": dist.get_world_size(), "launcher": "torchrun (elastic_launch, standalone)",
            "rank_devices": ranks}


def decoder_layers(model) -> list:
    """The model's decoder layers (transformers' `*DecoderLayer` modules), outermost first."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard(model, device):
    """FSDP2: each decoder layer, then the whole model, sharded across the ranks (each rank's
    shard moved to `device`); one forward pass of one token through the root makes FSDP set
    itself up from the root, as evaluation's generation calls the inner model directly. The
    root keeps its parameters gathered after a forward pass (for the backward pass to come):
    they are resharded here, so that `model.parameters()` (what the optimizer and gradient
    clipping take) are the sharded parameters the gradients land on."""
    import torch
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"no decoder layers (*DecoderLayer modules) in {type(model).__name__} to shard")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the job's random streams untouched
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.reshard()
    return model


@contextlib.contextmanager
def gathered_root(model):
    """Evaluation outside the root's forward (generation calls the inner model): the root's own
    parameters (embeddings, final norm, output layer) gathered for the duration, and sharded
    again after it (a forward pass through the root leaves them gathered)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def synced() -> bool:
    """Whether this process is one of several ranks (generation must then keep the ranks in step)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_batches(batches, r: int, world: int):
    """Each global batch of `batches` (batch_stream's) cut into this rank's share: examples
    r, r + world, ... re-padded to their own longest. `n_tokens` stays the global batch's
    (the job's throughput), `n_labels` becomes the rank's, `world_labels` the global batch's.
    A rank left without an example (a last batch smaller than the world) gets the first one
    with no label: it joins the collectives and adds nothing to the loss."""
    from harness.data import IGNORE_INDEX

    for batch in batches:
        rows = list(range(r, batch["input_ids"].shape[0], world))
        empty = not rows
        mine = {k: batch[k][rows or [0]] for k in ("input_ids", "attention_mask", "labels")}
        width = int(mine["attention_mask"].sum(dim=1).max())
        mine = {k: v[:, :width].contiguous() for k, v in mine.items()}
        if empty:
            mine["labels"][:] = IGNORE_INDEX
        mine["n_labels"] = 0 if empty else int((mine["labels"][:, 1:] != IGNORE_INDEX).sum())
        yield {**mine, "n_tokens": batch["n_tokens"], "world_labels": batch["n_labels"]}


def per_rank_memory(readings: dict) -> dict:
    """Every rank's memory readings (a collective): the headline is the rank with the highest
    peak; `peak_memory_mb_per_rank` lists them all, rank by rank."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, readings)
    highest = max(everyone, key=lambda r: r["peak_memory_mb"])
    return {**highest, "peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in everyone],
            "peak_memory_rank": everyone.index(highest)}


def rank_main(payload_file: str, out_dir: str) -> None:
    """Body of a rank process, `python -m harness.distributed PAYLOAD_FILE OUT_DIR`, started by
    torchrun's elastic launch (RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous in its
    environment): the job, then exit 0 if it is ok."""
    from harness.job import die_with_parent, raise_keyboard_interrupt, run_payload, setup_logging

    out_dir = Path(out_dir)
    payload = json.loads(Path(payload_file).read_text())
    die_with_parent()
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    os.environ.update(payload.get("env", {}))
    r = rank()
    setup_logging(out_dir if r == 0 else None)
    if r != 0:  # the other ranks say warnings and errors only, each line naming its rank
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"[rank {r}][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().setLevel(logging.WARNING)
    result = run_payload(payload, out_dir, say_config_error=r == 0)  # every rank finds the same mistake
    import torch.distributed as dist

    if result["status"] == "ok" and dist.is_initialized():
        # every rank is here: leave the group together (left to the interpreter's exit, gloo's
        # threads once aborted a rank: "terminate called without an active exception"). A rank
        # not ok exits at once, so that torchrun stops the others, which may be in a collective.
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2])
