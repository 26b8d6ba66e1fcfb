"""A long sweep of tiny jobs holds up: flat memory and descriptors, and resumes after kills.

    python benchmarks/sweep_load.py                        # the committed run: 500 jobs per launcher, 20 kills
    python benchmarks/sweep_load.py --jobs 50 --kill-jobs 20 --kills 3 --out /tmp/x   # a short look

Load: a sweep of N tiny jobs (tiny-1m, LoRA, 2 optimizer steps, 5 test problems, no score
before training; seeds 0..N-1) through the default launcher, then through
hydra/launcher=local-gpus (one slot: no GPU here). Every 50 finished jobs it reads the memory
(RSS) and open file descriptors of the launching process, and of its long-lived helpers (the
job server; Hydra's joblib worker). A leak is a growth of more than 4 MiB per 100 jobs (a
least-squares slope over the readings after the first) or of any descriptor (the fewest open
in the last third of the readings against the fewest in the first third). After the sweep: N whole results, each job's exactly once; no process of
the sweep left running; the report's results.csv has N rows.

Kills: a sweep of K tiny jobs, its whole process group SIGKILLed at random moments (drawn in
the sweep's progress: a random count of finished jobs, then a random fraction of a job's time),
then the same command again (it resumes), until it ends by itself.
At the end every job has exactly one whole result, and no job that had finished ran again
(each finished job keeps the process id and start time it first finished with).

Figures go to benchmarks/results/sweep_load.md (and .json), with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EVERY = 50  # jobs between two readings
LEAK_MIB_PER_100_JOBS = 4.0
TINY_JOB = ["model=tiny-1m", "method=lora", "train.max_steps=2", "train.warmup_steps=1", "measure.warmup_steps=1",
            "task.n_test=5", "task.n_validation=5", "eval.before=false", "eval.validation=false"]
LAUNCHERS = {"default": [], "local-gpus": ["hydra/launcher=local-gpus", "hydra.launcher.n_jobs=1"]}


def sweep_args(n_jobs: int, sweep_dir: Path, launcher: str = "default") -> list[str]:
    return ["-m", f"seed=range(0,{n_jobs})", *TINY_JOB, *LAUNCHERS[launcher], f"hydra.sweep.dir={sweep_dir}",
            f"report.out={sweep_dir / 'report'}"]


def start(args: list[str], tag: str, log) -> subprocess.Popen:
    """`python -m harness ARGS` in a process group of its own, every process under it marked
    by the environment variable HARNESS_LOAD_TAG=tag (to find what outlives it)."""
    env = {**os.environ, "HARNESS_LOAD_TAG": tag}
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def tagged(tag: str) -> list[psutil.Process]:
    """The live processes carrying HARNESS_LOAD_TAG=tag."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("HARNESS_LOAD_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def left_after(tag: str, grace_s: float = 10.0) -> list[int]:
    """The processes of a finished (or killed) sweep still running `grace_s` seconds after it:
    its job server exits once it sees its parent gone, within a second or two."""
    end = time.monotonic() + grace_s
    while (left := tagged(tag)) and time.monotonic() < end:
        time.sleep(0.2)
    return [p.pid for p in left]


