"""`python -m harness.plan model=NAME [train.batch_size=N] [train.seq_len=S] [--gpu-mem 24,80]`

Will it fit? For one model and every method in conf/method/, prints the memory model's
predicted peak training memory on a GPU (harness/memory_model.py), its breakdown, whether it
fits on GPUs of 24, 40, 80 and 141 GB (or the sizes given with --gpu-mem), and the largest
batch size that fits each at the given sequence length. Reads config files only: no weights
are loaded, no torch is imported.

A GPU of N GB is taken as N GiB (what `nvidia-smi` reports, to within 1-2%), and a job fits
when its predicted peak plus the CUDA context (memory_model.CUDA_CONTEXT_MB) is within it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from harness import memory_model
from harness.config import CONF_DIR, check_composes, check_group_choices, group_options, validate
from harness.errors import ConfigError

DEFAULT_GPUS_GB = (24, 40, 80, 141)


def architecture_of(model_cfg: dict) -> dict:
    """The config.json fields of a model, without loading it: a shipped architecture, a
    local folder's config.json, or a tiny model's config (its built folder's, if built)."""
    from harness.models import ARCHITECTURES_DIR, is_local_path, tiny_cache_dir

    if model_cfg.get("architecture"):
        return json.loads((ARCHITECTURES_DIR / f"{model_cfg['architecture']}.json").read_text())
    name_or_path = model_cfg.get("name_or_path")
    if not name_or_path:
        built = tiny_cache_dir(model_cfg["tiny"], pretrained=False) / "config.json"
        if built.is_file():
            return json.loads(built.read_text())
        return {"model_type": "llama", **{k: v for k, v in model_cfg["tiny"].items() if k not in ("seed", "pretrain")}}
    if is_local_path(name_or_path):
        path = Path(name_or_path).expanduser() / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.name_or_path={name_or_path!r}: cannot read {path} ({e})")
    raise ConfigError(f"model {model_cfg['name']!r} names the Hub id {name_or_path!r} and no architecture; "
                      "the planner reads config files only: point model.name_or_path at a local copy")


def load_methods() -> list[dict]:
    return [OmegaConf.to_container(OmegaConf.load(p), resolve=True)
            for p in sorted((CONF_DIR / "method").glob("*.yaml"))]


def plan(arch: dict, methods: list[dict], train: dict, gpus_gb) -> list[dict]:
    """One row per method: the prediction on a GPU for the `train` config's batch and sequence
    length, and for each GPU size whether it fits and the largest batch size that does."""
    kwargs = {"seq_len": train["seq_len"], **memory_model.training_setting(train, "cuda")}
    rows = []
    for method in methods:
        p = memory_model.predict(arch, method, batch_size=train["batch_size"], **kwargs)
        row = {"method": method["name"], **p}
        for gb in gpus_gb:
            budget = gb * 1024 - memory_model.CUDA_CONTEXT_MB
            row[f"fits_{gb:g}"] = p["peak_mb"] <= budget
            row[f"max_batch_{gb:g}"] = memory_model.max_batch_size(arch, method, budget, **kwargs)
        rows.append(row)
    return sorted(rows, key=lambda r: -r["peak_mb"])


def format_table(rows: list[dict], gpus_gb) -> str:
    gib = lambda mb: f"{mb / 1024:,.1f}"  # noqa: E731
    head = ["method", "trainable", "peak GiB", "weights", "grads", "optim", "activ.", "logits+bwd", "other"]
    head += [f"{gb:g}GB" for gb in gpus_gb] + [f"max batch {gb:g}GB" for gb in gpus_gb]
    lines = [head]
    for r in rows:
        other = r["autocast_copies_mb"] + r["overhead_mb"]
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
    return "\n".join(out)


def parse_gpu_mem(text: str) -> tuple[float, ...]:
    try:
        sizes = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError(f"--gpu-mem={text!r}: give GPU memory sizes in GB, positive numbers, e.g. --gpu-mem 24,80")
    return sizes


def compose_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    check_group_choices(overrides)
    sweeps = [o for o in overrides if "," in o.split("=", 1)[-1] and not o.startswith("--")]
    if sweeps:
        raise ConfigError(f"{sweeps[0]!r}: the planner takes one value per key (it already covers every method)")
    check_composes(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    validate(config)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m harness.plan",
        description="Predicted peak training memory of every method for one model, and what fits.",
        epilog=f"models: {', '.join(group_options('model'))}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=NAME train.batch_size=N train.seq_len=S ...")
    parser.add_argument("--gpu-mem", default=",".join(map(str, DEFAULT_GPUS_GB)),
                        help="GPU memory sizes in GB, comma-separated (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        gpus = parse_gpu_mem(args.gpu_mem)
        config = compose_config(args.overrides)
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
    print(f"{config['model']['name']}: {memory_model.parameter_count(arch):,} parameters; batch {t['batch_size']} x "
          f"seq {t['seq_len']}, {t['precision']}, gradient checkpointing "
          f"{'on' if t['gradient_checkpointing'] else 'off'}; predicted peak on a GPU (MiB / 1024 = GiB),"
          f" + {memory_model.CUDA_CONTEXT_MB:.0f} MiB CUDA context to fit")
    print(format_table(rows, gpus))


if __name__ == "__main__":
    main()
