"""The result file: its schema, its provenance, and writing it atomically.

`result.json` is the only thing a job hands on: reports and checks read it, never the
training code. Schema: `harness/result_schema.json` (JSON Schema, documented in the README).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

SCHEMA_VERSION = 9  # 2: config_hash, status "cancelled"; 3: predicted memory; 4: forgetting;
# 5: CPU peak memory is malloc in use (memory_source "cpu_malloc_in_use"), compile and adamw_impl;
# 6: each scored example's outcome in predictions.jsonl (`outcomes`); 7: peak memory is the
# training phase's (memory_phase, phase_peak_memory_mb); 8: jobs across ranks (metrics
# peak_memory_mb_per_rank and peak_memory_rank, env.launch world_size and rank_devices); 9: CUDA
# readings of bitsandbytes' paged states (paged_memory_mb, memory_source
# "cuda_max_reserved_plus_paged") and why NVML was not read (nvml_error), env.cuda multiprocessors and uuid
SCHEMA_PATH = Path(__file__).with_name("result_schema.json")
RESULT_NAME = "result.json"
OUTCOMES_NAME = "predictions.jsonl"  # each scored example's outcome, one JSON object a line
STATUSES = ("ok", "oom", "diverged", "error", "cancelled")
FINAL_STATUSES = ("ok", "oom", "diverged")  # results a resumed sweep keeps; error/cancelled rerun
# Keys that cannot change a job's outcome, left out of its configuration hash.
UNHASHED_KEYS = ("report", "sweep_name", "force")
UNHASHED_TRAIN_KEYS = ("log_every",)
# Packages whose version can change a job's numbers.
HASHED_PACKAGES = ("harness", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
                   "evaluate", "tokenizers", "numpy")
METRIC_KEYS = (
    "peak_memory_mb", "memory_source", "tokens_per_s", "step_time_ms", "train_loss_first",
    "train_loss_last", "score_before", "score", "trainable_params", "total_params", "weight_bytes",
    "predicted_peak_memory_mb",
)
PACKAGES = ("harness", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets",
            "evaluate", "tokenizers", "safetensors", "hydra-core", "omegaconf", "numpy", "nvidia-ml-py",
            "hqq", "galore-torch", "apollo-torch")  # the last three: the methods that use them


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def config_hash(config: dict) -> str:
    """Hash of everything that changes a job's outcome: the resolved config (less report and
    logging keys, but with the report's baseline when the job's method is sized to it), and
    the versions of the harness and the packages that compute it."""
    import hashlib

    relevant = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    relevant["train"] = {k: v for k, v in config["train"].items() if k not in UNHASHED_TRAIN_KEYS}
    if relevant["train"].get("nproc_per_node") == 1:  # one process: hashed as before the key existed
        del relevant["train"]["nproc_per_node"]
    baseline = (config.get("report") or {}).get("baseline", "qlora")
    if config.get("budget", "default") != "default" and baseline != "qlora":
        relevant["budget_baseline"] = baseline  # the method is sized to the baseline: a change reruns it
    versions = {name: version for name, version in package_versions().items() if name in HASHED_PACKAGES}
    text = json.dumps({"config": relevant, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reusable(path: Path, wanted_hash: str) -> tuple[bool, str]:
    """Whether the result at `path` can stand for a job whose config hash is `wanted_hash`,
    and why (for the log)."""
    if not Path(path).is_file():
        return False, "no result yet"
    try:
        result = read_result(path)
    except Exception as e:  # truncated, foreign or older schema: run again
        return False, f"result unreadable ({type(e).__name__})"
    if result.get("config_hash") != wanted_hash:
        return False, f"configuration changed (hash {result.get('config_hash')} -> {wanted_hash})"
    if result["status"] not in FINAL_STATUSES:
        return False, f"last run ended {result['status']}"
    return True, f"complete ({result['status']}), same configuration hash {wanted_hash}"


def new_result(config: dict, status: str = "error", error: str | None = None) -> dict:
    """A result skeleton for `config`: every required metric present, unknown ones null."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash(config),
        "status": status,
        "error": error,
        "model": config["model"]["name"],
        "method": config["method"]["name"],
        "task": config["task"]["name"],
        "seed": config["seed"],
        "config": config,
        "metrics": {key: None for key in METRIC_KEYS},
        "env": {},
    }


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see the
    old file, or no file, or the complete new one, never a torn one."""
    _write_atomic(path, lambda f: (json.dump(data, f, indent=2, allow_nan=False), f.write("\n")))


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written as atomically as write_json_atomic."""
    _write_atomic(path, lambda f: f.writelines(json.dumps(row, allow_nan=False) + "\n" for row in rows))


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk: name the file that could not be written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_files(folder: Path) -> list[Path]:
    """Every `result.json` under `folder` (temporary `.result.json.*.tmp` files do not match)."""
    return sorted(p for p in Path(folder).rglob(RESULT_NAME) if p.is_file())


def validate(result: dict) -> None:
    """Raise jsonschema.ValidationError if `result` does not follow the schema."""
    import jsonschema

    jsonschema.validate(result, json.loads(SCHEMA_PATH.read_text()))


def read_result(path: Path) -> dict:
    result = json.loads(Path(path).read_text())
    validate(result)
    return result


# --------------------------------------------------------------------------- provenance


def package_versions(names=PACKAGES) -> dict:
    """The installed version of each package of `names` (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict:
    """Commit and dirty flag of the harness checkout, if it runs from one."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict:
    """Device name, CUDA runtime and driver versions (None on CPU)."""
    import torch

    if device is None:  # not known (the job process died before reporting it)
        return {"device": None, "device_name": None, "cuda": None}
    device = torch.device(device)
    info = {"device": str(device), "device_name": cpu_name(), "cuda": None}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["device_name"] = properties.name
        cuda = {"runtime": torch.version.cuda, "driver": None,
                "capability": f"{properties.major}.{properties.minor}",
                "total_memory_mb": properties.total_memory / 2**20,
                "multiprocessors": properties.multi_processor_count,  # a MIG slice has a part of the GPU's
                "uuid": str(properties.uuid)}
        try:
            import pynvml

            pynvml.nvmlInit()
            cuda["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
        info["cuda"] = cuda
    return info


SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_PARTITION",
                   "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME")


def launch_info() -> dict:
    """Where the launcher put the job: the host's GPU slot and visible GPUs, and the SLURM job."""
    slurm = {k.removeprefix("SLURM_").lower(): os.environ[k] for k in SLURM_VARIABLES if k in os.environ}
    slot = os.environ.get("HARNESS_GPU_SLOT")
    return {"gpu_slot": int(slot) if slot is not None else None,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "slurm": slurm or None}


def environment(device, command: str, overrides: list[str], determinism: dict) -> dict:
    import torch

    return {
        "harness_version": package_versions()["harness"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "packages": package_versions(),
        **device_info(device),
        "cpu": {"name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "git": git_state(),
        "command": command,
        "overrides": overrides,
        "determinism": determinism,
        "launch": launch_info(),
        "start_time": now(),
        "end_time": None,
    }
