"""Write the report folder: results.csv, the figures as PNG, and index.html."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup

from harness.report import figures
from harness.report.aggregate import collect, collect_outcomes, write_csv
from harness.config import method_title
from harness.results import package_versions
from harness.report.verdict import (against_baseline, cannot_conclude, detectable_by_model, pareto_front,
                                    score_matrices, select_learning_rates, summarize)

BASELINE = "qlora"  # the default of report.baseline
MEMORY_SOURCES = {
    "cuda_max_reserved": "torch's peak reserved CUDA memory minus its baseline taken just before "
                         "the model loads",
    "cuda_max_reserved_plus_paged": "torch's peak reserved CUDA memory minus its baseline taken just before "
                                    "the model loads, plus bitsandbytes' paged optimizer states (CUDA managed "
                                    "memory, which torch's allocator does not see)",
    "cpu_malloc_in_use": "the peak of the bytes glibc's malloc had handed out (mallinfo2, sampled: every "
                         "tensor and library buffer) minus its baseline taken just before the model loads, "
                         "plus the model weights mapped from the checkpoint file (loaded without a copy)",
    "cpu_rss": "the peak resident memory (RSS) of the job's process minus its baseline taken just "
               "before the model loads",
}
WALL = [("metrics.wall_setup_s", "setup (s)"), ("metrics.wall_train_s", "train (s)"),
        ("metrics.wall_eval_s", "eval (s)")]
FIGURES = [
    ("forest.png", "Score difference vs {base}",
     "Each method's test-score difference from {base} on the same model with its 95% interval "
     "(thick: paired over test examples and seeds; thin grey below it: over seeds only, Welch, which "
     "treats the test set as fixed). Hollow dots: no per-example outcomes, so the seed-only interval. "
     "Bars stop at -1 and +1, the range of a difference of scores. "
     "Intervals are per comparison, before Holm's correction."),
    ("pareto.png", "Score vs peak memory",
     "Each point is one method's mean over its ok seeds; bars are 95% intervals of the mean "
     "(none with one seed; cut at 0 and 1, the range of a score). The dashed step line joins the Pareto front: no other method has "
     "both less memory and a higher score. Hollow markers: methods with a failed or out-of-memory "
     "job, which are never on the front. {base}, the baseline, is the black-edged star."),
    ("speed.png", "Score vs speed",
     "Training throughput (non-padding tokens per second, after the warm-up steps) against the "
     "score; further right trains faster."),
    ("scaling.png", "Memory vs model size",
     "Mean peak memory of each method against the model's parameter count, on log-log axes. "
     "Dotted lines mark common GPU sizes; red crosses at the top are jobs that ran out of memory (those that did so before their model's "
     "size was known are named in red)."),
    ("memory_model.png", "Measured vs predicted memory",
     "Each job's measured peak memory against the analytic memory model's prediction for it "
     "(harness/memory_model.py, from the config alone). The solid line is equality, the dotted "
     "lines +-25%. Red crosses: out-of-memory jobs, at the memory they had reached."),
    ("curves.png", "Training curves",
     "Training loss at every optimizer step, averaged over each method's ok seeds."),
]


VIEWS = {  # budget view: heading, caption
    "default": ("Verdicts against {base}", "Every method with its own settings (conf/method/)."),
    "params": ("At equal trainable parameters",
               "Jobs run with budget=params: each method's size knob (LoRA rank, AdaLoRA's initial rank, "
               "virtual tokens, VeRA's rank) set so its trainable-parameter count is closest to {base}'s on "
               "the same model. Methods that cannot be sized to it ran with their own settings and are not "
               "compared."),
    "memory": ("At equal memory",
               "Jobs run with budget=memory: each method's size knob set to the largest value whose "
               "predicted peak memory fits in {base}'s predicted peak for the same model, batch and sequence "
               "length. Methods that do not fit even at size 1 ran with their own settings and are not "
               "compared."),
}


def sweep_name(df: pd.DataFrame) -> str | None:
    """The sweep name all results share (`config.sweep_name`), else None."""
    names = df["config.sweep_name"].dropna().unique() if "config.sweep_name" in df else []
    return str(names[0]) if len(names) == 1 else None


def default_title(df: pd.DataFrame, sweep_dirs: list[Path]) -> str:
    return sweep_name(df) or ", ".join(Path(d).resolve().name for d in sweep_dirs)


def _num(x, fmt: str = "{:,.1f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _score(r) -> str:
    if r["n_scored"] == 0:
        return "—"
    if r["n_scored"] == 1:
        return f"{r['score_mean']:.3f} (1 seed, no interval)"
    return f"{r['score_mean']:.3f} ± {r['score_ci']:.3f}"


def _diff(diff, lo, hi, kind: str = "") -> str:
    if math.isnan(diff):
        return "—"
    if math.isnan(lo):
        return f"{diff:+.3f} (no interval)"
    note = {"paired, 1 seed": " (1 seed: examples only)", "seed-only": " (seeds only)"}.get(kind, "")
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]{note}"


def _agreement(c) -> str:
    if pd.isna(c["won"]):
        return "—"
    return f"{c['won']} / {c['lost']} of {c['n_examples']}"


def verdict_table(model: str, summary: pd.DataFrame, comparison: pd.DataFrame, front,
                  uuid: str = "verdict", sizes: dict | None = None, baseline: str = BASELINE) -> str:
    """One model's methods against `baseline`, as HTML (★: on the Pareto front). `sizes`, for an
    equal-budget view: (model, method) -> (size label, matched)."""
    base = method_title(baseline)
    s = summary[summary["model"] == model].set_index("method")
    c = comparison[comparison["model"] == model].set_index("method")
    rows = [{
        "method": ("★ " if (model, m) in front else "") + m,
        **({"size": sizes.get((model, m), ("—", False))[0]} if sizes is not None else {}),
        "jobs ok": f"{s.at[m, 'n_ok']} / {s.at[m, 'n_jobs']}",
        "score (mean ± 95% CI)": _score(s.loc[m]),
        f"Δ score vs {base} [95% CI]": _diff(c.at[m, "score_diff"], c.at[m, "diff_lo"], c.at[m, "diff_hi"],
                                           c.at[m, "interval"]),
        "p (Holm)": _num(c.at[m, "p_holm"], "{:.3g}"),
        "seed-only Δ [95% CI]": _diff(c.at[m, "score_diff"] if c.at[m, "interval"].startswith("paired")
                                      else math.nan, c.at[m, "seed_diff_lo"], c.at[m, "seed_diff_hi"]),
        f"examples won / lost vs {base}": _agreement(c.loc[m]),
        "peak memory (MiB)": _num(s.at[m, "peak_memory_mb"]),
        f"memory vs {base}": _num(c.at[m, "memory_ratio"], "{:.2f}×"),
        "tokens/s": _num(s.at[m, "tokens_per_s"], "{:,.0f}"),
        f"speed vs {base}": _num(c.at[m, "speed_ratio"], "{:.2f}×"),
        "trainable params": _num(s.at[m, "trainable_params"], "{:,.0f}"),
        **({"forgetting (Δ loss)": _num(s.at[m, "forgetting"], "{:+.3f}")} if s["forgetting"].notna().any() else {}),
        **({"capability (Δ accuracy)": _num(s.at[m, "capability_change"], "{:+.3f}")}
           if s["capability_change"].notna().any() else {}),
        "verdict": c.at[m, "verdict"] if sizes is None or sizes.get((model, m), ("", False))[1]
                   else "not comparable: not sized to the budget",
    } for m in s.index]
    table = pd.DataFrame(rows)
    is_baseline = [m == baseline for m in s.index]
    styler = table.style.hide(axis="index").format(escape="html").set_uuid(uuid)
    styler = styler.apply(lambda row: ["background-color: #fff3c4; font-weight: bold"
                                       if is_baseline[row.name] else ""] * len(row), axis=1)
    return styler.set_table_attributes('class="verdict"').to_html()


def run_table(df: pd.DataFrame) -> str:
    """Every job, failed ones included, with its error message."""
    columns = {"model": "model", "method": "method", "seed": "seed", "status": "status",
               "error": "error", "metrics.score": "score", "metrics.peak_memory_mb": "peak memory (MiB)",
               "metrics.predicted_peak_memory_mb": "predicted (MiB)", "metrics.tokens_per_s": "tokens/s"}
    if df["task"].nunique() > 1:
        columns = {"model": "model", "task": "task", **columns}
    if "config.budget" in df and (df["config.budget"].fillna("default") != "default").any():
        columns["config.budget"] = "budget"
        columns["metrics.budget.value"] = "size"
    if "metrics.forgetting" in df and df["metrics.forgetting"].notna().any():
        columns["metrics.forgetting"] = "forgetting"
    if "metrics.capability_change" in df and df["metrics.capability_change"].notna().any():
        columns["metrics.capability_change"] = "capability Δ"
    columns.update({k: v for k, v in WALL if k in df and df[k].notna().any()})
    columns["job_dir"] = "job folder"
    table = df[list(columns)].rename(columns=columns).astype(object)
    formats = {"score": "{:.3f}", "forgetting": "{:+.3f}", "capability Δ": "{:+.3f}", "peak memory (MiB)": "{:,.1f}", "predicted (MiB)": "{:,.1f}", "tokens/s": "{:,.0f}",
               **{v: "{:.1f}" for k, v in WALL}}
    styler = table.style.hide(axis="index").set_uuid("runs").format(
        {k: (lambda x, f=f: _num(x, f)) for k, f in formats.items() if k in table},
        na_rep="—", escape="html")
    styler = styler.map(lambda s: "" if s == "ok" else "color: #b00020; font-weight: bold",
                        subset=["status"])
    return styler.set_table_attributes('class="runs"').to_html()


def _unique(df: pd.DataFrame, column: str) -> str:
    values = sorted(map(str, df[column].dropna().unique())) if column in df else []
    return ", ".join(values) if values else "unknown"


def provenance(df: pd.DataFrame) -> list[tuple[str, str]]:
    """Where and with what the jobs ran, from their own result files."""
    git = sorted({c[:12] + (" (dirty)" if pd.notna(d) and bool(d) else "") for c, d in
                  zip(df.get("env.git.commit", []), df.get("env.git.dirty", [])) if isinstance(c, str)})
    items = [("harness version", _unique(df, "env.harness_version")),
             ("git commit", ", ".join(git) or "unknown"),
             ("devices", _unique(df, "env.device_name")), ("hosts", _unique(df, "env.hostname")),
             ("jobs ran", f"{_first(df, 'env.start_time', min)} to {_first(df, 'env.end_time', max)}"),
             ("commands", _unique(df, "env.command"))]
    packages = sorted(c for c in df.columns if c.startswith("env.packages."))
    items += [(c.removeprefix("env.packages."), _versions(df[c])) for c in packages]
    rendering = package_versions(REPORT_PACKAGES)
    items.append(("report rendered with", ", ".join(f"{name} {v or 'unknown'}" for name, v in rendering.items())))
    return items


REPORT_PACKAGES = ("scipy", "numpy", "pandas", "matplotlib", "jinja2")  # what computes and draws the report


def _versions(column: pd.Series) -> str:
    """A package's version over the jobs: one value, or each value with its number of jobs."""
    counts = column.dropna().astype(str).value_counts().sort_index()
    if len(counts) <= 1:
        return counts.index[0] if len(counts) else "unknown"
    return ", ".join(f"{version} ({n} job{'s' if n != 1 else ''})" for version, n in counts.items())


