"""`python -m harness` as a user runs it: default job, sweeps, help, and bad input."""

import json
import re

import pytest

from conftest import FAST, REPO, cli, results_under, run_cli
from harness import results


def test_default_job_runs_and_says_where_its_result_is(tmp_path):
    """The default job, with its tiny model already built once into the cache (as a model is
    downloaded once), in a fresh `python -m harness`: imports, job server, training, scoring.
    (Its speed is a benchmark's business, not a test's: on a CPU without native bf16 this job
    takes twice as long as on one with it.)"""
    from conftest import compose
    from harness.models import resolve_model_source

    resolve_model_source(compose()["model"])  # build the tiny model into the cache
    proc = cli([], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (result,) = results_under(tmp_path / "outputs")
    results.validate(result)
    assert (result["status"], result["model"], result["method"], result["task"]) == (
        "ok", "tiny-1m", "qlora", "arithmetic")
    assert "result: " + str(tmp_path / "outputs") in proc.stdout + proc.stderr  # says where
    assert result["env"]["command"] == "python -m harness"
    # No library noise (harness/quiet.py): bitsandbytes asking the Hub for a CPU kernel, weight
    # loading bars, PEFT's read of a deprecated transformers attribute.
    for noise in ("kernels-community", "publisher trust", "Loading weights", "is_gradient_checkpointing"):
        assert noise not in proc.stdout + proc.stderr, noise


def test_a_model_build_says_what_and_why_shows_progress_and_clears_abandoned_builds(tmp_path):
    """A tiny model built for the first time: one line says what is built and why, the
    pretraining logs its progress with the time left, and a temporary folder left by a build
    that died (its process gone) is removed, while a running build's is kept."""
    import os
    import socket
    import subprocess

    steps = ["model.tiny.pretrain.steps=40"]  # a short pretraining, into a cache of its own
    cache = tmp_path / "cache" / "tiny-models"
    cache.mkdir(parents=True)
    dead = subprocess.Popen(["true"])  # a process id that has ended
    dead.wait()
    host = socket.gethostname()
    abandoned, running = cache / f".build-{host}-{dead.pid}-abc", cache / f".build-{host}-{os.getpid()}-def"
    abandoned.mkdir()
    running.mkdir()
    proc = cli([*steps, "train.max_steps=2", "eval.before=false", "eval.validation=false", "task.n_test=2"],
               cwd=tmp_path, env={"HARNESS_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "building model tiny-1m: a tiny Llama trained here (4 layers, hidden size 128; its tokenizer, then 40 " \
           "pretraining steps on a synthetic corpus, no download), once, into the cache" in said
    progress = re.findall(r"step (\d+)/40 .* elapsed, ~\S+ left", said)
    assert progress[:3] == ["2", "4", "6"] and progress[-1] == "40"  # every 5%
    assert not abandoned.exists() and running.exists()
    running.rmdir()


def test_sweep_runs_each_job_in_its_own_process_and_ends_with_a_report(tmp_path):
    # One model setting cannot load (a Hub id, offline): those jobs fail, the rest of the sweep
    # runs, the report shows the failures with their reason, and the exit code says "error".
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=lora,prompt", "model.name_or_path=null,no-such-org/no-such-model", "seed=0",
                    *FAST, "train.max_steps=6", "eval.before=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    found = results_under(sweep)
    assert sorted((r["method"], r["status"]) for r in found) == [
        ("lora", "error"), ("lora", "ok"), ("prompt", "error"), ("prompt", "ok")]
    # Each job ran in a fresh process of its own, so each peak memory is its own.
    assert len({r["env"]["pid"] for r in found}) == 4
    assert all(r["metrics"]["wall_total_s"] > 0 for r in found)
    ok = [r for r in found if r["status"] == "ok"]
    for r in ok:
        m = r["metrics"]
        assert m["wall_setup_s"] > 0 and m["wall_train_s"] > 0 and m["wall_eval_s"] > 0
        assert m["wall_setup_s"] + m["wall_train_s"] + m["wall_eval_s"] <= m["wall_total_s"] + 1e-6

    report = sweep / "report"
    import pandas as pd

    table = pd.read_csv(report / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok", "error"}
    html = (report / "index.html").read_text()
    assert "no-such-org/no-such-model" in html  # the failed jobs' reason
    for name in ("lora", "prompt", "tiny-1m"):
        assert name in html
    # After each job, where the sweep is: jobs done of 4, by outcome, time spent and left.
    said = [line.split(" - ", 1)[1] for line in (proc.stdout + proc.stderr).splitlines() if "] - sweep: " in line]
    assert [line.split(" |")[0] for line in said] == [
        "sweep: 1/4 jobs done (ok 1, oom 0, failed 0)", "sweep: 2/4 jobs done (ok 1, oom 0, failed 1)",
        "sweep: 3/4 jobs done (ok 2, oom 0, failed 1)", "sweep: 4/4 jobs done (ok 2, oom 0, failed 2)"]
    assert all("elapsed, ~" in line and line.endswith(" left") for line in said[:3]) and said[3].endswith("done")


def test_a_sweep_whose_report_cannot_be_rendered_says_so_and_exits_1(tmp_path, monkeypatch):
    """As in a fresh environment without scipy (the report's statistics import it): the jobs
    run and keep their results, the sweep ends with one line saying why there is no report and
    where the results are, and exits 1 (Hydra alone turns a callback's exception into a warning
    and exits 0)."""
    import sys

    for name in [m for m in sys.modules if m == "harness.report" or m.startswith("harness.report.")]:
        monkeypatch.delitem(sys.modules, name)  # imported afresh, as by a new process
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` fails as if it were not installed
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "method=lora", "seed=0", *FAST, "train.max_steps=4", "eval.before=false",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    (result,) = results_under(sweep)
    assert result["status"] == "ok"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the report could not be rendered (ModuleNotFoundError: import of scipy halted; None "
                      f"in sys.modules); the results are in {sweep}; rebuild it with: python -m harness.report {sweep}"]
    assert not (sweep / "report").exists() and not list(sweep.glob(".report.rendering-*"))


def test_sweep_progress_counts_skipped_jobs_and_estimates_from_those_that_ran(tmp_path):
    from harness import progress

    assert progress.sweep_size(["seed=0,1,2", "method=lora,qlora", "train.lr=1e-3"], {"model": "tiny-1m,tiny-5m"}) == 12
    assert progress.sweep_size(["model=tiny-1m"], {"model": "tiny-1m,tiny-5m", "seed": "0,1"}) == 2  # the command line wins
    progress.start(tmp_path, 4)
    head = json.loads((tmp_path / progress.PROGRESS_NAME).read_text())
    head["started"] -= 100  # the sweep began 100 s ago
    (tmp_path / progress.PROGRESS_NAME).write_text(json.dumps(head) + "\n")
    assert progress.job_done(tmp_path, "ok", skipped=True).startswith(
        "sweep: 1/4 jobs done (ok 0, oom 0, failed 0, skipped 1) | 1m40s elapsed, time left not known yet")
    line = progress.job_done(tmp_path, "oom")  # one job ran in the 100 s: two are left, ~200 s
    assert line.startswith("sweep: 2/4 jobs done (ok 0, oom 1, failed 0, skipped 1) | 1m40s elapsed, ~3m2")
    assert "diverged 1" in progress.job_done(tmp_path, "diverged")
    assert progress.job_done(tmp_path, "cancelled").endswith("failed 1, skipped 1) | 1m40s elapsed, done")
    assert progress.job_done(tmp_path / "no-sweep", "ok") is None  # a single job: no line


def test_the_time_left_leaves_out_the_time_spent_building_models(tmp_path):
    """A tiny model is pretrained once, before its first job: that time is no job's, and a sweep's
    estimate once counted it in every job (~8m53s left said after 2 of 28 jobs; 2m19s were left)."""
    from harness import progress

    progress.start(tmp_path, 4)
    head = json.loads((tmp_path / progress.PROGRESS_NAME).read_text())
    head["started"] -= 100  # the sweep began 100 s ago
    (tmp_path / progress.PROGRESS_NAME).write_text(json.dumps(head) + "\n")
    progress.model_built(tmp_path, 60.0)  # 60 of the 100 s built a model
    progress.model_built(None, 60.0)  # a single job (no sweep folder): nothing to count
    progress.job_done(tmp_path, "ok")
    line = progress.job_done(tmp_path, "ok")  # two jobs ran in 40 s: two more take ~40 s
    assert line == "sweep: 2/4 jobs done (ok 2, oom 0, failed 0) | 1m40s elapsed, ~40s left", line


def test_help_lists_groups_and_options(tmp_path):
    proc = cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for word in ("model:", "method:", "task:", "qlora", "lora8", "adalora", "prefix", "prompt", "full",
                 "tiny-1m", "tiny-5m", "tiny-13m", "arithmetic", "max_steps"):
        assert word in proc.stdout
    # every method config: one line, its name then a whole sentence (its comment's first line)
    lines = proc.stdout.splitlines()
    for path in (REPO / "conf/method").glob("*.yaml"):
        line = [x for x in lines if x.split()[:1] == [path.stem] and x.startswith("  ")]
        assert len(line) == 1 and line[0].endswith("."), (path.stem, line)


def test_method_that_cannot_apply_is_refused_by_the_job(tmp_path):
    proc = cli(["method=lora", "method.peft.target_modules=[attn_q]"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "method 'lora' cannot apply to this model" in errors[0], proc.stderr
    assert "the model's linear layers: down_proj, gate_proj, k_proj" in errors[0]
    assert not (tmp_path / "outputs").exists()  # nothing left behind


# Refused by the job itself, after it read the model's config (same path as above, in-process).
@pytest.mark.parametrize("args,message", [
    (["method=prompt", "method.peft.num_virtual_tokens=250"],
     "num_virtual_tokens=250 + train.seq_len=64 exceeds the model's max_position_embeddings=256"),
    (["method=full", "+method.quantization.load_in_4bit=true"],
     "a quantized base cannot be fully fine-tuned"),
    (["method=lora", "+method.requires_cuda=true", "device=cpu"],
     "method 'lora' needs a CUDA GPU (device here: cpu); it cannot run on a CPU"),
])
def test_method_that_cannot_apply_is_a_config_error(tmp_path, args, message):
    from conftest import run_in_process
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        run_in_process(tmp_path, args)
    assert not (tmp_path / "result.json").exists()


def test_failing_job_writes_an_error_result_and_exits_1(tmp_path):
    # A Hub id cannot load offline: the job fails after it started, so it is a result.
    proc = run_cli(["model=path", "model.name_or_path=no-such-org/no-such-model", *FAST], cwd=tmp_path)
    assert proc.returncode == 1
    (result,) = results_under(tmp_path / "outputs")
    results.validate(result)
    assert result["status"] == "error" and "no-such-org/no-such-model" in result["error"]
    assert result["metrics"]["score"] is None


def test_named_sweep_with_command_line_overrides(tmp_path):
    """sweep=ci picks the grid; comma lists and keys on the command line override it."""
    proc = run_cli(["-m", "sweep=ci", "method=lora", "model=tiny-1m", "seed=3", *FAST, "train.max_steps=4"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = (tmp_path / "outputs" / "sweeps").iterdir()
    assert sweep_dir.name.startswith("ci_")
    (result,) = results_under(sweep_dir)
    assert (result["model"], result["method"], result["seed"]) == ("tiny-1m", "lora", 3)
    assert result["config"]["sweep_name"] == "ci" and result["config"]["train"]["max_steps"] == 4
    assert (tmp_path / "reports" / "ci" / "index.html").is_file()  # a named sweep's report


def test_the_harness_reads_hydras_flags_as_hydra_does():
    """The checks that run before Hydra read the command line with every flag of Hydra's own
    parser, each taking a value (or an optional one) as in Hydra."""
    from hydra._internal.utils import get_args_parser  # here only: a new Hydra's flags fail this test

    from harness.config import hydra_argument_parser, hydra_arguments

    def flags(parser):
        return {(s, 0 if a.nargs is None and not a.option_strings else a.nargs,
                 a.nargs == 0 or type(a).__name__ in ("_StoreTrueAction", "_VersionAction"))
                for a in parser._actions for s in a.option_strings}

    assert flags(get_args_parser()) == flags(hydra_argument_parser())
    args = hydra_arguments(["-m", "-cn", "other", "method=lora,qlora", "seed=1", "--info"])
    assert args.multirun and args.config_name == "other" and args.info == "all"
    assert args.overrides == ["method=lora,qlora", "seed=1"]
