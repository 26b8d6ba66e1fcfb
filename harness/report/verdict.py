"""What the numbers say: per-method summaries, comparison with QLoRA, the Pareto front, and
what cannot be concluded. Pure functions of the table built by `aggregate.collect`."""

from __future__ import annotations

import math

import pandas as pd

# Two-sided 95% Student t quantiles (0.975) for 1..30 degrees of freedom.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
MEMORY_LESS, MEMORY_MORE = 0.95, 1.05  # memory ratio thresholds


def t975(df: float) -> float:
    """t quantile for `df` degrees of freedom (fractional df rounded down: conservative)."""
    df = max(1, int(math.floor(df)))
    if df <= 30:
        return T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method): jobs run and ok, score mean with its 95% interval half-width
    (NaN with fewer than 2 scored seeds), mean peak memory, tokens/s and forgetting (general-
    text loss after minus before; NaN when not measured) of the ok jobs."""
    rows = []
    for (model, method), group in df.groupby(["model", "method"], sort=True):
        ok = group[group["status"] == "ok"]
        scores = pd.to_numeric(ok["metrics.score"], errors="coerce").dropna()
        n = len(scores)
        sd = scores.std(ddof=1) if n > 1 else math.nan
        rows.append({
            "model": model, "method": method, "n_jobs": len(group), "n_ok": len(ok),
            "n_oom": int((group["status"] == "oom").sum()), "n_scored": n,
            "score_mean": scores.mean() if n else math.nan, "score_sd": sd,
            "score_ci": t975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan,
            "peak_memory_mb": _mean(ok, "metrics.peak_memory_mb"),
            "tokens_per_s": _mean(ok, "metrics.tokens_per_s"),
            "trainable_params": _mean(ok, "metrics.trainable_params"),
            "total_params": _mean(ok, "metrics.total_params"),
            "forgetting": _mean(ok, "metrics.forgetting") if "metrics.forgetting" in ok else math.nan,
        })
    return pd.DataFrame(rows, columns=["model", "method", "n_jobs", "n_ok", "n_oom", "n_scored",
                                       "score_mean", "score_sd", "score_ci", "peak_memory_mb",
                                       "tokens_per_s", "trainable_params", "total_params", "forgetting"])


def _mean(rows: pd.DataFrame, column: str) -> float:
    return pd.to_numeric(rows[column], errors="coerce").mean() if column in rows else math.nan


def diff_interval(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """Mean score difference a - b and its Welch 95% interval (NaN unless both have 2+ seeds)."""
    diff = a["score_mean"] - b["score_mean"]
    if a["n_scored"] < 2 or b["n_scored"] < 2:
        return diff, math.nan, math.nan
    va, vb = a["score_sd"] ** 2 / a["n_scored"], b["score_sd"] ** 2 / b["n_scored"]
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    dof = (va + vb) ** 2 / (va**2 / (a["n_scored"] - 1) + vb**2 / (b["n_scored"] - 1))
    half = t975(dof) * se
    return diff, diff - half, diff + half


def _verdict(score: str, memory: str, conclusive: bool) -> str:
    if score == "better" and memory == "less":
        text = "beats QLoRA on score and memory"
    elif score == "worse" and memory in ("same", "more") or score == "same" and memory == "more":
        text = "dominated by QLoRA"
    else:
        text = f"{score} score, {memory} memory"
    return text if conclusive else text + " (1 seed: not conclusive)"


def against_baseline(summary: pd.DataFrame, baseline: str = "qlora") -> pd.DataFrame:
    """Each method against `baseline` on the same model: score difference with its 95%
    interval, peak-memory and tokens/s ratios (method / baseline), and a verdict."""
    rows = []
    for _, row in summary.iterrows():
        base = summary[(summary["model"] == row["model"]) & (summary["method"] == baseline)]
        out = {"model": row["model"], "method": row["method"], "score_diff": math.nan,
               "diff_lo": math.nan, "diff_hi": math.nan, "memory_ratio": math.nan,
               "speed_ratio": math.nan}
        if row["n_ok"] == 0:
            out["verdict"] = "not comparable (OOM)" if row["n_oom"] else "not comparable (failed)"
        elif row["method"] == baseline:
            out["verdict"] = "baseline"
        elif row["n_scored"] == 0:
            out["verdict"] = "not comparable (no score)"
        elif base.empty or base.iloc[0]["n_scored"] == 0:
            out["verdict"] = "no QLoRA baseline"
        else:
            b = base.iloc[0]
            diff, lo, hi = diff_interval(row, b)
            ratio = row["peak_memory_mb"] / b["peak_memory_mb"]
            out.update(score_diff=diff, diff_lo=lo, diff_hi=hi, memory_ratio=ratio,
                       speed_ratio=row["tokens_per_s"] / b["tokens_per_s"])
            conclusive = not math.isnan(lo)
            low, high = (lo, hi) if conclusive else (diff, diff)
            score = "better" if low > 0 else "worse" if high < 0 else "same"
            memory = ("unknown" if math.isnan(ratio) else "less" if ratio < MEMORY_LESS
                      else "more" if ratio > MEMORY_MORE else "same")
            out["verdict"] = _verdict(score, memory, conclusive)
        rows.append(out)
    return pd.DataFrame(rows, columns=["model", "method", "score_diff", "diff_lo", "diff_hi",
                                       "memory_ratio", "speed_ratio", "verdict"])


def pareto_front(points: pd.DataFrame) -> set[tuple[str, str]]:
    """(model, method) pairs not dominated in (lower peak memory, higher mean score) among the
    methods of the same model whose every job ended ok. Equal points are all on the front."""
    ok = points[(points["n_ok"] == points["n_jobs"]) & (points["n_ok"] > 0)]
    ok = ok.dropna(subset=["peak_memory_mb", "score_mean"])
    front = set()
    for model, group in ok.groupby("model"):
        for _, p in group.iterrows():
            mem, score = p["peak_memory_mb"], p["score_mean"]
            dominated = ((group["peak_memory_mb"] <= mem) & (group["score_mean"] >= score)
                         & ((group["peak_memory_mb"] < mem) | (group["score_mean"] > score)))
            if not dominated.any():
                front.add((model, p["method"]))
    return front


def select_learning_rates(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Equal tuning effort: where a (model, method) ran several learning rates, keep only the
    jobs of the rate with the best mean validation score over seeds (ties: the lower rate).
    Returns the kept rows and one row per (model, method) with its grid, the chosen rate and
    whether that rate is at an edge of the grid (the method may be under-tuned)."""
    columns = ["model", "method", "grid", "chosen_lr", "validation_score", "edge_of_grid"]
    if "metrics.lr" not in df or df.groupby(["model", "method"])["metrics.lr"].nunique().max() <= 1:
        return df, pd.DataFrame(columns=columns)
    keep, choices = [], []
    for (model, method), group in df.groupby(["model", "method"], sort=True):
        grid = sorted(pd.to_numeric(group["metrics.lr"], errors="coerce").dropna().unique())
        ok = group[group["status"] == "ok"]
        by_lr = pd.to_numeric(ok["metrics.validation_score"], errors="coerce").groupby(ok["metrics.lr"]).mean()
        by_lr = by_lr.dropna().sort_index()
        if by_lr.empty:  # nothing to choose by: keep every job (the failures stay visible)
            keep.append(group)
            choices.append({"model": model, "method": method, "grid": grid, "chosen_lr": math.nan,
                            "validation_score": math.nan, "edge_of_grid": False})
            continue
        chosen = by_lr.idxmax()
        keep.append(group[group["metrics.lr"] == chosen])
        choices.append({"model": model, "method": method, "grid": grid, "chosen_lr": chosen,
                        "validation_score": by_lr[chosen],
                        "edge_of_grid": len(grid) > 1 and chosen in (grid[0], grid[-1])})
    return pd.concat(keep).sort_index(), pd.DataFrame(choices, columns=columns)