def _first(df: pd.DataFrame, column: str, pick) -> str:
    values = [v for v in df.get(column, []) if isinstance(v, str)]
    return pick(values) if values else "unknown"


def intro(df: pd.DataFrame, summary: pd.DataFrame, baseline: str = BASELINE) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().sort_index().items())
    seeds = sorted(df["seed"].dropna().unique())
    return (f"{len(df)} jobs ({counts}): {summary['model'].nunique()} model(s) × "
            f"{summary['method'].nunique()} method(s), seeds {', '.join(map(str, seeds))}, "
            f"task {_unique(df, 'task')}. Each job fine-tuned one model with one method, then "
            f"measured its peak memory, training throughput and test score. {method_title(baseline)} ({baseline}) is "
            "the baseline. A difference in score counts only when it is significant at 5% after Holm's "
            f"correction for comparing every method with {method_title(baseline)} (paired over test examples and "
            "seeds); memory counts as less or more beyond ±5%.")


def memory_note(df: pd.DataFrame) -> str:
    sources = sorted(df["metrics.memory_source"].dropna().unique())
    described = "; ".join(f"{s}: {MEMORY_SOURCES.get(s, 'see the README')}" for s in sources)
    phases = df["metrics.memory_phase"].fillna("whole").where(df["status"] == "ok").dropna().unique()
    spans = []
    if "train" in phases:
        spans.append("over training (from the first training step to the last: the weights, "
                     "optimizer states and activations then held; the model load and the scoring "
                     "before training are kept apart in each result.json, phase_peak_memory_mb)")
    if "whole" in phases:
        spans.append("from just before the model loads to the end of training, zero-shot scoring "
                     "included (results of schema 6 and older)")
    return (f"Peak memory (MiB) is measured {' and, for some jobs, '.join(spans) or 'as each job records it'}, "
            f"above what the process held with the libraries imported. Source here: {described or 'unknown'}.")


