"""What the numbers say: per-method summaries, comparison with the baseline (QLoRA unless
`report.baseline` names another), the Pareto front, and what cannot be concluded. Pure
functions of the table built by `aggregate.collect`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.config import method_title
from harness.report import statistics

MEMORY_LESS, MEMORY_MORE = 0.95, 1.05  # memory ratio thresholds
SIGNIFICANT = statistics.LEVEL  # a score difference counts when its Holm-adjusted p is below this


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method): jobs run and ok, score mean with its 95% interval half-width over
    seeds (NaN with fewer than 2 scored seeds), mean peak memory, tokens/s and forgetting
    (general-text loss after minus before; NaN when not measured) of the ok jobs."""
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
            "score_ci": statistics.mean_interval_half_width(sd, n),
            "peak_memory_mb": _mean(ok, "metrics.peak_memory_mb"),
            "tokens_per_s": _mean(ok, "metrics.tokens_per_s"),
            "trainable_params": _mean(ok, "metrics.trainable_params"),
            "total_params": _mean(ok, "metrics.total_params"),
            "forgetting": _mean(ok, "metrics.forgetting") if "metrics.forgetting" in ok else math.nan,
            "capability_change": _mean(ok, "metrics.capability_change") if "metrics.capability_change" in ok else math.nan,
        })
    return pd.DataFrame(rows, columns=["model", "method", "n_jobs", "n_ok", "n_oom", "n_scored",
                                       "score_mean", "score_sd", "score_ci", "peak_memory_mb",
                                       "tokens_per_s", "trainable_params", "total_params", "forgetting",
                                       "capability_change"])


def _mean(rows: pd.DataFrame, column: str) -> float:
    return pd.to_numeric(rows[column], errors="coerce").mean() if column in rows else math.nan


def score_matrices(df: pd.DataFrame, outcomes: pd.DataFrame | None) -> dict:
    """(model, method) -> test scores after training, one row per scored ok job of `df`, one
    column per example id; only where every such job of the method has per-example outcomes."""
    if outcomes is None or outcomes.empty:
        return {}
    test = outcomes[(outcomes["split"] == "test") & (outcomes["stage"] == "after")]
    by_job = dict(tuple(test.groupby("job", sort=False)))
    ok = df[(df["status"] == "ok") & pd.to_numeric(df["metrics.score"], errors="coerce").notna()]
    matrices = {}
    for key, group in ok.groupby(["model", "method"], sort=True):
        if not all(job in by_job for job in group["job_dir"]):
            continue
        rows = {job: by_job[job].set_index("example_id")["score"] for job in group["job_dir"]}
        matrices[key] = pd.DataFrame(rows).T
    return matrices


def paired(method: pd.DataFrame, base: pd.DataFrame) -> tuple[statistics.Components, dict] | None:
    """Variance components of a method against the baseline over the test examples every job
    of both scored, and the per-example agreement (examples won, lost and tied on the
    seed-averaged score); None when they share no example."""
    common = method.columns[method.notna().all()].intersection(base.columns[base.notna().all()])
    if len(common) == 0:
        return None
    xa, xb = method[common].to_numpy(float), base[common].to_numpy(float)
    d = xa.mean(axis=0) - xb.mean(axis=0)
    agreement = {"won": int((d > 0).sum()), "lost": int((d < 0).sum()), "tied": int((d == 0).sum()),
                 "n_examples": len(common)}
    return statistics.components(xa, xb), agreement


def _verdict(score: str, memory: str, caveat: str | None, base: str = "QLoRA") -> str:
    if score == "better" and memory == "less":
        text = f"beats {base} on score and memory"
    elif score == "worse" and memory in ("same", "more") or score == "same" and memory == "more":
        text = f"dominated by {base}"
    else:
        text = f"{score} score, {memory} memory"
    return text + (f" ({caveat})" if caveat else "")


COLUMNS = ["model", "method", "score_diff", "diff_lo", "diff_hi", "p_value", "p_holm", "interval",
           "seed_diff_lo", "seed_diff_hi", "seed_p_value", "detectable_diff", "won", "lost", "tied",
           "n_examples", "memory_ratio", "speed_ratio", "verdict"]


