"""`python -m harness.plan model=NAME [train.batch_size=N] [train.seq_len=S] [--gpu-mem 24,80]`
`python -m harness.plan --power DIFF --pilot SWEEP_DIR [SWEEP_DIR ...]`

Will it fit? For one model and every method in conf/method/, prints the memory model's
predicted peak training memory on a GPU (harness/memory_model.py), its breakdown, whether it
fits on GPUs of 24, 40, 80 and 141 GB (or the sizes given with --gpu-mem), and the largest
batch size that fits each at the given sequence length. Reads config files only: no weights
are loaded, no torch is imported.

With --power: how many seeds and test examples a sweep needs to detect a score difference of
DIFF against QLoRA (80% power, 5% level), predicted from a pilot sweep's per-example outcomes
(the variance over test examples, per-example noise between seeds and whole-seed shifts; see
harness/report/statistics.py). Reads the pilot's result files only.

A GPU of N GB is taken as N GiB (what `nvidia-smi` reports, to within 1-2%), and a job fits
when its predicted peak plus the CUDA context (memory_model.CUDA_CONTEXT_MB) is within it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness import memory_model
from harness.config import CONF_DIR, compose_jobs, check_group_choices, group_options, validate
from harness.errors import ConfigError

DEFAULT_GPUS_GB = (24, 40, 80, 141)


def architecture_of(model_cfg: dict) -> dict:
    """The config.json fields of a model, without loading it (harness/models.py:model_source):
    a shipped architecture, a local folder's config.json, or a tiny model's config."""
    from harness.models import model_source

    source = model_source(model_cfg)
    if source.architecture is not None:
        return source.architecture
    folder = source.folder()
    if folder is not None and (folder / "config.json").is_file():  # a GGUF file converted already
        return json.loads((folder / "config.json").read_text())
    if source.kind == "gguf":
        raise ConfigError(f"model {model_cfg['name']!r}: the GGUF file {model_cfg['gguf_file']!r} is not converted "
                          "yet and no model.architecture is set; the planner reads config files only: run one job "
                          "first, or set model.architecture")
    raise ConfigError(f"model {model_cfg['name']!r} names the Hub id {source.name_or_path!r} and no "
                      "model.architecture; the planner reads config files only: point model.name_or_path at a "
                      "local copy, or set model.architecture")


def load_methods() -> list[dict]:
    return [OmegaConf.to_container(OmegaConf.load(p), resolve=True)
            for p in sorted((CONF_DIR / "method").glob("*.yaml"))]


def plan(arch: dict, methods: list[dict], train: dict, gpus_gb) -> list[dict]:
    """One row per method: the prediction on a GPU for the `train` config's batch and sequence
    length, and for each GPU size whether it fits and the largest batch size that does. With
    train.nproc_per_node = N > 1: the peak of each of N FSDP ranks (train.batch_size the
    global batch) and the largest batch per card, for the methods that shard (`fsdp: true`)."""
    kwargs = {"seq_len": train["seq_len"], **memory_model.training_setting(train, "cuda")}
    nproc = kwargs["world_size"]
    rows, unknown = [], []
    for method in methods:
        if nproc > 1 and not method.get("fsdp"):
            continue
        try:
            p = memory_model.predict(arch, method, batch_size=train["batch_size"], **kwargs)
        except memory_model.UnsupportedMethod as e:  # a method added without a model of its memory
            unknown.append({"method": method["name"], "peak_mb": None, "not_modelled": str(e),
                            "refused": isinstance(e, memory_model.MethodDoesNotApply)})
            continue
        row = {"method": method["name"], **p}
        for gb in gpus_gb:
            budget = gb * 1024 - memory_model.CUDA_CONTEXT_MB
            row[f"fits_{gb:g}"] = p["peak_mb"] <= budget
            def fits(b, method=method, budget=budget):  # batch b on each of the N cards: a global batch of b * N
                return memory_model.predict(arch, method, batch_size=b * nproc, **kwargs)["peak_mb"] <= budget

            row[f"max_batch_{gb:g}"] = memory_model.largest(fits)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["peak_mb"]) + sorted(unknown, key=lambda r: r["method"])


def format_table(rows: list[dict], gpus_gb) -> str:
    gib = lambda mb: f"{mb / 1024:,.1f}"  # noqa: E731
    head = ["method", "trainable", "peak GiB", "weights", "grads", "optim", "activ.", "logits+bwd", "other"]
    head += [f"{gb:g}GB" for gb in gpus_gb] + [f"max batch {gb:g}GB" for gb in gpus_gb]
    lines = [head]
    notes = []
    for r in rows:
        if r["peak_mb"] is None:
            lines.append([r["method"]] + ["—"] * (len(head) - 1))
            if r.get("refused"):
                notes.append(f"{r['method']}: cannot run on this model ({r['not_modelled']}); its jobs refuse it")
            else:
                notes.append(f"{r['method']}: not modelled ({r['not_modelled']}); its jobs run, with no prediction")
            continue
        other = r["autocast_copies_mb"] + r["overhead_mb"] + r["fsdp_gathered_mb"]
        lines.append([r["method"], f"{r['trainable_params']:,}", gib(r["peak_mb"]), gib(r["weights_mb"]),
                      gib(r["gradients_mb"]), gib(r["optimizer_mb"]), gib(r["activations_mb"]),
                      gib(r["logits_mb"] + r["backward_working_mb"]), gib(other)]
                     + ["fits" if r[f"fits_{gb:g}"] else "no" for gb in gpus_gb]
                     + [str(r[f"max_batch_{gb:g}"]) for gb in gpus_gb])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out + notes)


def parse_gpu_mem(text: str) -> tuple[float, ...]:
    try:
        sizes = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"--gpu-mem={text!r}: give GPU memory sizes in GB, positive numbers, e.g. --gpu-mem 24,80")
    return sizes


def compose_config(overrides: list[str]) -> dict:
    check_group_choices(overrides)
    sweeps = [o for o in overrides if "," in o.split("=", 1)[-1] and not o.startswith("--")]
    if sweeps:
        raise ConfigError(f"{sweeps[0]!r}: the planner takes one value per key (it already covers every method)")
    config = compose_jobs(overrides)[0]
    validate(config)
    return config


POWER_SEEDS = (1, 2, 3, 5, 10)
POWER_EXAMPLES = (100, 200, 500, 1000, 2000, 5000)
MAX_EXAMPLES = 1_000_000


def pilot_components(dirs: list[Path], baseline: str = "qlora") -> dict[str, list]:
    """model -> the variance components of each method against `baseline` in the pilot sweep
    folders `dirs` (learning rates selected as in the report), from per-example outcomes."""
    from harness.report.aggregate import collect, collect_outcomes
    from harness.report.verdict import paired, score_matrices, select_learning_rates

    for folder in dirs:
        if not folder.is_dir():
            raise ConfigError(f"--pilot {folder}: no such folder")
    df = collect(dirs)
    if df.empty:
        raise ConfigError(f"--pilot {', '.join(map(str, dirs))}: no readable result.json there")
    if df["task"].nunique() > 1:
        raise ConfigError(f"--pilot: the results mix tasks ({', '.join(sorted(map(str, df['task'].unique())))}); "
                          "give the folders of one task")
    kept, _ = select_learning_rates(df)
    matrices = score_matrices(kept, collect_outcomes(kept))
    found = {}
    for (model, method), matrix in sorted(matrices.items()):
        if method != baseline and (model, baseline) in matrices:
            pair = paired(matrix, matrices[(model, baseline)])
            if pair is not None:
                found.setdefault(model, []).append((method, pair[0]))
    if not found:
        raise ConfigError(f"--pilot: no method with per-example outcomes (result schema 6) to compare with "
                          f"a {baseline} run of the same model; rerun the pilot with this harness")
    return found


def median_detectable(pairs: list, seeds: int, examples: int) -> float:
    """The median over the pilot's methods of the difference detectable with this design."""
    import numpy as np

    from harness.report.statistics import detectable_for_design

    return float(np.median([detectable_for_design(c, seeds, examples) for _, c in pairs]))