def learning_rate_table(choices: pd.DataFrame) -> str:
    """The learning rate chosen per method on validation score, edge-of-grid winners flagged."""
    rows = pd.DataFrame({
        "model": choices["model"], "method": choices["method"],
        "learning rates tried": [", ".join(f"{lr:.2g}" for lr in grid) for grid in choices["grid"]],
        "chosen (best validation score)": choices["chosen_lr"].map(lambda v: "—" if pd.isna(v) else f"{v:.2g}"),
        "validation score": choices["validation_score"].map(lambda v: "—" if pd.isna(v) else f"{v:.3f}"),
        "note": choices["edge_of_grid"].map(lambda e: "at the edge of its grid: may be under-tuned" if e else ""),
    })
    return rows.style.hide(axis="index").set_table_attributes('class="runs"').set_uuid("lrs").to_html()


def memory_model_table(df: pd.DataFrame) -> str | None:
    """Measured / predicted peak memory per method over its ok jobs (None without predictions)."""
    cols = ["metrics.peak_memory_mb", "metrics.predicted_peak_memory_mb"]
    ok = df[(df["status"] == "ok")].dropna(subset=cols) if set(cols) <= set(df.columns) else df.iloc[0:0]
    ok = ok[ok[cols[1]] > 0]
    if ok.empty:
        return None
    ratio = (ok[cols[0]].astype(float) / ok[cols[1]].astype(float)).groupby(ok["method"])
    table = pd.DataFrame({"jobs": ratio.size(), "median": ratio.median(), "min": ratio.min(),
                          "max": ratio.max()}).reset_index()
    table.columns = ["method", "jobs", "measured / predicted (median)", "min", "max"]
    styler = table.style.hide(axis="index").set_uuid("memmodel").format(
        {c: "{:.2f}" for c in table.columns[2:]}, escape="html")
    return styler.set_table_attributes('class="runs memmodel"').to_html()


