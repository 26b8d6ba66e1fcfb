"""The report's figures, as matplotlib `Figure` objects (no pyplot, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

DPI = 110
GPU_GB = (24, 40, 80, 141)  # common GPU memory sizes, drawn as GB * 1024 MiB


def model_order(summary: pd.DataFrame) -> list[str]:
    """Models by size (total parameters), models without a known size last, then by name."""
    sizes = summary.groupby("model")["total_params"].max()
    return sorted(sizes.index, key=lambda m: (0, sizes[m], m) if sizes[m] == sizes[m] else (1, 0, m))


def method_colors(methods) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % 10] for i, m in enumerate(sorted(set(methods)))}


def _marker(method: str, baseline: str) -> dict:
    if method == baseline:
        return {"marker": "*", "markersize": 15, "markeredgecolor": "black", "zorder": 4}
    return {"marker": "o", "markersize": 7, "zorder": 3}


def _figure(n_panels: int, title: str) -> tuple[Figure, list]:
    ncols = min(max(n_panels, 1), 3)
    nrows = math.ceil(max(n_panels, 1) / ncols)
    fig = Figure(figsize=(4.4 * ncols + 1.8, 3.8 * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _legend(fig: Figure, colors: dict[str, str], baseline: str, extra: list | None = None, lines=False) -> None:
    handles = [Line2D([], [], color=c, label=m, linewidth=2.5 if m == baseline else 1.5)
               if lines else Line2D([], [], color=c, linestyle="", label=m, **_marker(m, baseline))
               for m, c in colors.items()]
    _below(fig, handles + (extra or []))


def _below(fig: Figure, handles: list) -> None:
    """The figure's legend below its panels, in as many columns as fit its width: beside them,
    a narrow figure's legend covered the title."""
    widest = max((len(h.get_label()) for h in handles), default=1)
    column_inches = 0.6 + 0.075 * widest  # a marker, then the label at 9 points
    columns = max(1, min(len(handles), int(fig.get_figwidth() * 0.95 // column_inches)))
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=9)


def score_label(metric: str | None) -> str:
    """The score axis's name: the task's metric on the test split."""
    return f"score (test {metric.replace('_', ' ')})" if metric else "score (nothing scored)"


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no ok jobs", transform=ax.transAxes, ha="center", color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _score_figure(summary: pd.DataFrame, x: str, xlabel: str, title: str, baseline: str, metric: str | None,
                  front=None) -> Figure:
    models = model_order(summary)
    colors = method_colors(summary["method"])
    fig, axes = _figure(len(models), title)
    for ax, model in zip(axes, models):
        rows = summary[(summary["model"] == model)].dropna(subset=[x, "score_mean"])
        for _, r in rows.iterrows():
            ci = None
            if r["score_ci"] == r["score_ci"]:  # scores lie in [0, 1]: the bar stops there
                low, high = max(0.0, r["score_mean"] - r["score_ci"]), min(1.0, r["score_mean"] + r["score_ci"])
                ci = [[r["score_mean"] - low], [high - r["score_mean"]]]
            hollow = {"markerfacecolor": "white"} if r["n_ok"] < r["n_jobs"] else {}
            ax.errorbar(r[x], r["score_mean"], yerr=ci, color=colors[r["method"]], capsize=3,
                        linestyle="", **_marker(r["method"], baseline), **hollow)
        if front is not None:
            on = rows[pd.Series([(model, m) in front for m in rows["method"]], index=rows.index,
                                dtype=bool)].sort_values([x, "score_mean"])
            if len(on):  # the step line runs on to the right edge of the points
                xs = [*on[x], rows[x].max()]
                ys = [*on["score_mean"], on["score_mean"].iloc[-1]]
                ax.step(xs, ys, where="post", color="grey", linestyle="--", zorder=2)
        if rows.empty:
            _no_data(ax)
        ax.set_title(model)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(score_label(metric))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="grey", linestyle="--", label="Pareto front")] if front is not None else []
    _legend(fig, colors, baseline, extra)
    return fig


