"""Short forms of benchmarks/sweep_load.py: a long sweep's launcher stays flat, and a sweep
killed hard at random moments resumes to one whole result per job (the full runs' figures:
benchmarks/results/sweep_load.md)."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_load  # noqa: E402


@pytest.mark.slow  # 50 real jobs: run by .ci/run with -m slow
def test_a_50_job_sweep_keeps_the_launcher_flat_and_leaves_nothing_running(tmp_path):
    run = sweep_load.load(50, "default", tmp_path, every=10)
    assert run["exit_code"] == 0 and run["whole_results"] == run["result_files"] == run["report_rows"] == 50, run
    assert not run["processes_left"], run
    assert len(run["readings"]) >= 3, run
    assert run["main_fd_growth"] <= 0 and run["helpers_fd_growth"] <= 0, run["readings"]
    assert run["helpers_rss_mib_per_100_jobs"] <= sweep_load.LEAK_MIB_PER_100_JOBS, run["readings"]
    if run["main_rss_mib_per_100_jobs"] > sweep_load.LEAK_MIB_PER_100_JOBS:
        # Known and open (issue 18): the launching process grows about 14 MiB per 100 jobs
        # (measured 2026-12-02, 50 jobs); not yet traced (Hydra keeps each job's return and
        # configs for the whole sweep). Marked, not hidden: this test reports it as xfail.
        pytest.xfail(f"launching process grows {run['main_rss_mib_per_100_jobs']} MiB per 100 jobs")
    assert run["holds"]


@pytest.mark.slow  # a real sweep SIGKILLed three times: run by .ci/run with -m slow
def test_a_sweep_killed_hard_at_random_moments_resumes_to_one_whole_result_per_job(tmp_path):
    run = sweep_load.kills(12, 3, tmp_path, seed=1, delays_s=(8.0, 30.0))
    assert run["kills"] == 3 and run["last_exit_code"] == 0, run
    assert run["whole_results"] == run["result_files"] == 12 and not run["torn_results"], run
    assert not run["rerun_after_finish"] and not run["processes_left"], run
