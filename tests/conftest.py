"""Shared set-up: offline Hugging Face libraries, a private model cache, config composition."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback

REPO = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

# absl (imported by rouge_score, the alpaca metric) makes a logging handler bound to the
# sys.stderr of the moment and closes that stream whenever logging's handlers are shut down,
# as Hydra's logging setup does in `run_cli`; under pytest that stream is pytest's capture
# file. Bind it to the real stderr, which absl never closes.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

# Small settings that keep each job to a few seconds on 2 CPU cores; on the CPU on every host,
# so that a machine with a GPU runs the same suite.
FAST = ["device=cpu", "train.max_steps=20", "train.log_every=10", "task.n_test=20", "task.n_validation=20"]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Tiny models are built once per test session into a private cache (shared by subprocesses)."""
    if "HARNESS_CACHE" not in os.environ:
        os.environ["HARNESS_CACHE"] = str(tmp_path_factory.mktemp("harness-cache"))
    return Path(os.environ["HARNESS_CACHE"])


def compose(overrides=()) -> dict:
    """The resolved job config for `overrides`, as `python -m harness` would build it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    import harness.config  # noqa: F401  (registers the config schema, as every entry point does)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["device=cpu", *overrides])  # the CPU on every host
    return OmegaConf.to_container(cfg, resolve=True)


def run_in_process(out_dir: Path, overrides=()) -> dict:
    """Run one job in this process (no fresh process: faster; memory readings not its own)."""
    import gc

    from harness.job import run_job

    gc.collect()  # what earlier jobs of this process left is freed before this one's baseline
    return run_job(compose(overrides), out_dir)


def cli(args, cwd: Path, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in `cwd`, as a user runs it (`env`: variables to add)."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def cpu_class() -> str:
    """The CPU's class for golden results: the tiny models, pretrained here, come out different
    on CPUs of another vendor or with other matrix and vector units (the math libraries take
    other code paths and add in other orders over 800 steps), and so do the results of
    fine-tuning them. Vendor, then the unit the bf16 matrix products run on: amd-avx2 (AMD
    Milan: bf16 runs in float32), amd-avx512-bf16 (AMD Genoa: no set recorded at 60 steps
    yet), intel-amx (Intel Sapphire Rapids). Measured on one Sapphire Rapids: AMX turned off (ONEDNN_MAX_CPU_ISA) moved
    60-step losses by up to 1.8%, over the golden tolerance; AMD and Intel CPUs of the same
    vector unit pretrain different tiny models (first loss 1.48 against 1.30)."""
    import torch

    vendor = "other"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(line.split(":")[1].strip(), "other")
                break
    if torch.cpu._is_amx_tile_supported():
        return f"{vendor}-amx"
    if torch.cpu._is_avx512_bf16_supported():
        return f"{vendor}-avx512-bf16"
    return f"{vendor}-avx512" if torch.cpu._is_avx512_supported() else f"{vendor}-avx2"


def needs_root(what: str) -> None:
    """Skip a test that needs root (to mount a file system, to start a SLURM cluster), except
    in CI (CI=1), where root is expected and a skip would hide a check that did not run."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{what} needs root, and CI=1 is set: this check must run in CI")
        pytest.skip(f"{what} needs root")


class FillDiskOnJobStart(Callback):
    """Test-only Hydra callback: when job number `job` of a sweep starts (after Hydra has
    written the job's own config files), fill the disk of the sweep folder to the last byte."""

    def __init__(self, job: int):
        self.job = job

    def on_job_start(self, config, **kwargs) -> None:
        if config.hydra.job.num != self.job:
            return
        chunk = b"\0" * (64 << 10)
        with open(Path(config.hydra.sweep.dir) / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\0")
            except OSError:
                pass


def run_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` run inside the test process: the same code from the command
    line on (Hydra, input checks, resume, each job in a fresh process forked from the job
    server, the report), without starting a new interpreter and job server for every call:
    the server is started once per test session. Returns the exit code and what the app
    itself printed (job processes print to the session's own stderr)."""
    import contextlib
    import io
    import signal

    from hydra.core.global_hydra import GlobalHydra

    import harness.__main__ as app

    out, err = io.StringIO(), io.StringIO()
    saved = os.getcwd(), sys.argv, signal.getsignal(signal.SIGTERM)
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = ["harness", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        signal.signal(signal.SIGTERM, saved[2])
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def results_under(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.rglob("result.json"))]