def pareto_figure(summary: pd.DataFrame, front: set[tuple[str, str]], baseline: str,
                  metric: str | None = None) -> Figure:
    """Score vs peak memory per model; the Pareto front as a step line; bars: 95% intervals."""
    return _score_figure(summary, "peak_memory_mb", "peak memory (MiB)",
                         "Score vs peak memory (up and left is better)", baseline, metric, front)


def speed_figure(summary: pd.DataFrame, baseline: str, metric: str | None = None) -> Figure:
    """Score vs training throughput per model; bars: 95% intervals."""
    return _score_figure(summary, "tokens_per_s", "training throughput (tokens/s)",
                         "Score vs speed (up and right is better)", baseline, metric)


def model_sizes(summary: pd.DataFrame) -> int:
    """How many model sizes the summary holds (the scaling figure needs two)."""
    return summary.groupby("model")["total_params"].min().dropna().nunique()


def scaling_figure(df: pd.DataFrame, summary: pd.DataFrame, baseline: str) -> Figure:
    """Peak memory vs model size per method (log-log), GPU sizes as lines, OOM jobs as red x."""
    colors = method_colors(summary["method"])
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    sizes = summary.groupby("model")["total_params"].min()  # the base model (fewest added params)
    points = summary.assign(size=summary["model"].map(sizes)).dropna(subset=["peak_memory_mb", "size"])
    for method, rows in points.groupby("method"):
        rows = rows.sort_values("size")
        ax.plot(rows["size"], rows["peak_memory_mb"], color=colors[method], **_marker(method, baseline))
    if points.empty:
        ax.text(0.5, 0.5, "no ok jobs", transform=ax.transAxes, ha="center", color="grey")
    oom = df.loc[df["status"] == "oom", "model"].map(sizes)
    ax.plot(oom.dropna(), [0.96] * oom.notna().sum(), "x", color="red", markersize=10, mew=2,
            transform=ax.get_xaxis_transform(), linestyle="")
    unknown = sorted(set(df.loc[df["status"] == "oom", "model"][oom.isna()]))
    if unknown:  # out of memory before their size was known
        ax.text(0.99, 0.9, "out of memory, size unknown: " + ", ".join(unknown), ha="right",
                transform=ax.transAxes, color="red", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    low = summary["peak_memory_mb"].min()
    ax.set_ylim(low / 2 if low == low and low > 0 else 10, GPU_GB[-1] * 1024 * 3)
    for gb in GPU_GB:
        ax.axhline(gb * 1024, color="grey", linestyle=":", linewidth=1)
        ax.text(0.01, gb * 1024, f" {gb} GB GPU", transform=ax.get_yaxis_transform(), va="bottom",
                fontsize=8, color="dimgrey")
    ax.set_title("Peak memory vs model size")
    ax.set_xlabel("model parameters (fewest total_params over the methods)")
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, colors, baseline, [Line2D([], [], marker="x", color="red", linestyle="", mew=2,
                                           label="out of memory")])
    return fig


