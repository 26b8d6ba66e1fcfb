"""Shared set-up: offline Hugging Face libraries, a private model cache, config composition."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false")

# absl (imported by rouge_score, the alpaca metric) makes a logging handler bound to the
# sys.stderr of the moment and closes that stream whenever logging's handlers are shut down,
# as Hydra's logging setup does in `run_cli`; under pytest that stream is pytest's capture
# file. Bind it to the real stderr, which absl never closes.
import absl.logging  # noqa: E402

absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__

# Small settings that keep each job to a few seconds on 2 CPU cores.
FAST = ["train.max_steps=20", "train.log_every=10", "task.n_test=20", "task.n_validation=20"]


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

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def run_in_process(out_dir: Path, overrides=()) -> dict:
    """Run one job in this process (no fresh process: faster; memory readings not its own)."""
    from harness.job import run_job

    return run_job(compose(overrides), out_dir)


def cli(args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    """`python -m harness ARGS` in `cwd`, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


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
