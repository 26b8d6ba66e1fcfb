"""Short forms of benchmarks/sweep_load.py: a long sweep's launcher stays flat, and a sweep
killed hard at random moments resumes to one whole result per job (the full runs' figures:
benchmarks/results/sweep_load.md)."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_load  # noqa: E402


@pytest.mark.slow  # 50 real jobs, read every 5 (descriptor counts vary with the moment: a floor over a third of them): run by .ci/run with -m slow
def test_a_50_job_sweep_keeps_the_launcher_flat_and_leaves_nothing_running(tmp_path):
    run = sweep_load.load(50, "default", tmp_path, every=5)
    assert run["exit_code"] == 0 and run["whole_results"] == run["result_files"] == run["report_rows"] == 50, run
    assert not run["processes_left"], run
    assert len(run["readings"]) >= 8, run
    assert run["main_fd_growth"] <= 0 and run["helpers_fd_growth"] <= 0, run["readings"]
    assert run["helpers_rss_mib_per_100_jobs"] <= sweep_load.LEAK_MIB_PER_100_JOBS, run["readings"]
    # The launching process grew 14 MiB per 100 jobs until Hydra's kept copies of each job's
    # config were dropped (harness.callbacks.ReleaseJobConfigs): measured 1.6 MiB after it.
    assert run["main_rss_mib_per_100_jobs"] <= sweep_load.LEAK_MIB_PER_100_JOBS, run["readings"]
    assert run["holds"]


@pytest.mark.slow  # a real sweep SIGKILLed three times: run by .ci/run with -m slow
def test_a_sweep_killed_hard_at_random_moments_resumes_to_one_whole_result_per_job(tmp_path):
    run = sweep_load.kills(12, 3, tmp_path, seed=1)
    assert run["kills"] == 3 and run["last_exit_code"] == 0, run
    assert run["whole_results"] == run["result_files"] == 12 and not run["torn_results"], run
    assert not run["rerun_after_finish"] and not run["processes_left"], run


def test_the_release_callback_runs_after_every_other_at_a_jobs_end():
    """Hydra calls on_job_end in reverse order of registration: the callback that empties each
    ended job's JobReturn must be registered first, so that every other one sees it whole."""
    from hydra import compose, initialize_config_dir

    from harness.callbacks import ReleaseJobConfigs

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        callbacks = compose("config", return_hydra_config=True).hydra.callbacks
    assert list(callbacks)[0] == "release"
    assert callbacks["release"]["_target_"] == f"{ReleaseJobConfigs.__module__}.ReleaseJobConfigs"

    class Return:
        cfg, hydra_cfg, return_value = {"big": 1}, {"hydra": 1}, "result.json"

    job_return = Return()
    ReleaseJobConfigs().on_job_end(config=None, job_return=job_return)
    assert job_return.cfg is None and job_return.hydra_cfg is None and job_return.return_value == "result.json"