def examples_needed(pairs: list, seeds: int, target: float) -> int | None:
    """Fewest test examples (at most MAX_EXAMPLES) with which `seeds` seeds detect `target`."""
    if median_detectable(pairs, seeds, MAX_EXAMPLES) > target:
        return None
    low, high = 2, MAX_EXAMPLES  # detectable difference falls as examples grow
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if median_detectable(pairs, seeds, mid) <= target else (mid + 1, high)
    return low


def power_view(dirs: list[Path], target: float) -> str:
    lines = []
    for model, pairs in pilot_components(dirs).items():
        c0 = pairs[0][1]
        lines.append(f"{model}: pilot of {c0.n_b} QLoRA seed(s) and {c0.m} test examples, {len(pairs)} method(s) "
                     f"compared ({', '.join(m for m, _ in pairs)}). Smallest score difference detectable "
                     "against QLoRA (80% power, 5% level, per comparison; median over the methods), in points:")
        examples = sorted({*POWER_EXAMPLES, c0.m})
        head = ["seeds \\ examples"] + [f"{m:,}" for m in examples] + [f"examples for {100 * target:g} pt"]
        rows = [head]
        for n in POWER_SEEDS:
            need = examples_needed(pairs, n, target)
            rows.append([str(n)] + [f"{100 * median_detectable(pairs, n, m):.1f}" for m in examples]
                        + [f"{need:,}" if need else "not reachable"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        if c0.n_a < 2 or c0.n_b < 2:
            lines.append("  The pilot has one seed of a method: how a whole run varies with its seed is unknown, so "
                         "these figures count test-example sampling only. Run the pilot with 2+ seeds.")
        if any(r[-1] == "not reachable" for r in rows[1:]):
            lines.append("  \"not reachable\": whole-seed variance alone exceeds the target with that many seeds.")
        lines.append("")
    return "\n".join(lines).rstrip()


def parse_power(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise ConfigError(f"--power={text!r}: give the score difference to detect as a fraction of the score "
                          "scale, between 0 and 1, e.g. --power 0.01 for 1 point")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.plan",
        description="Predicted peak training memory of every method for one model, and what fits.",
        epilog=f"models: {', '.join(group_options('model'))}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=NAME train.batch_size=N train.seq_len=S ...")
    parser.add_argument("--gpu-mem", default=",".join(map(str, DEFAULT_GPUS_GB)),
                        help="GPU memory sizes in GB, comma-separated (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--nproc", type=int, metavar="N", help="the job on N GPUs with FSDP (train.nproc_per_node=N): "
                        "each card's peak, train.batch_size the global batch; max batch is per card")
    parser.add_argument("--power", metavar="DIFF", help="instead: seeds and test examples needed to detect a score "
                        "difference DIFF against QLoRA (e.g. 0.01: 1 point), from --pilot")
    parser.add_argument("--pilot", nargs="+", type=Path, metavar="SWEEP_DIR",
                        help="with --power: a pilot sweep's folder(s), with per-example outcomes")
    args = parser.parse_intermixed_args(argv)  # options and overrides in any order
    if args.power is not None or args.pilot:
        logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
        try:
            if args.power is None or not args.pilot or args.overrides:
                raise ConfigError("--power DIFF needs --pilot SWEEP_DIR and no model overrides"
                                  if args.power is not None else "--pilot needs --power DIFF")
            print(power_view(args.pilot, parse_power(args.power)))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    try:
        gpus = parse_gpu_mem(args.gpu_mem)
        if args.nproc is not None and args.nproc < 1:
            raise ConfigError(f"--nproc={args.nproc}: give the number of GPUs, a positive integer")
        config = compose_config(args.overrides)
        if args.nproc:  # set after validation: planning for N GPUs needs none here
            config["train"]["nproc_per_node"] = args.nproc
        arch = architecture_of(config["model"])
        t = config["train"]
        rows = plan(arch, load_methods(), t, gpus)
    except memory_model.UnsupportedModel as e:
        print(f"error: cannot plan for this model: {e}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    sharded = f"; FSDP over {t['nproc_per_node']} GPUs, each card's peak" if t["nproc_per_node"] > 1 else ""
    print(f"{config['model']['name']}: {memory_model.parameter_count(arch):,} parameters; batch {t['batch_size']} x "
          f"seq {t['seq_len']}, {t['precision']}, gradient checkpointing "
          f"{'on' if t['gradient_checkpointing'] else 'off'}{sharded}; predicted peak on a GPU (MiB / 1024 = GiB),"
          f" + {memory_model.CUDA_CONTEXT_MB:.0f} MiB CUDA context to fit")
    print(format_table(rows, gpus))
    if t["nproc_per_node"] > 1:
        print("not sharded with FSDP (their jobs refuse train.nproc_per_node > 1): "
              + ", ".join(m["name"] for m in load_methods() if not m.get("fsdp")))


if __name__ == "__main__":
    main()