def against_baseline(summary: pd.DataFrame, matrices: dict | None = None, baseline: str = "qlora") -> pd.DataFrame:
    """Each method against `baseline` on the same model: the score difference with its 95%
    interval and p-value, paired over test examples and seeds where `matrices` (from
    `score_matrices`) has both, else over seeds only (Welch); the seed-only interval alongside;
    Holm's adjusted p over each model's comparisons; the smallest difference this design
    detects (80% power, 5% level); examples won / lost / tied; peak-memory and tokens/s ratios
    (method / baseline); and a verdict. A score difference counts when its Holm-adjusted
    p < 0.05; an interval of zero width (no variation seen) never counts."""
    matrices = matrices or {}
    rows = []
    for _, row in summary.iterrows():
        base = summary[(summary["model"] == row["model"]) & (summary["method"] == baseline)]
        out = dict.fromkeys(COLUMNS, math.nan) | {"model": row["model"], "method": row["method"], "interval": ""}
        out |= {"won": pd.NA, "lost": pd.NA, "tied": pd.NA, "n_examples": pd.NA}
        if row["n_ok"] == 0:
            out["verdict"] = "not comparable (OOM)" if row["n_oom"] else "not comparable (failed)"
        elif row["method"] == baseline:
            out["verdict"] = "baseline"
        elif row["n_scored"] == 0:
            out["verdict"] = "not comparable (no score)"
        elif base.empty or base.iloc[0]["n_scored"] == 0:
            out["verdict"] = f"no {method_title(baseline)} baseline"
        else:
            b = base.iloc[0]
            seed_only = statistics.welch(row["score_mean"], row["score_sd"], row["n_scored"],
                                         b["score_mean"], b["score_sd"], b["n_scored"])
            pair = None
            if (row["model"], row["method"]) in matrices and (row["model"], baseline) in matrices:
                pair = paired(matrices[(row["model"], row["method"])], matrices[(row["model"], baseline)])
            if pair is not None:
                comps, agreement = pair
                main = statistics.interval(comps)
                out |= agreement
                out["interval"] = "paired" if main.seeds_included else "paired, 1 seed"
            else:
                main = seed_only
                out["interval"] = "seed-only" if not math.isnan(seed_only.lo) else "none (1 seed)"
            ratio = row["peak_memory_mb"] / b["peak_memory_mb"]
            out |= {"score_diff": main.diff, "diff_lo": main.lo, "diff_hi": main.hi, "p_value": main.p,
                    "seed_diff_lo": seed_only.lo, "seed_diff_hi": seed_only.hi, "seed_p_value": seed_only.p,
                    "detectable_diff": statistics.detectable(main.se, main.df),
                    "memory_ratio": ratio, "speed_ratio": row["tokens_per_s"] / b["tokens_per_s"],
                    "_conclusive": main.conclusive, "_seeds": main.seeds_included,
                    "_memory": ("unknown" if math.isnan(ratio) else "less" if ratio < MEMORY_LESS
                                else "more" if ratio > MEMORY_MORE else "same")}
        rows.append(out)
    table = pd.DataFrame(rows)
    for column in ("_conclusive", "_seeds", "_memory"):
        if column not in table:
            table[column] = None
    table["p_holm"] = np.nan
    for _, group in table.groupby("model"):
        table.loc[group.index, "p_holm"] = statistics.holm(group["p_value"].astype(float))
    for i, r in table[table["_memory"].notna()].iterrows():
        table.at[i, "verdict"] = _score_verdict(r, method_title(baseline))
    return table[COLUMNS]


def _score_verdict(r, base: str) -> str:
    """The verdict of one comparison row with its interval, p-values and memory class."""
    if not r["_conclusive"]:
        score = "better" if r["score_diff"] > 0 else "worse" if r["score_diff"] < 0 else "same"
        caveat = ("1 seed: not conclusive" if r["interval"] == "none (1 seed)"
                  else "no variation seen: not conclusive")
        return _verdict(score, r["_memory"], caveat, base)
    significant = r["p_holm"] < SIGNIFICANT
    score = "same" if not significant else "better" if r["score_diff"] > 0 else "worse"
    caveat = None if r["_seeds"] else "1 seed: interval over test examples only"
    return _verdict(score, r["_memory"], caveat, base)


def detectable_by_model(comparison: pd.DataFrame) -> dict[str, float]:
    """Per model: the median over its methods of the smallest difference detectable against
    the baseline with this sweep's design (80% power, 5% level, before Holm's correction)."""
    values = comparison.dropna(subset=["detectable_diff"])
    return {m: float(g["detectable_diff"].median()) for m, g in values.groupby("model")}


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
            notes.append(f"{model}: no {baseline} run, so no comparison with the {method_title(baseline)} baseline.")
        single = sorted(group.loc[(group["n_scored"] == 1), "method"])
        if single:
            notes.append(f"{model}: only one scored seed for {', '.join(single)}: their intervals cover "
                         "test-example sampling only (how a whole run varies with its seed is not measured), "
                         "or there is none without per-example outcomes.")
    ok = df[df["status"] == "ok"]
    files = ok["outcomes.file"] if "outcomes.file" in ok else pd.Series(None, index=ok.index, dtype=object)
    missing = ok[files.isna()]
    for model, group in missing.groupby("model"):
        notes.append(f"{model}: {len(group)} of {int((ok['model'] == model).sum())} ok jobs carry no per-example "
                     "outcomes (results written before schema 6): comparisons involving their methods use the "
                     "seed-only (Welch) interval, which treats the test set as fixed.")
    if "metrics.score_meaningful" in df:
        random_arch = sorted(df.loc[df["metrics.score_meaningful"] == False, "model"].unique())  # noqa: E712
        if random_arch:
            notes.append(f"{', '.join(random_arch)}: random weights (model.init=random), so their scores are not "
                         "meaningful and are not shown; compare their memory and speed only.")
    if "config.model.name_or_path" in df:  # no name_or_path: a locally built random-init model
        tiny = sorted(df.loc[df["config.model.name_or_path"].fillna("") == "", "model"].unique())
        if tiny:
            notes.append(f"{', '.join(tiny)}: tiny models built here (pretrained for a few minutes on a synthetic "
                         "corpus, or with random weights under model.init=random); how the methods rank on them "
                         "says little about how they rank on real LLMs.")
    return notes