def is_job(process: psutil.Process) -> bool:
    """A job process: forked from a job server (whose command line is multiprocessing's forkserver)."""
    try:
        parent = process.parent()
        return parent is not None and "forkserver" in " ".join(parent.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def reading(main: psutil.Process, wait_s: float = 5.0) -> dict:
    """RSS (MiB) and open descriptors of the launching process and of its long-lived helpers
    (every process under it but the jobs and their short-lived children), read between two
    jobs: while a job runs, the processes hold its pipes, so that the count depends on the
    moment. It looks every 10 ms for a moment with no job process alive (each job's end leaves
    one, while the next is composed), for up to `wait_s` seconds, else takes the last look."""
    end = time.monotonic() + wait_s
    while True:
        look = _look(main)
        if look["jobs_running"] == 0 or time.monotonic() > end:
            break
        time.sleep(0.01)
    for _ in range(5):  # a file opened and closed between jobs (a log, the progress file): the fewest
        time.sleep(0.005)
        again = _look(main)
        if again["jobs_running"]:
            break
        look["main_fds"], look["helpers_fds"] = (min(look["main_fds"], again["main_fds"]),
                                                 min(look["helpers_fds"], again["helpers_fds"]))
    return look


def _look(main: psutil.Process) -> dict:
    helpers, jobs = [], 0
    for child in main.children(recursive=True):
        try:  # a job may end while it is looked at
            if is_job(child):
                jobs += 1
            elif not any(is_job(p) for p in child.parents()):
                helpers.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    out = {"main_rss_mib": main.memory_info().rss / 2**20, "main_fds": main.num_fds(),
           "helpers_rss_mib": 0.0, "helpers_fds": 0, "helpers": 0, "jobs_running": jobs}
    for helper in helpers:
        try:
            out["helpers_rss_mib"] += helper.memory_info().rss / 2**20
            out["helpers_fds"] += helper.num_fds()
            out["helpers"] += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def results(sweep_dir: Path) -> list[Path]:
    return sorted(sweep_dir.glob("*/result.json"))


def whole(sweep_dir: Path) -> dict[str, dict]:
    """job folder -> its result, for the results that parse as JSON and say `ok`."""
    out = {}
    for path in results(sweep_dir):
        try:
            result = json.loads(path.read_text())
        except ValueError:
            continue
        if result.get("status") == "ok":
            out[path.parent.name] = result
    return out


def slope_per_100(jobs: list[int], values: list[float]) -> float:
    if len(jobs) < 2:
        return 0.0
    return float(np.polyfit(jobs, values, 1)[0]) * 100


def fd_growth(counts: list[int]) -> int:
    """Descriptors gained over the sweep: the fewest open in the last third of the readings
    against the fewest in the first third. A reading taken while a job starts sees its pipes
    for a moment; a leak raises the floor that every reading stands on."""
    if len(counts) < 2:
        return 0
    third = max(1, len(counts) // 3)
    return min(counts[-third:]) - min(counts[:third])


def load(n_jobs: int, launcher: str, work: Path, every: int = EVERY) -> dict:
    """One sweep of `n_jobs` tiny jobs through `launcher`, read every `every` jobs."""
    sweep_dir = work / f"load-{launcher}"
    tag = uuid.uuid4().hex
    started = time.monotonic()
    with open(work / f"load-{launcher}.log", "w") as log:
        proc = start(sweep_args(n_jobs, sweep_dir, launcher), tag, log)
        main = psutil.Process(proc.pid)
        readings, next_at = [], every
        while proc.poll() is None:
            done = len(results(sweep_dir))
            if done >= next_at and done < n_jobs:
                try:
                    readings.append({"jobs": done, **reading(main)})
                except psutil.NoSuchProcess:  # the launching process itself has ended
                    break
                next_at = (done // every + 1) * every
            time.sleep(0.2)
        proc.wait()
    wall = time.monotonic() - started
    left = left_after(tag)
    finished = whole(sweep_dir)
    report_rows = 0
    csv = sweep_dir / "report" / "results.csv"
    if csv.is_file():
        import pandas as pd

        report_rows = len(pd.read_csv(csv))
    later = readings[1:] or readings
    jobs = [r["jobs"] for r in later]
    out = {
        "launcher": launcher, "jobs": n_jobs, "exit_code": proc.returncode, "wall_s": round(wall, 1),
        "s_per_job": round(wall / n_jobs, 2), "whole_results": len(finished),
        "result_files": len(results(sweep_dir)), "report_rows": report_rows, "processes_left": left,
        "readings": readings,
        "main_rss_mib_per_100_jobs": round(slope_per_100(jobs, [r["main_rss_mib"] for r in later]), 2),
        "helpers_rss_mib_per_100_jobs": round(slope_per_100(jobs, [r["helpers_rss_mib"] for r in later]), 2),
        "main_fd_growth": fd_growth([r["main_fds"] for r in readings]),
        "helpers_fd_growth": fd_growth([r["helpers_fds"] for r in readings]),
    }
    out["holds"] = bool(
        out["exit_code"] == 0 and out["whole_results"] == n_jobs == out["result_files"] == out["report_rows"]
        and not left and out["main_rss_mib_per_100_jobs"] <= LEAK_MIB_PER_100_JOBS
        and out["helpers_rss_mib_per_100_jobs"] <= LEAK_MIB_PER_100_JOBS
        and out["main_fd_growth"] <= 0 and out["helpers_fd_growth"] <= 0)
    return out


def kills(n_jobs: int, n_kills: int, work: Path, seed: int = 0) -> dict:
    """The sweep of `n_jobs` tiny jobs, SIGKILLed `n_kills` times at random moments and rerun.

    The moments are drawn in the sweep's own progress, so that they spread over the whole
    sweep on a fast CPU as on a slow one: n_kills job counts drawn at random (sorted; at most
    n_jobs - 2, so that jobs are left to kill), and for each a fraction of a job's time. Run i
    is killed that fraction of a job's time (the median seconds between two results so far;
    2 s before any) after its count of result files is reached: during the command's checks
    before its first job when the count is already there, else in whichever phase of a job
    (loading, training, writing its result) that moment falls."""
    rng = random.Random(seed)
    targets = sorted(rng.randrange(0, max(1, n_jobs - 1)) for _ in range(n_kills))
    sweep_dir = work / "kills"
    args = sweep_args(n_jobs, sweep_dir)
    first_finish: dict[str, tuple] = {}  # job folder -> (pid, start time) of its first whole result
    rerun_after_finish, runs, killed_at, gaps, left = [], 0, [], [], []
    started = time.monotonic()
    with open(work / "kills.log", "w") as log:
        while True:
            tag = uuid.uuid4().hex
            proc = start(args, tag, log)
            runs += 1
            if len(killed_at) < n_kills:
                target, fraction = targets[len(killed_at)], rng.random()
                done, seen_at, kill_at = len(results(sweep_dir)), time.monotonic(), None
                while proc.poll() is None:
                    now_done = len(results(sweep_dir))  # result files appear whole (written by rename)
                    if now_done > done:
                        gaps.append((time.monotonic() - seen_at) / (now_done - done))
                        done, seen_at = now_done, time.monotonic()
                    if kill_at is None and done >= target:
                        kill_at = time.monotonic() + fraction * (float(np.median(gaps)) if gaps else 2.0)
                    if kill_at is not None and time.monotonic() >= kill_at:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        killed_at.append({"after_s": round(time.monotonic() - started, 1), "target": target,
                                          "fraction": round(fraction, 2), "whole_results": len(whole(sweep_dir))})
                        break
                    time.sleep(0.05)
            proc.wait()
            left += left_after(tag)  # a killed job's process dies with its server (PR_SET_PDEATHSIG)
            for job, result in whole(sweep_dir).items():
                key = (result["env"]["pid"], result["env"]["start_time"])
                if job in first_finish and first_finish[job] != key:
                    rerun_after_finish.append(job)
                first_finish.setdefault(job, key)
            if proc.returncode == 0 and (len(killed_at) >= n_kills or len(whole(sweep_dir)) == n_jobs):
                break
            if runs > n_kills + 5:
                break
    torn = []
    for path in results(sweep_dir):
        try:
            json.loads(path.read_text())
        except ValueError:
            torn.append(str(path))
    finished = whole(sweep_dir)
    out = {"jobs": n_jobs, "kills": len(killed_at), "runs": runs, "wall_s": round(time.monotonic() - started, 1),
           "killed_at": killed_at, "whole_results": len(finished), "result_files": len(results(sweep_dir)),
           "torn_results": torn, "rerun_after_finish": sorted(set(rerun_after_finish)),
           "processes_left": left, "last_exit_code": proc.returncode}
    out["holds"] = bool(len(finished) == n_jobs == out["result_files"] and not torn and not rerun_after_finish
                        and not left and proc.returncode == 0 and len(killed_at) == n_kills)
    return out


def machine() -> dict:
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__}


def markdown(report: dict) -> str:
    lines = ["# Sweep load and kill loops", "",
             f"Command: `{report['command']}` ({report['date']}; {report['machine']['cores']} CPU cores, "
             f"torch {report['machine']['torch']}). Tiny jobs: `{' '.join(TINY_JOB)}`.", "",
             "## Load", "",
             "| launcher | jobs | exit | whole results | report rows | s/job | launcher RSS MiB/100 jobs | "
             "helpers RSS MiB/100 jobs | launcher fd growth | helpers fd growth | processes left | holds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["load"]:
        lines.append(f"| {r['launcher']} | {r['jobs']} | {r['exit_code']} | {r['whole_results']} | {r['report_rows']} "
                     f"| {r['s_per_job']} | {r['main_rss_mib_per_100_jobs']} | {r['helpers_rss_mib_per_100_jobs']} "
                     f"| {r['main_fd_growth']} | {r['helpers_fd_growth']} | {len(r['processes_left'])} "
                     f"| {'yes' if r['holds'] else 'NO'} |")
    lines += ["", f"A leak fails above {LEAK_MIB_PER_100_JOBS:g} MiB per 100 jobs (least-squares slope over the "
              f"readings every {EVERY} jobs, after the first) or at any descriptor more in the floor of the last "
              "third of the readings than in that of the first third (a reading during a job's start sees its "
              "pipes for a moment).", "", "Readings (jobs: launcher RSS MiB / fds; helpers RSS MiB / fds):", ""]
    for r in report["load"]:
        cells = ", ".join(f"{x['jobs']}: {x['main_rss_mib']:.0f}/{x['main_fds']}; {x['helpers_rss_mib']:.0f}/"
                          f"{x['helpers_fds']}" for x in r["readings"])
        lines.append(f"- {r['launcher']}: {cells}")
    k = report.get("kills")
    if k:
        lines += ["", "## Kills", "",
                  f"A sweep of {k['jobs']} jobs SIGKILLed (whole process group) {k['kills']} times at random moments "
                  f"and rerun each time: {k['runs']} runs, {k['wall_s']} s. At the end: {k['whole_results']} whole "
                  f"results of {k['jobs']} ({k['result_files']} result files), {len(k['torn_results'])} torn, "
                  f"{len(k['rerun_after_finish'])} finished jobs run again, {len(k['processes_left'])} processes "
                  f"left; holds: {'yes' if k['holds'] else 'NO'}.", "",
                  "Kill moments (seconds after the first start: whole results by then): "
                  + ", ".join(f"{x['after_s']}: {x['whole_results']}" for x in k["killed_at"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500, help="jobs of each load sweep")
    parser.add_argument("--launchers", default="default,local-gpus")
    parser.add_argument("--kill-jobs", type=int, default=100, help="jobs of the sweep that is killed")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for sweep_load.md and .json")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    with tempfile.TemporaryDirectory(prefix="sweep-load-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "harness", *TINY_JOB, f"hydra.run.dir={work / 'warm'}"], cwd=REPO,
                       check=True, capture_output=True)  # the tiny model built once, before anything is read
        report = {"command": "python benchmarks/sweep_load.py " + " ".join(sys.argv[1:]),
                  "date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "load": [load(args.jobs, launcher, work) for launcher in args.launchers.split(",") if launcher]}
        if args.kills:
            report["kills"] = kills(args.kill_jobs, args.kills, work)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_load.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "sweep_load.md").write_text(markdown(report))
    print(markdown(report))
    holds = all(r["holds"] for r in report["load"]) and report.get("kills", {"holds": True})["holds"]
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