def budget_views(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The jobs of each budget view present (`config.budget`: default, params, memory)."""
    view = df["config.budget"].fillna("default") if "config.budget" in df else pd.Series("default", index=df.index)
    return [(name, df[view == name]) for name in VIEWS if (view == name).any()]


def budget_sizes(df: pd.DataFrame) -> dict:
    """(model, method) -> (label, matched) from the jobs' `metrics.budget` records."""
    sizes = {}
    for (model, method), group in df.groupby(["model", "method"]):
        matched = group.get("metrics.budget.matched", pd.Series(dtype=object)).fillna(False).astype(bool)
        if len(matched) and matched.all():
            knob = str(group["metrics.budget.knob"].iloc[0]).removeprefix("peft.")
            values = sorted({int(v) for v in group["metrics.budget.value"].dropna()})
            sizes[(model, method)] = (f"{knob}={', '.join(map(str, values))}", True)
        else:
            reasons = group.get("metrics.budget.reason", pd.Series(dtype=object)).dropna()
            sizes[(model, method)] = ("not matched" + (f": {reasons.iloc[0]}" if len(reasons) else ""), False)
    return sizes


def detectable_note(value: float | None, baseline: str = BASELINE) -> str | None:
    if value is None or math.isnan(value):
        return None
    return (f"With this sweep's seeds and test examples, the smallest score difference from {method_title(baseline)} it "
            f"detects (80% power, 5% level, per comparison) is about {value:.3f} ({100 * value:.1f} points; "
            "the median over methods). python -m harness.plan --power DIFF --pilot SWEEP_DIR says how many "
            "seeds and test examples a smaller one needs.")


def verdict_sections(views: list[tuple[str, pd.DataFrame]], outcomes: pd.DataFrame,
                     baseline: str = BASELINE) -> tuple[list, pd.DataFrame]:
    """For each budget view: its heading, caption and one verdict table per model (with its
    detectable-difference note); and every view's comparison rows, with a `budget` column."""
    sections, comparisons = [], []
    for name, jobs in views:
        kept, _ = select_learning_rates(jobs)
        summary = summarize(kept)
        comparison = against_baseline(summary, score_matrices(kept, outcomes), baseline)
        comparisons.append(comparison.assign(budget=name))
        sizes = budget_sizes(kept) if name != "default" else None
        matched = summary if sizes is None else summary[[sizes.get((r.model, r.method), ("", False))[1]
                                                         for r in summary.itertuples()]]
        front = pareto_front(matched)
        detectable = detectable_by_model(comparison)
        tables = [(m, Markup(verdict_table(m, summary, comparison, front, f"verdict-{name}-{i}", sizes, baseline)),
                   detectable_note(detectable.get(m), baseline))
                  for i, m in enumerate(figures.model_order(summary))]
        heading, caption = VIEWS[name]
        base = method_title(baseline)
        sections.append((heading.format(base=base), caption.format(base=base), tables))
    table = pd.concat(comparisons, ignore_index=True)
    return sections, table[["budget"] + [c for c in table.columns if c != "budget"]]


def task_metric(df: pd.DataFrame) -> str | None:
    """The metric the jobs' task is scored by (one task per report), None if it scores nothing."""
    metrics = df["config.task.metric"].dropna().unique() if "config.task.metric" in df else []
    return str(metrics[0]) if len(metrics) else None


def render_report(df: pd.DataFrame, out_dir: Path, title: str, baseline: str = BASELINE) -> Path:
    """Write results.csv, verdicts.csv, examples.csv, the figures and index.html for the
    collected results `df`, every method compared with `baseline`."""
    base = method_title(baseline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_jobs, views = df, budget_views(df)
    outcomes = collect_outcomes(all_jobs)
    df, choices = select_learning_rates(views[0][1])  # figures: the default view if present
    summary = summarize(df)
    front = pareto_front(summary)
    sections, comparisons = verdict_sections(views, outcomes, baseline)
    write_csv(all_jobs, out_dir / "results.csv")
    comparisons.to_csv(out_dir / "verdicts.csv", index=False, lineterminator="\n")
    outcomes.to_csv(out_dir / "examples.csv", index=False, lineterminator="\n")
    metric = task_metric(all_jobs)
    made = {"forest.png": figures.forest_figure(comparisons[comparisons["budget"] == views[0][0]], summary, base,
                                                metric),
            "pareto.png": figures.pareto_figure(summary, front, baseline, metric),
            "speed.png": figures.speed_figure(summary, baseline, metric),
            "memory_model.png": figures.memory_model_figure(all_jobs, summary, baseline),
            "curves.png": figures.curves_figure(df, summary, baseline)}
    left_out = {}
    if figures.model_sizes(summary) >= 2:
        made["scaling.png"] = figures.scaling_figure(df, summary, baseline)
    else:  # a line through one size shows nothing
        left_out["scaling.png"] = "Left out: the sweep has one model size, and scaling needs two or more."
    for name, fig in made.items():
        figures.save(fig, out_dir / name)
    env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True,
                      keep_trailing_newline=True)
    html = env.get_template("template.html.j2").render(
        title=title, intro=intro(df, summary, baseline), memory_note=memory_note(df), base=base, baseline=baseline,
        forgetting=_unique(all_jobs, "config.forgetting.name")
        if "metrics.forgetting" in all_jobs and all_jobs["metrics.forgetting"].notna().any() else None,
        capability=_unique(all_jobs, "config.capability.name")
        if "metrics.capability_change" in all_jobs and all_jobs["metrics.capability_change"].notna().any() else None,
        sections=sections,
        figures=[(f, h.format(base=base), left_out.get(f) or c.format(base=base), f in made) for f, h, c in FIGURES],
        notes=cannot_conclude(df, summary, baseline),
        learning_rates=Markup(learning_rate_table(choices)) if len(choices) else None,
        memory_model=Markup(m) if (m := memory_model_table(all_jobs)) else None,
        runs=Markup(run_table(all_jobs)), provenance=provenance(all_jobs))
    index = out_dir / "index.html"
    index.write_text(html)
    return index


def build_report(sweep_dirs: list[Path], out_dir: Path, title: str | None = None, baseline: str = BASELINE) -> Path:
    """Collect the results under `sweep_dirs` and write the report into `out_dir`, every
    method compared with `baseline`; returns the path of index.html. Raises ValueError when
    there is no readable result."""
    df = collect([Path(d) for d in sweep_dirs])
    if df.empty:
        raise ValueError(f"no result.json under {', '.join(map(str, sweep_dirs))}")
    return render_sweep(df, out_dir, title or default_title(df, sweep_dirs), baseline)


def render_sweep(df: pd.DataFrame, out_dir: Path, title: str, baseline: str = BASELINE) -> Path:
    """The report of the collected results `df`: one report, or with several tasks one per task
    (scores of different tasks are never pooled) and a page linking them. Rendered into a fresh
    folder beside `out_dir` and moved in only once every file is written, so a report that fails
    halfway leaves `out_dir` as it was."""
    out_dir = Path(out_dir)
    with staged(out_dir) as stage:
        tasks = sorted(df["task"].dropna().unique())
        if len(tasks) <= 1:
            render_report(df, stage, title, baseline)
        else:
            for task in tasks:
                render_report(df[df["task"] == task], stage / task, f"{title}: task {task}", baseline)
            write_csv(df, stage / "results.csv")
            env = Environment(loader=FileSystemLoader(Path(__file__).parent), autoescape=True,
                              keep_trailing_newline=True)
            (stage / "index.html").write_text(env.get_template("tasks.html.j2").render(
                title=title, tasks=[(t, int((df["task"] == t).sum())) for t in tasks], runs=Markup(run_table(df)),
                provenance=provenance(df)))
    return out_dir / "index.html"


@contextlib.contextmanager
def staged(out_dir: Path):
    """A fresh folder beside `out_dir` to write into; when the block ends without an error, each
    file written moves into `out_dir` (same file system: a rename), replacing the file of that
    name; files of `out_dir` not written again (a committed report's jobs/) stay. On an error
    the fresh folder is removed and `out_dir` is untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.rendering-"))
    try:
        yield stage
        for path in sorted(stage.rglob("*")):
            if path.is_file():
                target = out_dir / path.relative_to(stage)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
