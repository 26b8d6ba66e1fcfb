"""The sweep report: verdict and Pareto logic on hand-made rows, then whole reports rendered from
fabricated result files (no training), and the command line."""

import json
import logging
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from harness.report import build_report
from harness.report.aggregate import collect
from harness.report.verdict import against_baseline, cannot_conclude, pareto_front, summarize
from harness.results import validate

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- hand-made rows


def rows(*jobs) -> pd.DataFrame:
    """Jobs as (model, method, seed, status, score, peak memory MiB)."""
    return pd.DataFrame([{
        "model": model, "method": method, "seed": seed, "status": status, "metrics.score": score,
        "metrics.peak_memory_mb": memory, "metrics.tokens_per_s": 1000.0,
        "metrics.trainable_params": 10, "metrics.total_params": 1000, "task": "t",
    } for model, method, seed, status, score, memory in jobs])


def verdicts(df, matrices=None) -> dict:
    comparison = against_baseline(summarize(df), matrices)
    return dict(zip(comparison["method"], comparison["verdict"]))


def matrices(**methods) -> dict:
    """Per-example test scores of model "m": method -> one list of 0/1 scores per seed (the job
    folders are named method/seed, as `score_matrices` keys rows by job)."""
    return {("m", method): pd.DataFrame([pd.Series(s, index=[str(i) for i in range(len(s))]) for s in seeds],
                                        index=[f"{method}/{k}" for k in range(len(seeds))])
            for method, seeds in methods.items()}


def test_summary_intervals_one_seed_and_several():
    s = summarize(rows(("m", "a", 0, "ok", 0.5, 100), ("m", "b", 0, "ok", 0.1, 100),
                       ("m", "b", 1, "ok", 0.2, 100), ("m", "b", 2, "ok", 0.6, 100)))
    a, b = s.set_index("method").loc["a"], s.set_index("method").loc["b"]
    assert a["n_scored"] == 1 and a["score_mean"] == 0.5 and math.isnan(a["score_ci"])
    sd = pd.Series([0.1, 0.2, 0.6]).std()
    assert b["score_mean"] == pytest.approx(0.3)
    assert b["score_ci"] == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)  # t(0.975, 2 df)


def test_summary_counts_only_ok_rows_and_skips_missing_scores():
    s = summarize(rows(("m", "a", 0, "ok", 0.4, 100), ("m", "a", 1, "ok", None, 300),
                       ("m", "a", 2, "oom", None, 9999), ("m", "a", 3, "error", 0.9, 5)))
    a = s.iloc[0]
    assert (a["n_jobs"], a["n_ok"], a["n_oom"], a["n_scored"]) == (4, 2, 1, 1)
    assert a["score_mean"] == 0.4 and a["peak_memory_mb"] == 200


def test_verdicts_against_qlora_and_the_memory_thresholds():
    df = rows(*[("m", method, seed, "ok", score + 0.01 * seed, memory)
                for method, score, memory in [("qlora", 0.5, 100), ("fast", 0.8, 50),
                                              ("big", 0.8, 200), ("worse", 0.1, 300),
                                              ("small", 0.1, 50), ("same", 0.5, 104),
                                              ("more", 0.5, 106), ("less", 0.8, 94),
                                              ("notless", 0.8, 96), ("unknown", 0.8, None)]
                for seed in range(3)])
    assert verdicts(df) == {
        "qlora": "baseline", "fast": "beats QLoRA on score and memory",
        "big": "better score, more memory", "worse": "dominated by QLoRA",
        "small": "worse score, less memory", "same": "same score, same memory",
        "more": "dominated by QLoRA",  # same score, more memory
        "less": "beats QLoRA on score and memory", "notless": "better score, same memory",
        "unknown": "better score, unknown memory"}


