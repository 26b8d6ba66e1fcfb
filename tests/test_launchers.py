"""Launchers: N jobs at a time on one host (hydra/launcher=local-gpus), and a real single-node
SLURM cluster (hydra/launcher=slurm). Marked `slow` (they start several job servers or
daemons): `python -m pytest -m slow`, which .ci/run runs after the main suite."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, compose, results_under, run_cli

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
import cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def default_model_built(model_cache):
    """Build (pretrain) the default tiny model once in the test process, as a user's first run
    does; the launched jobs then find it in the cache instead of each building it at once."""
    from harness.models import resolve_model_source

    resolve_model_source(compose()["model"])


SWEEP = ["-m", "method=lora,prompt,full,prefix", *FAST, "train.max_steps=10", "eval.before=false"]


def build_default_model():
    from harness.models import resolve_model_source

    resolve_model_source(compose()["model"])  # built once, before jobs start in parallel


def harness(args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def by_method(folder: Path) -> dict:
    return {r["method"]: r for r in results_under(folder)}


def test_local_gpus_runs_two_jobs_at_a_time_each_on_its_own_slot(tmp_path):
    build_default_model()
    sweep = tmp_path / "two"
    proc = harness([*SWEEP, "hydra/launcher=local-gpus", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = by_method(sweep)
    assert set(two) == {"lora", "prompt", "full", "prefix"} and all(r["status"] == "ok" for r in two.values())
    sweeps = {"one": tmp_path / "one", "two": sweep}
    assert len({r["env"]["pid"] for r in two.values()}) == 4  # each job in its own process
    # two at a time, each on its own slot: a job takes the first free slot, so slot 1 is taken
    # only by a job that started while another held slot 0 (run one at a time, every job would
    # get slot 0; start and end times, to the second, cannot tell jobs of a second apart)
    assert {r["env"]["launch"]["gpu_slot"] for r in two.values()} == {0, 1}
    cores = len(os.sched_getaffinity(0))
    for r in two.values():
        launch = r["env"]["launch"]
        assert launch["gpu_slot"] in (0, 1) and launch["cuda_visible_devices"] == ""  # no GPU here: CPU jobs see none
        assert r["env"]["cpu"]["torch_threads"] == max(1, cores // 2)  # no GPU: two jobs share the cores
    # the same sweep with the default launcher: the same results and report
    assert run_cli([*SWEEP, f"hydra.sweep.dir={sweeps['one']}"], cwd=tmp_path).returncode == 0
    for method, r in by_method(sweeps["one"]).items():
        assert r["env"]["cpu"]["torch_threads"] == cores  # one job at a time: all of them
        assert r["metrics"]["train_losses"] == two[method]["metrics"]["train_losses"]
        assert r["metrics"]["score"] == two[method]["metrics"]["score"]
        assert r["config_hash"] == two[method]["config_hash"]
    import pandas as pd

    columns = ["model", "method", "seed", "status", "metrics.score", "metrics.train_loss_last"]
    a, b = (pd.read_csv(s / "report" / "results.csv")[columns] for s in sweeps.values())
    assert a.equals(b)


def kill_task(array_job: str, task: str) -> list[int]:
    """SIGKILL every Python process of one array task (what the kernel's OOM killer or a dying
    node does): submitit's worker gets no chance to write its result."""
    import psutil

    killed = []
    for process in psutil.process_iter(["name"]):
        try:
            env = process.environ()
            if (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")) == (array_job, task) \
                    and "python" in (process.info["name"] or ""):
                process.kill()
                killed.append(process.pid)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return killed


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = cluster.why_not_available()
    if reason and os.environ.get("CI"):  # in CI the cluster must start: a skip would hide the check
        pytest.fail(f"no SLURM test cluster, and CI=1 is set: {reason}")
    if reason:
        pytest.skip(f"no SLURM test cluster: {reason}")
    running = cluster.Cluster(tmp_path_factory.mktemp("slurm-state"))
    try:
        yield running.start()
    finally:
        running.stop()  # also when the test fails


def test_slurm_array_sweep_and_a_job_killed_hard(slurm, tmp_path):
    """A 3-job sweep through submitit on a real (single-node) SLURM: the first job is killed
    with SIGKILL while it trains; the others finish, the sweep says which job died, the
    report is rendered, and a rerun (here with the default launcher) runs only that job."""
    build_default_model()
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PATH": f"{REPO / 'tests' / 'slurm'}:{os.environ['PATH']}"}  # test-only sacct
    args = ["-m", "method=full,lora,prompt", *FAST, "train.max_steps=40", "eval.before=false",
            "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=2",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        victim = sweep / "0_tiny-1m_full_arithmetic_s0" / "job.log"
        deadline = time.monotonic() + 180
        while not (victim.exists() and "step" in victim.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the first job never started training"
            time.sleep(0.1)
        array = subprocess.run(["squeue", "-h", "-o", "%F"], capture_output=True, text=True).stdout.split()[0]
        assert kill_task(array, "0"), "found no process of the first array task"
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a job died without a result" in errors[0], err[-3000:]
    done = by_method(sweep)
    assert set(done) == {"lora", "prompt"} and all(r["status"] == "ok" for r in done.values())
    for r in done.values():  # where it ran: the SLURM array job and task
        assert r["env"]["launch"]["slurm"]["array_job_id"] == array
        assert r["env"]["launch"]["slurm"]["array_task_id"] in ("1", "2")
    assert (sweep / "report" / "index.html").is_file()

    rerun = run_cli([*args[:-7], f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = by_method(sweep)
    assert after["full"]["status"] == "ok" and after["full"]["env"]["launch"]["slurm"] is None
    for method in ("lora", "prompt"):  # not rerun
        assert after[method]["env"]["start_time"] == done[method]["env"]["start_time"]