def memory_model_figure(df: pd.DataFrame, summary: pd.DataFrame, baseline: str) -> Figure:
    """Measured peak memory against the memory model's prediction, one point per job (out of
    memory jobs: their prediction against the memory they reached, as red crosses)."""
    colors = method_colors(summary["method"] if not summary.empty else df["method"])
    fig = Figure(figsize=(6.5, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    cols = ["metrics.predicted_peak_memory_mb", "metrics.peak_memory_mb"]
    jobs = df.dropna(subset=cols) if set(cols) <= set(df.columns) else df.iloc[0:0]
    jobs = jobs[jobs[cols].gt(0).all(axis=1)]
    for method, rows in jobs[jobs["status"] == "ok"].groupby("method"):
        ax.plot(rows[cols[0]], rows[cols[1]], color=colors.get(method, "grey"), linestyle="",
                **_marker(method, baseline))
    oom = jobs[jobs["status"] == "oom"]
    ax.plot(oom[cols[0]], oom[cols[1]], "x", color="red", markersize=9, mew=2, linestyle="")
    if jobs.empty:
        ax.text(0.5, 0.5, "no job with both a prediction and a measurement", transform=ax.transAxes,
                ha="center", color="grey")
    else:
        low, high = jobs[cols].min().min() / 1.5, jobs[cols].max().max() * 1.5
        ax.plot([low, high], [low, high], color="black", linewidth=1)
        for factor in (0.75, 1.25):
            ax.plot([low, high], [low * factor, high * factor], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(low, high)
        ax.set_ylim(low, high)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
    ax.set_title("Measured vs predicted peak memory")
    ax.set_xlabel("predicted peak memory (MiB, harness/memory_model.py)")
    ax.set_ylabel("measured peak memory (MiB)")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, colors, baseline, [Line2D([], [], marker="x", color="red", linestyle="", mew=2,
                                           label="out of memory")])
    return fig


def curves_figure(df: pd.DataFrame, summary: pd.DataFrame, baseline: str) -> Figure:
    """Training loss per step, mean over the ok seeds of each method, one panel per model."""
    models = model_order(summary)
    colors = method_colors(summary["method"])
    fig, axes = _figure(len(models), "Training loss (mean over seeds)")
    ok = df[df["status"] == "ok"]
    for ax, model in zip(axes, models):
        if not (ok["model"] == model).any():
            _no_data(ax)
        for method, rows in ok[ok["model"] == model].groupby("method"):
            losses = [l for l in rows["metrics.train_losses"] if isinstance(l, list) and l]
            if losses:
                mean = pd.DataFrame(losses).mean(axis=0)
                ax.plot(mean.index + 1, mean.values, color=colors[method], label=method,
                        linewidth=2.5 if method == baseline else 1.5)
        ax.set_title(model)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
    _legend(fig, colors, baseline, lines=True)
    return fig


def forest_figure(comparison: pd.DataFrame, summary: pd.DataFrame, base_title: str,
                  metric: str | None = None) -> Figure:
    """Each method's score difference vs the baseline (named `base_title`) with its 95%
    interval (paired over test examples and seeds where per-example outcomes exist), and the
    seed-only Welch interval below it in grey, one panel per model."""
    models = model_order(summary)
    colors = method_colors(summary["method"])
    fig, axes = _figure(len(models), f"Score difference vs {base_title} (95% intervals)")
    for ax, model in zip(axes, models):
        rows = comparison[(comparison["model"] == model) & comparison["score_diff"].notna()]
        rows = rows.sort_values("method", ascending=False).reset_index(drop=True)
        if rows.empty:
            _no_data(ax)
        for y, r in rows.iterrows():
            clip = lambda lo, hi: [max(-1.0, lo), min(1.0, hi)]  # noqa: E731  (differences of scores in [0, 1])
            if r["diff_lo"] == r["diff_lo"]:
                ax.plot(clip(r["diff_lo"], r["diff_hi"]), [y, y], color=colors[r["method"]], linewidth=2.5)
            if r["seed_diff_lo"] == r["seed_diff_lo"] and r["interval"].startswith("paired"):
                ax.plot(clip(r["seed_diff_lo"], r["seed_diff_hi"]), [y - 0.25, y - 0.25], color="grey", linewidth=1)
            ax.plot(r["score_diff"], y, "o", color=colors[r["method"]], markersize=6,
                    markerfacecolor="white" if r["interval"] in ("seed-only", "none (1 seed)") else colors[r["method"]])
        ax.axvline(0, color="black", linewidth=1)
        ax.set_yticks(range(len(rows)), rows["method"])
        ax.set_ylim(-0.8, max(len(rows), 1) - 0.4)
        ax.set_title(model)
        ax.set_xlabel(f"{score_label(metric)} difference vs {base_title}")
        ax.grid(alpha=0.3, axis="x")
    extra = [Line2D([], [], color="black", linewidth=2.5, label="paired (examples and seeds)"),
             Line2D([], [], color="grey", linewidth=1, label="seed-only (Welch)"),
             Line2D([], [], marker="o", color="black", markerfacecolor="white", linestyle="",
                    label="no per-example outcomes")]
    _below(fig, extra)
    return fig


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