def test_seed_only_interval_is_welch_and_needs_two_seeds():
    from scipy import stats

    df = rows(("m", "qlora", 0, "ok", 0.1, 100), ("m", "qlora", 1, "ok", 0.3, 100),
              ("m", "lora", 0, "ok", 0.5, 100), ("m", "lora", 1, "ok", 0.6, 100),
              ("m", "lora", 2, "ok", 0.7, 100), ("m", "one", 0, "ok", 0.9, 50))
    c = against_baseline(summarize(df)).set_index("method")
    welch = stats.ttest_ind([0.5, 0.6, 0.7], [0.1, 0.3], equal_var=False)
    ci = welch.confidence_interval(0.95)
    assert c.at["lora", "score_diff"] == pytest.approx(0.4)
    assert (c.at["lora", "diff_lo"], c.at["lora", "diff_hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert c.at["lora", "p_value"] == pytest.approx(welch.pvalue) and c.at["lora", "interval"] == "seed-only"
    assert c.at["lora", "verdict"] == "same score, same memory"  # interval includes 0
    assert math.isnan(c.at["one", "diff_lo"]) and c.at["one", "interval"] == "none (1 seed)"
    assert c.at["one", "verdict"] == "beats QLoRA on score and memory (1 seed: not conclusive)"


def test_identical_seeds_are_never_conclusive():
    """Seeds with identical scores give a zero standard error: not a certain difference."""
    df = rows(("m", "qlora", 0, "ok", 0.50, 100), ("m", "qlora", 1, "ok", 0.50, 100),
              ("m", "lora", 0, "ok", 0.52, 100), ("m", "lora", 1, "ok", 0.52, 100))
    assert verdicts(df)["lora"] == "better score, same memory (no variation seen: not conclusive)"
    # With per-example outcomes, the same one-example gap (50 examples, every seed alike) is noise.
    base = [1] * 25 + [0] * 25
    gap = [1] * 26 + [0] * 24
    m = matrices(qlora=[base, base], lora=[gap, gap])
    c = against_baseline(summarize(df), m).set_index("method")
    assert c.at["lora", "interval"] == "paired" and c.at["lora", "diff_lo"] < 0 < c.at["lora", "diff_hi"]
    assert (c.at["lora", "won"], c.at["lora", "lost"], c.at["lora", "tied"]) == (1, 0, 49)
    assert c.at["lora", "verdict"] == "same score, same memory"
    # Nothing varies at all (every example differs alike): still not conclusive.
    m = matrices(qlora=[[0] * 4, [0] * 4], lora=[[1] * 4, [1] * 4])
    df1 = rows(("m", "qlora", 0, "ok", 0.0, 100), ("m", "qlora", 1, "ok", 0.0, 100),
               ("m", "lora", 0, "ok", 1.0, 100), ("m", "lora", 1, "ok", 1.0, 100))
    assert verdicts(df1, m)["lora"] == "better score, same memory (no variation seen: not conclusive)"


def test_one_seed_baseline_gets_an_example_level_interval_and_says_so():
    base, better = [0] * 60 + [1] * 40, [0] * 20 + [1] * 80
    df = rows(("m", "qlora", 0, "ok", 0.4, 100), ("m", "lora", 0, "ok", 0.8, 100), ("m", "lora", 1, "ok", 0.8, 100))
    c = against_baseline(summarize(df), matrices(qlora=[base], lora=[better, better])).set_index("method")
    assert c.at["lora", "interval"] == "paired, 1 seed" and c.at["lora", "diff_lo"] > 0
    assert c.at["lora", "verdict"] == "better score, same memory (1 seed: interval over test examples only)"
    assert math.isnan(c.at["lora", "seed_diff_lo"])


def test_holm_corrects_for_every_method_compared_with_qlora():
    from harness.report.statistics import holm

    adjusted = holm([0.01, 0.04, 0.03, float("nan"), 0.5])
    assert list(adjusted[[0, 2, 1, 4]]) == pytest.approx([0.04, 0.09, 0.09, 0.5])  # 4 x, 3 x, max(2 x, prev), 1 x
    assert math.isnan(adjusted[3])
    # In a verdict table: two methods with the same p-value 0.03 each; alone each is significant,
    # together (Holm: 2 x 0.03) neither is.
    df = rows(*[("m", method, k, "ok", 0.5, 100) for method in ("qlora", "a", "b") for k in range(2)])
    c = against_baseline(summarize(df)).set_index("method")
    assert c["p_holm"].isna().all()  # identical seeds: no p-values, nothing to correct


def test_no_baseline_all_oom_baseline_and_failed_methods():
    df = rows(("m", "lora", 0, "ok", 0.5, 100), ("m", "full", 0, "oom", None, None),
              ("n", "qlora", 0, "ok", 0.5, 100), ("n", "full", 0, "error", None, None),
              ("o", "qlora", 0, "oom", None, None), ("o", "qlora", 1, "oom", None, None),
              ("o", "lora", 0, "ok", 0.5, 100))
    c = against_baseline(summarize(df))
    assert list(c["verdict"]) == ["not comparable (OOM)", "no QLoRA baseline",
                                  "not comparable (failed)", "baseline",
                                  "no QLoRA baseline", "not comparable (OOM)"]


def points(*p) -> pd.DataFrame:
    """Summary rows as (model, method, peak memory, mean score, jobs ok, jobs run)."""
    return pd.DataFrame(p, columns=["model", "method", "peak_memory_mb", "score_mean", "n_ok",
                                    "n_jobs"])


def test_pareto_dominance_and_ties():
    front = pareto_front(points(
        ("m", "a", 100, 0.5, 2, 2), ("m", "b", 200, 0.9, 2, 2),   # the trade-off: both on it
        ("m", "c", 200, 0.4, 2, 2),                               # more memory, lower score
        ("m", "d", 100, 0.4, 2, 2),                               # same memory, lower score
        ("m", "e", 150, 0.5, 2, 2),                               # same score, more memory
        ("m", "tie", 100, 0.5, 2, 2),                             # exactly equal to a
        ("n", "c", 200, 0.4, 2, 2)))                              # alone on its model
    assert front == {("m", "a"), ("m", "tie"), ("m", "b"), ("n", "c")}


def test_pareto_excludes_oom_failed_and_unscored():
    front = pareto_front(points(
        ("m", "qlora", 100, 0.5, 2, 2), ("m", "oom", 10, 0.9, 1, 2),
        ("m", "failed", math.nan, math.nan, 0, 2), ("m", "noscore", 5, math.nan, 2, 2)))
    assert front == {("m", "qlora")}


def test_cannot_conclude():
    df = rows(("m", "lora", 0, "ok", 0.5, 100), ("n", "qlora", 0, "error", None, None))
    notes = " | ".join(cannot_conclude(df, summarize(df)))
    assert "m: only one method (lora)" in notes
    assert "m: no qlora run" in notes
    assert "m: only one scored seed for lora" in notes
    assert "n: every job failed" in notes
    assert "1 of 2 jobs did not end ok (1 error)" in notes


# --------------------------------------------------------------------------- fabricated sweeps


def fake_result(model: str, method: str, seed: int, status: str = "ok", score: float = 0.5,
                memory: float = 100.0, total: int = 1_000_000) -> dict:
    """A schema-valid result.json for a job that never ran."""
    ok = status == "ok"
    metrics = {
        "peak_memory_mb": memory if status != "error" else None, "memory_source": "cpu_rss",
        "tokens_per_s": 1000.0 + 10 * seed if ok else None, "step_time_ms": 50.0 if ok else None,
        "train_loss_first": 5.0 if ok else None, "train_loss_last": 1.0 + seed if ok else None,
        "train_losses": [5.0, 3.0, 1.0 + seed] if ok else [], "score_before": 0.0 if ok else None,
        "score": score if ok else None, "trainable_params": 1000 if ok else None,
        "total_params": total if ok else None, "weight_bytes": 4 * total if ok else None,
        "score_samples": [{"prompt": "1+1=", "reference": "2", "prediction": "2"}] if ok else [],
        "wall_setup_s": 1.5, "wall_train_s": 10.0 if ok else None, "wall_eval_s": 2.0 if ok else None,
        "predicted_peak_memory_mb": memory * 0.8 if memory else None,  # measured / predicted = 1.25
    }
    result = {
        "schema_version": 2, "config_hash": f"{abs(hash((model, method, seed))):016x}"[:16], "status": status,
        "error": None if ok else ("CUDA out of memory" if status == "oom"
                                  else "RuntimeError: <boom> & bust"),
        "model": model, "method": method, "task": "arithmetic", "seed": seed,
        "config": {"model": {"name": model, "name_or_path": f"org/{model}"},
                   "method": {"name": method}, "task": {"name": "arithmetic"},
                   "train": {"max_steps": 3}, "seed": seed, "sweep_name": "fake-sweep"},
        "metrics": metrics,
        "env": {"harness_version": "0.1.0", "python": "3.11", "platform": "Linux", "hostname": "box",
                "packages": {"torch": "2.13.0", "peft": "0.21.2"}, "device": "cuda:0",
                "device_name": "NVIDIA H200", "cuda": {"runtime": "12.8"}, "cpu": {"cores": 2},
                "git": {"commit": "0123456789abcdef", "dirty": False}, "command": "python -m harness",
                "overrides": [f"model={model}"], "determinism": {"seed": seed},
                "start_time": f"2026-11-29T10:0{seed}:00+00:00",
                "end_time": f"2026-11-29T11:0{seed}:00+00:00"},
    }
    validate(result)
    return result


JOBS = [("small", "qlora", 0.50, 100, 1_000_000), ("small", "lora", 0.55, 120, 1_000_000),
        ("small", "full", 0.90, 200, 900_000), ("big", "qlora", 0.60, 400, 4_000_000),
        ("big", "lora", 0.61, 450, 4_000_000), ("big", "full", 0.95, 900, 3_900_000)]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two seeds of JOBS, big/full seed 0 out of memory, one error job, one job still running,
    a temporary file and a truncated result file (these three are not results)."""
    root = tmp_path / "sweep"
    n = 0
    for model, method, score, memory, total in JOBS:
        for seed in (0, 1):
            status = "oom" if (model, method, seed) == ("big", "full", 0) else "ok"
            job = root / f"{n}_{model}_{method}_s{seed}"
            job.mkdir(parents=True)
            result = fake_result(model, method, seed, status, score + 0.02 * seed, memory, total)
            (job / "result.json").write_text(json.dumps(result))
            n += 1
    other = tmp_path / "sweep2" / "0_small_prompt_s0"
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps(fake_result("small", "prompt", 0, "error")))
    (root / "running").mkdir()
    (root / "running" / ".result.json.x1y2.tmp").write_text('{"schema_version": 2, "sta')
    (root / "torn").mkdir()
    (root / "torn" / "result.json").write_text('{"schema_version": 2, "sta')
    return root


class Page(HTMLParser):
    """Text of every table (by class), every <img src>, and all the text."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.images, self.text, self._table = {}, [], [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("class", "")
            self.tables.setdefault(self._table, [])
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._table is not None and data.strip():
            self.tables[self._table].append(data.strip())


def test_collect_skips_what_is_not_a_result(sweep, caplog):
    with caplog.at_level(logging.WARNING):
        df = collect([sweep, sweep.parent / "sweep2"])
    assert len(df) == 13 and "torn" in caplog.text
    assert all(len(losses) == 3 for losses in df.loc[df["status"] == "ok", "metrics.train_losses"])
    assert list(df["model"])[:2] == ["big", "big"]  # sorted by model, method, seed


def test_build_report(sweep, tmp_path):
    dirs = [sweep, tmp_path / "sweep2"]
    index = build_report(dirs, tmp_path / "out")
    out = index.parent
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 13 and not any("train_losses" in c or "score_samples" in c for c in csv)
    assert csv["metrics.wall_train_s"].notna().any()

    page = Page(index.read_text())
    verdict_text = " ".join(page.tables["verdict"])
    for name in ("small", "big"):
        assert name in page.text
    for method in ("qlora", "lora", "full", "prompt"):
        assert method in page.tables["verdict"] or f"★ {method}" in page.tables["verdict"]
    assert "★ full" in page.tables["verdict"]  # small/full: best score (big/full had an OOM)
    assert "not comparable (failed)" in verdict_text
    assert "fake-sweep" in "".join(page.text)  # the title comes from config.sweep_name

    runs = page.tables["runs"]
    assert "RuntimeError: <boom> & bust" in runs and "CUDA out of memory" in runs
    assert "setup (s)" in runs and str(sweep / "torn") not in runs

    assert len(page.images) == 6  # forest, pareto, speed, scaling, memory model, curves
    # These results predate per-example outcomes: seed-only intervals, and the report says so.
    assert "(seeds only)" in verdict_text and "carry no per-example outcomes" in "".join(page.text)
    verdicts_csv = pd.read_csv(out / "verdicts.csv")
    assert set(verdicts_csv["interval"].dropna()) == {"seed-only", "none (1 seed)"}  # big/full: 1 ok seed
    assert pd.read_csv(out / "examples.csv").empty
    assert "memory_model.png" in page.images
    memory_table = page.tables["runs memmodel"]
    assert "measured / predicted (median)" in memory_table and "1.25" in memory_table
    from matplotlib.image import imread
    for src in page.images:
        png = out / src
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(png).shape[0] > 100

    again = build_report(dirs, tmp_path / "out2")
    assert (out / "results.csv").read_bytes() == (again.parent / "results.csv").read_bytes()
    assert Page(again.read_text()).tables["verdict"] == page.tables["verdict"]
    assert again.read_text() == index.read_text()


def test_report_of_failed_jobs_only(tmp_path):
    for i, (model, status) in enumerate([("huge", "oom"), ("broken", "error")]):
        job = tmp_path / "sweep" / str(i)
        job.mkdir(parents=True)
        result = fake_result(model, "qlora", 0, status, memory=None)
        (job / "result.json").write_text(json.dumps(result))
    page = Page(build_report([tmp_path / "sweep"], tmp_path / "out").read_text())
    assert {"not comparable (OOM)", "not comparable (failed)"} <= set(page.tables["verdict"])
    assert "broken: every job failed; nothing can be said about it." in page.text


def test_a_report_against_another_baseline_names_it_everywhere(sweep, tmp_path):
    """report.baseline=lora (or --baseline lora): "which beats LoRA?" asked of the same results.
    Every verdict, heading, column, caption and figure title names LoRA, none names QLoRA, and
    QLoRA is compared like any other method."""
    from PIL import Image

    index = build_report([sweep], tmp_path / "out", baseline="lora")
    page = Page(index.read_text())
    text = " ".join(page.text)
    assert "QLoRA" not in text and "Verdicts against LoRA" in text and "LoRA (lora) is the baseline" in text
    assert "Δ score vs LoRA [95% CI]" in page.tables["verdict"] and "memory vs LoRA" in page.tables["verdict"]
    verdicts = pd.read_csv(index.parent / "verdicts.csv").set_index(["model", "method"])["verdict"]
    assert verdicts[("small", "lora")] == "baseline" and verdicts[("small", "qlora")] != "baseline"
    # QLoRA against LoRA: 0.50-0.52 against 0.55-0.57, 100 against 120 MiB
    assert verdicts[("small", "qlora")] in ("worse score, less memory", "same score, less memory")
    assert "Score difference vs LoRA" in text
    qlora_run = build_report([sweep], tmp_path / "default")  # the same results, the default baseline
    assert Image.open(index.parent / "forest.png").tobytes() != Image.open(qlora_run.parent / "forest.png").tobytes()
    assert "Verdicts against QLoRA" in " ".join(Page(qlora_run.read_text()).text)


def test_cli_baseline_option(sweep, tmp_path):
    proc = report_cli([sweep, "--baseline", "lora", "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Verdicts against LoRA" in (tmp_path / "out" / "index.html").read_text()
    proc = report_cli([sweep, "--baseline", "dora", "--out", tmp_path / "out2"], tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and errors == [
        "error: --baseline 'dora': no job of that method here (methods: full, lora, qlora)"], proc.stderr
    assert not (tmp_path / "out2").exists()


def test_cli_without_the_default_baseline_renders_as_the_sweep_does(tmp_path):
    """A sweep without QLoRA (`-m method=lora,prompt`) ends with a report whose verdicts say "no
    QLoRA baseline"; the report's command line on the same folder renders that report too, with
    one warning line, and refuses only a baseline the user named."""
    folder = tmp_path / "sweep"
    for i, method in enumerate(["lora", "prompt"]):
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "result.json").write_text(json.dumps(fake_result("small", method, 0)))
    proc = report_cli([folder, "--out", tmp_path / "cli"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: no qlora job here, so the verdicts say there is no baseline; compare with one of the methods here "
        "with --baseline METHOD (lora, prompt)"]
    assert set(pd.read_csv(tmp_path / "cli" / "verdicts.csv")["verdict"]) == {"no QLoRA baseline"}
    as_the_sweep = build_report([folder], tmp_path / "sweep-report", baseline="qlora")  # what the callback calls
    assert (tmp_path / "cli" / "index.html").read_text() == as_the_sweep.read_text()
    proc = report_cli([folder, "--baseline", "qlora", "--out", tmp_path / "named"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "error: --baseline 'qlora': no job of that method here (methods: lora, prompt)"]
    assert not (tmp_path / "named").exists()


def test_a_figure_that_cannot_show_anything_is_left_out_with_one_line(tmp_path):
    """Memory vs model size with one model size is a single point per method: left out, and the
    page says why in one line; the score axes name the task's metric."""
    folder = tmp_path / "sweep"
    for i, method in enumerate(["qlora", "lora"]):
        result = fake_result("small", method, 0)
        result["config"]["task"]["metric"] = "accuracy"
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "result.json").write_text(json.dumps(result))
    index = build_report([folder], tmp_path / "out")
    page = Page(index.read_text())
    assert "scaling.png" not in page.images and not (tmp_path / "out" / "scaling.png").exists()
    assert "Left out: the sweep has one model size, and scaling needs two or more." in page.text
    assert len(page.images) == 5


def test_the_page_shows_each_package_version_once_and_which_jobs_ran_with_which(tmp_path):
    import scipy

    folder = tmp_path / "sweep"
    for i, (method, peft) in enumerate([("qlora", "0.21.2"), ("lora", "0.21.2"), ("full", "0.22.0")]):
        result = fake_result("small", method, 0)
        result["env"]["packages"]["peft"] = peft
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "result.json").write_text(json.dumps(result))
    html = build_report([folder], tmp_path / "out").read_text()
    provenance = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", html))
    assert provenance["torch"] == "2.13.0" and provenance["peft"] == "0.21.2 (2 jobs), 0.22.0 (1 job)"
    assert provenance["report rendered with"].startswith(f"scipy {scipy.__version__}, numpy ")


def test_a_report_that_fails_halfway_leaves_its_folder_as_it_was(sweep, tmp_path, monkeypatch):
    """The report is written into a fresh folder and moved in when every file is written: a
    failure after the CSVs (here: saving the first figure) changes nothing in the report folder,
    and leaves no partial folder beside it; files a render does not write (jobs/) stay."""
    from harness.report import figures

    out = tmp_path / "reports" / "mine"
    (out / "jobs").mkdir(parents=True)
    (out / "jobs" / "kept.json").write_text("{}")
    (out / "results.csv").write_text("the old report\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(fig, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figures, "save", fail)
    with pytest.raises(OSError, match="No space left"):
        build_report([sweep], out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.parent.iterdir()] == ["mine"]
    monkeypatch.undo()
    index = build_report([sweep], out)
    assert index == out / "index.html" and (out / "forest.png").is_file()
    assert (out / "jobs" / "kept.json").read_text() == "{}" and (out / "results.csv").read_text() != "the old report\n"
    assert [p.name for p in out.parent.iterdir()] == ["mine"]


def test_every_figure_keeps_its_labels_and_titles_inside_the_image(sweep):
    """No axis label, tick label, title or legend of any figure is cut off at the image's edge
    (a y-axis label once was): everything drawn lies inside the figure."""
    from harness.report import figures
    from harness.report.verdict import score_matrices, select_learning_rates

    df, _ = select_learning_rates(collect([sweep]))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    one_model = df[df["model"] == "small"]
    for rows in (df, one_model):  # two panels, and one: a narrow figure's legend once covered its title
        summary = summarize(rows)
        front = pareto_front(summary)
        comparison = against_baseline(summary, score_matrices(rows, pd.DataFrame()), "qlora")
        made = {"forest": figures.forest_figure(comparison, summary, "QLoRA", "accuracy"),
                "pareto": figures.pareto_figure(summary, front, "qlora", "accuracy"),
                "speed": figures.speed_figure(summary, "qlora", "accuracy"),
                "scaling": figures.scaling_figure(rows, summary, "qlora"),
                "memory_model": figures.memory_model_figure(rows, summary, "qlora"),
                "curves": figures.curves_figure(rows, summary, "qlora")}
        for name, fig in made.items():
            canvas = FigureCanvasAgg(fig)  # as savefig draws it
            canvas.draw()
            renderer = canvas.get_renderer()
            drawn = fig.get_tightbbox(renderer)  # every artist drawn (inches)
            width, height = fig.get_size_inches()
            tolerance = 2 / fig.dpi  # two pixels
            assert (drawn.x0 >= -tolerance and drawn.y0 >= -tolerance and drawn.x1 <= width + tolerance
                    and drawn.y1 <= height + tolerance), (name, drawn, (width, height))
            # no legend covers a title, a panel or its labels
            others = [a.get_tightbbox(renderer) for a in fig.axes if a.get_visible()]
            if fig._suptitle is not None:
                others.append(fig._suptitle.get_window_extent(renderer))
            for legend in fig.legends:
                box = legend.get_window_extent(renderer)
                assert not any(box.overlaps(other) for other in others), (name, len(rows))
        assert made["pareto"].axes[0].get_ylabel() == "score (test accuracy)"
        assert made["forest"].axes[0].get_xlabel() == "score (test accuracy) difference vs QLoRA"


BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Put in a copy of the page: when the page has loaded, the title lists each image (source,
# loaded, natural width, its place on the page) and the page's size
PROBE = """<script>window.addEventListener("load", () => { document.title = "PROBE " + JSON.stringify({
  images: Array.from(document.images, i => { const r = i.getBoundingClientRect();
    return [i.getAttribute("src"), i.complete && i.naturalWidth > 0, r.left + scrollX, r.top + scrollY]; }),
  size: [document.documentElement.scrollWidth, document.documentElement.scrollHeight]}); });</script>"""


def test_the_committed_report_renders_in_a_real_browser(tmp_path):
    """reports/ci/index.html in headless Chromium (Debian's package; .ci/run installs it):
    every figure loads, and the screenshot shows each figure's PNG at its place, pixel for
    pixel, with text around them (not a blank page)."""
    import os
    import shutil

    import numpy as np
    from PIL import Image

    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium (apt-get install chromium), and CI=1 is set: this check must run in CI")
        pytest.skip("no Chromium here (Debian: apt-get install chromium): the page is not looked at in a browser")
    page = tmp_path / "ci"
    shutil.copytree(REPO / "reports" / "ci", page)
    html = page / "index.html"
    html.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    figures = {p.name for p in (REPO / "reports" / "ci").glob("*.png")}

    def chromium(*args, width=1280, height=1000) -> str:
        proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               "--force-device-scale-factor=1", f"--window-size={width},{height}",
                               "--virtual-time-budget=10000", *args, html.as_uri()],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    title = chromium("--dump-dom").split("<title>PROBE ", 1)[1].split("</title>", 1)[0]
    probe = json.loads(title.replace("&quot;", '"'))
    assert {src for src, *_ in probe["images"]} == figures  # every figure is on the page
    assert all(loaded for _, loaded, *_ in probe["images"]), probe["images"]
    width, height = probe["size"]
    chromium(f"--screenshot={tmp_path / 'page.png'}", width=width, height=height)
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB"), dtype=np.int16)
    assert shot.shape[:2] == (height, width)
    for src, _, left, top in probe["images"]:
        figure = np.asarray(Image.open(page / src).convert("RGB"), dtype=np.int16)
        h, w = figure.shape[:2]
        # the figure's pixels where the browser drew it (a 1 px border, a fraction of a pixel)
        best = min(np.abs(shot[y:y + h, x:x + w] - figure).mean()
                   for x in range(round(left), round(left) + 3) for y in range(round(top) - 1, round(top) + 3)
                   if shot[y:y + h, x:x + w].shape == figure.shape)
        assert best < 1.0, (src, best)
    above = shot[: round(min(top for *_, top in probe["images"]))]
    dark = (above.max(axis=2) < 128).mean()  # text: the title, the verdicts table, captions
    assert dark > 0.01, dark


def test_build_report_without_results(tmp_path):
    with pytest.raises(ValueError, match="no result.json under"):
        build_report([tmp_path], tmp_path / "out")


def report_cli(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("bad", ["/no/such/dir", "empty"])
def test_cli_bad_input(tmp_path, bad):
    (tmp_path / "empty").mkdir()
    proc = report_cli([bad], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and bad in lines[0]
    assert not (tmp_path / "reports").exists()


def test_cli_default_out_is_the_sweep_name(sweep, tmp_path):
    proc = report_cli([sweep], tmp_path)
    assert proc.returncode == 0, proc.stderr
    index = tmp_path / "reports" / "fake-sweep" / "index.html"
    assert proc.stdout.strip() == str(Path("reports/fake-sweep/index.html")) and index.exists()
    assert "warning:" in proc.stderr and "torn" in proc.stderr


def test_scores_of_random_weight_architectures_are_never_compared(tmp_path):
    for i, method in enumerate(["qlora", "lora"]):
        result = fake_result("qwen2.5-7b", method, 0, score=0.3 + i)
        result["metrics"]["score_meaningful"] = False
        validate(result)
        folder = tmp_path / f"{i}_job"
        folder.mkdir()
        (folder / "result.json").write_text(json.dumps(result))
    df = collect([tmp_path])
    assert df["metrics.score"].isna().all() and df["metrics.score_before"].isna().all()
    summary = summarize(df)
    verdicts = against_baseline(summary)
    assert list(verdicts.loc[verdicts["method"] == "lora", "verdict"]) == ["not comparable (no score)"]
    assert any("random weights (model.init=random)" in note for note in cannot_conclude(df, summary))


def test_equal_tuning_effort_picks_each_methods_learning_rate_by_validation_score(tmp_path):
    """Three learning rates per method, two seeds: the best mean validation score wins, its test
    score is what the verdict uses, and a winner at the edge of its grid is flagged."""
    from harness.report.render import build_report
    from harness.report.verdict import select_learning_rates

    # method -> lr -> (validation score, test score); qlora's best is in the middle of its grid
    table = {"qlora": {1e-4: (0.2, 0.25), 2e-4: (0.5, 0.45), 4e-4: (0.3, 0.9)},
             "lora": {1e-4: (0.1, 0.2), 2e-4: (0.2, 0.3), 4e-4: (0.6, 0.5)}}
    i = 0
    for method, by_lr in table.items():
        for lr, (val, test) in by_lr.items():
            for seed in (0, 1):
                result = fake_result("m", method, seed, score=test + seed * 0.01)
                result["metrics"].update(lr=lr, validation_score=val + seed * 0.01)
                validate(result)
                (tmp_path / "s" / f"{i}").mkdir(parents=True)
                (tmp_path / "s" / f"{i}" / "result.json").write_text(json.dumps(result))
                i += 1
    df = collect([tmp_path / "s"])
    kept, choices = select_learning_rates(df)
    chosen = dict(zip(choices["method"], choices["chosen_lr"]))
    assert chosen == {"lora": 4e-4, "qlora": 2e-4}  # by validation, not by test score (0.9 at 4e-4)
    edge = dict(zip(choices["method"], choices["edge_of_grid"]))
    assert edge == {"lora": True, "qlora": False}
    assert len(kept) == 4 and set(kept["metrics.lr"]) == {2e-4, 4e-4}
    summary = summarize(kept)
    assert summary.set_index("method").loc["qlora", "score_mean"] == pytest.approx(0.455)
    assert summary.set_index("method").loc["lora", "score_mean"] == pytest.approx(0.505)

    html = build_report([tmp_path / "s"], tmp_path / "report").read_text()
    assert "Equal tuning effort" in html and "at the edge of its grid: may be under-tuned" in html
    assert len(pd.read_csv(tmp_path / "report" / "results.csv")) == 12  # every job stays in the CSV


def test_one_learning_rate_means_no_selection():
    from harness.report.verdict import select_learning_rates

    df = pd.DataFrame({"model": ["m", "m"], "method": ["lora", "qlora"], "metrics.lr": [1e-3, 1e-3],
                       "status": ["ok", "ok"], "metrics.validation_score": [0.1, 0.2]})
    kept, choices = select_learning_rates(df)
    assert kept is df and choices.empty


def test_tasks_get_their_own_reports_and_forgetting_is_shown(tmp_path):
    """Scores of two tasks are never pooled: one report per task, and a page linking them;
    forgetting, where measured, is a verdict-table column."""
    for task, base in (("gsm8k", 0.3), ("sst2", 0.8)):
        for i, (method, delta, forgot) in enumerate((("qlora", 0.0, 0.01), ("full", 0.1, 0.25))):
            for seed in (0, 1):
                result = fake_result("small", method, seed, score=base + delta + seed / 100)
                result["task"] = result["config"]["task"]["name"] = task
                result["config"]["forgetting"] = {"name": "wikitext"}
                result["metrics"].update(forgetting=forgot, forgetting_loss_before=3.0,
                                         forgetting_loss_after=3.0 + forgot)
                validate(result)
                folder = tmp_path / "sweep" / f"{task}_{method}_{seed}"
                folder.mkdir(parents=True)
                (folder / "result.json").write_text(json.dumps(result))
    index = build_report([tmp_path / "sweep"], tmp_path / "report")
    page = index.read_text()
    assert 'href="gsm8k/index.html"' in page and 'href="sst2/index.html"' in page
    for task, mean in (("gsm8k", "0.305"), ("sst2", "0.805")):
        sub = (tmp_path / "report" / task / "index.html").read_text()
        assert f"task {task}" in sub and "forgetting (Δ loss)" in sub and "+0.250" in sub
        assert mean in sub  # qlora's mean score on this task alone
    assert len(pd.read_csv(tmp_path / "report" / "results.csv")) == 8


def write_outcome_sweep(root: Path, seeds: int = 3) -> None:
    """qlora, lora (30 points better) and prompt (as good as qlora) on 300 examples with
    per-example outcomes (schema 6), before and after training."""
    import numpy as np

    rng = np.random.default_rng(3)
    truth = {"qlora": 0.5, "lora": 0.8, "prompt": 0.5}
    right = rng.random(300)  # example difficulty, shared by every method
    for method, p in truth.items():
        for seed in range(seeds):
            scores = (right < p + rng.normal(0, 0.05, 300)).astype(float)
            job = root / f"{method}_s{seed}"
            job.mkdir(parents=True)
            outcomes = [{"split": "test", "stage": stage, "example_id": i, "score": float(x) if stage == "after" else 0.0,
                         "prediction": "7"} for stage in ("before", "after") for i, x in enumerate(scores)]
            (job / "predictions.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outcomes))
            result = fake_result("small", method, seed, score=float(scores.mean()))
            result["schema_version"] = 6
            result["outcomes"] = {"file": "predictions.jsonl", "rows": len(outcomes)}
            validate(result)
            (job / "result.json").write_text(json.dumps(result))


def test_report_with_per_example_outcomes(tmp_path):
    """Jobs with predictions.jsonl: paired intervals in the verdict table and verdicts.csv,
    examples won and lost, the detectable difference, and examples.csv in long form."""
    import numpy as np

    root = tmp_path / "sweep"
    write_outcome_sweep(root)
    index = build_report([root], tmp_path / "out")
    out = index.parent
    v = pd.read_csv(out / "verdicts.csv").set_index("method")
    for column in ("model", "score_diff", "diff_lo", "diff_hi", "p_value", "p_holm", "seed_diff_lo",
                   "seed_diff_hi", "seed_p_value", "won", "lost", "detectable_diff", "budget"):
        assert column in v.columns or column == "method"
    assert v.at["lora", "interval"] == "paired" and v.at["lora", "diff_lo"] > 0 and v.at["lora", "p_holm"] < 0.05
    assert v.at["lora", "verdict"] == "better score, same memory"
    assert v.at["lora", "won"] > 50 and v.at["lora", "lost"] < 20 and v.at["lora", "n_examples"] == 300
    assert v.at["prompt", "diff_lo"] < 0 < v.at["prompt", "diff_hi"] and v.at["prompt", "verdict"] == "same score, same memory"
    assert v.at["lora", "p_holm"] >= v.at["lora", "p_value"]
    examples = pd.read_csv(out / "examples.csv")
    assert list(examples.columns) == ["job", "model", "method", "seed", "split", "stage", "example_id", "score"]
    assert len(examples) == 9 * 600 and set(examples["stage"]) == {"before", "after"}
    after = examples[examples["stage"] == "after"].groupby("job")["score"].mean()
    jobs = collect([root]).set_index("job_dir")["metrics.score"]
    assert np.allclose(after.sort_index(), jobs.sort_index())  # per-example scores average to the job's
    page = Page(index.read_text())
    text = " ".join(page.text)
    assert "smallest score difference from QLoRA it detects" in text and "carry no per-example" not in text
    assert "forest.png" in page.images


def test_plan_power_from_a_pilot_sweep(tmp_path, capsys):
    from harness import plan

    write_outcome_sweep(tmp_path / "pilot")
    plan.main(["--power", "0.02", "--pilot", str(tmp_path / "pilot")])
    out = capsys.readouterr().out
    assert "small: pilot of 3 QLoRA seed(s) and 300 test examples, 2 method(s) compared (lora, prompt)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert list(rows) == ["1", "2", "3", "5", "10"]
    pairs = plan.pilot_components([tmp_path / "pilot"])["small"]
    assert [m for m, _ in pairs] == ["lora", "prompt"] and all(c.n_a == c.n_b == 3 and c.m == 300 for _, c in pairs)
    mde = {m: plan.median_detectable(pairs, 3, m) for m in plan.POWER_EXAMPLES}
    assert rows["3"][:2] == [f"{100 * mde[100]:.1f}", f"{100 * mde[200]:.1f}"]  # the table prints these
    assert mde[5000] < mde[500] < mde[100] and plan.median_detectable(pairs, 10, 500) < mde[500]
    need = int(rows["10"][-1].replace(",", ""))  # examples for 2 points with 10 seeds
    assert plan.median_detectable(pairs, 10, need) <= 0.02 < plan.median_detectable(pairs, 10, need - 1)


@pytest.mark.parametrize("args, message", [
    (["--power", "2", "--pilot", "{pilot}"], "--power='2': give the score difference"),
    (["--power", "0.01"], "--power DIFF needs --pilot SWEEP_DIR"),
    (["--power", "0.01", "--pilot", "{tmp}/nowhere"], "no such folder"),
    (["--power", "0.01", "--pilot", "{old}"], "no method with per-example outcomes"),
])
def test_plan_power_bad_input(tmp_path, sweep, args, message):
    write_outcome_sweep(tmp_path / "pilot", seeds=1)
    args = [a.format(pilot=tmp_path / "pilot", tmp=tmp_path, old=sweep) for a in args]
    proc = subprocess.run([sys.executable, "-m", "harness.plan", *args], capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("warning: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_memory_note_says_which_span_the_jobs_measured():
    from harness.report.render import memory_note

    def frame(phases):
        return pd.DataFrame({"status": ["ok"] * len(phases), "metrics.memory_source": ["cpu_malloc_in_use"] * len(phases),
                             "metrics.memory_phase": phases})

    schema7 = memory_note(frame(["train", "train"]))
    assert "over training" in schema7 and "schema 6" not in schema7
    old = memory_note(frame([None]))  # results before schema 7 carry no phase
    assert "from just before the model loads" in old and "over training" not in old
    mixed = memory_note(frame(["train", None]))
    assert "over training" in mixed and "for some jobs, from just before the model loads" in mixed


def test_adaloras_final_ranks_are_one_json_cell_of_results_csv(tmp_path):
    ranks = {f"model.layers.{i}.self_attn.{m}.lora_E.default": 4 for i in range(30) for m in ("q_proj", "v_proj")}
    for seed in (0, 1):
        job = tmp_path / "sweep" / str(seed)
        job.mkdir(parents=True)
        result = fake_result("small", "adalora" if seed else "qlora", 0)
        if seed:
            result["metrics"]["adalora_final_ranks"] = ranks
        (job / "result.json").write_text(json.dumps(result))
    csv = pd.read_csv(build_report([tmp_path / "sweep"], tmp_path / "out").parent / "results.csv")
    assert [c for c in csv.columns if "adalora_final_ranks" in c] == ["metrics.adalora_final_ranks"]
    cells = dict(zip(csv["method"], csv["metrics.adalora_final_ranks"]))
    assert json.loads(cells["adalora"]) == ranks and pd.isna(cells["qlora"])