def cannot_conclude(df: pd.DataFrame, summary: pd.DataFrame, baseline: str = "qlora") -> list[str]:
    """Plain sentences on what these results cannot tell."""
    notes = []
    for column, what in [("task", "task"), ("env.device_name", "device")]:
        values = sorted(map(str, df[column].dropna().unique())) if column in df else []
        if len(values) == 1:
            notes.append(f"All jobs ran on one {what} ({values[0]}); another {what} may rank the "
                         "methods differently.")
        elif len(values) > 1:
            notes.append(f"Jobs mix {what}s ({', '.join(values)}) and are averaged together here; "
                         f"numbers from different {what}s are not directly comparable.")
    sources = sorted(df["metrics.memory_source"].dropna().unique()) if "metrics.memory_source" in df else []
    if len(sources) > 1:
        notes.append(f"Peak memory was measured in different ways ({', '.join(sources)}); those "
                     "numbers are not comparable with each other.")
    not_ok = df[df["status"] != "ok"]
    if len(not_ok):
        counts = ", ".join(f"{n} {s}" for s, n in not_ok["status"].value_counts().sort_index().items())
        notes.append(f"{len(not_ok)} of {len(df)} jobs did not end ok ({counts}); methods are "
                     "summarized over their ok jobs only.")
    for model, group in summary.groupby("model"):
        if group["n_ok"].sum() == 0:
            notes.append(f"{model}: every job failed; nothing can be said about it.")
            continue
        if len(group) == 1:
            notes.append(f"{model}: only one method ({group.iloc[0]['method']}) ran; nothing to compare.")
        if baseline not in set(group["method"]):
            notes.append(f"{model}: no {baseline} run, so no comparison with the QLoRA baseline.")
        single = sorted(group.loc[(group["n_scored"] == 1), "method"])
        if single:
            notes.append(f"{model}: only one scored seed for {', '.join(single)}: no interval, "
                         "so differences with these methods are not conclusive.")
    if "metrics.score_meaningful" in df:
        random_arch = sorted(df.loc[df["metrics.score_meaningful"] == False, "model"].unique())  # noqa: E712
        if random_arch:
            notes.append(f"{', '.join(random_arch)}: random weights (model.init=random), so their scores are not "
                         "meaningful and are not shown; compare their memory and speed only.")
    if "config.model.name_or_path" in df:  # no name_or_path: a locally built random-init model
        tiny = sorted(df.loc[df["config.model.name_or_path"].fillna("") == "", "model"].unique())
        if tiny:
            notes.append(f"{', '.join(tiny)}: tiny models with random initial weights; their scores "
                         "are low and say little about how the methods rank on pretrained models.")
    return notes
