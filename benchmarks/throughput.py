"""Training throughput of the harness against Hugging Face Trainer and a bare PyTorch loop.

    python benchmarks/throughput.py                      # the committed run (about 40 min on 2 CPU cores)
    python benchmarks/throughput.py --rounds 1 --configs tiny-5m:lora --audit ''   # a quick look

Each runner trains the same model with the same method, precision, batch, data (the harness's
tokenized examples in its length-grouped order, same seed), optimizer, schedule, clipping,
step count and warm-up, each in a fresh process, and reports non-padding tokens per second
over the steps after the warm-up (wall time from the end of the last warm-up step to the end
of the last step, so whatever a loop does between steps counts):

  harness   `python -m harness ...`: the whole product path (job process, memory sampler,
            timer, logging), its result.json's `tokens_per_s`
  trainer   transformers.Trainer, given the harness's model, optimizer, schedule and batches
  bare      forward, backward, clip, optimizer and schedule step, zero_grad: nothing else

and the audit variants, each one addition to the bare loop (or one harness setting):

  bare+sampler   the harness's memory sampler thread running during the loop, and its probe after
                 each forward pass and optimizer step (bare+sampler10ms: the thread sampling
                 every 10 ms, the default before it was measured here)
  bare+logging   the loss read back (.item()) every step, a tqdm bar and a log line every 25 steps
  harness+mmap   the harness with measure.cpu_mmap_threshold_kb=256 (the old CPU default)
  harness+fused / harness+foreach / harness+compile   the optional speed settings

Runners alternate in every round (the order rotates), so slow drifts of the machine hit them
alike; the report gives each runner's median and the median of the per-round ratios to the
bare loop. Results go to benchmarks/results/throughput.md (and .json) with the machine and
versions. It runs as well on a GPU (device=auto).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# model -> the overrides that size it, optimizer steps per run and warm-up steps left out of
# the timing (the real architecture with random weights: memory and speed only, no score)
MODELS = {
    "tiny-5m": (["model=tiny-5m", "train.batch_size=32"], 60, 5),
    "smollm2-135m": (["model=smollm2-135m", "model.init=random", "train.batch_size=8"], 20, 4),
}
METHODS = ("lora", "qlora", "full")
EXTRA = ("tiny-5m:adalora",)  # AdaLoRA's per-step rank bookkeeping, in all three loops
RUNNERS = ("harness", "trainer", "bare")
AUDIT = ("bare+sampler", "bare+sampler10ms", "bare+logging", "harness+mmap", "harness+fused", "harness+foreach", "harness+compile")
HARNESS_VARIANTS = {"harness": [], "harness+mmap": ["measure.cpu_mmap_threshold_kb=256"],
                    "harness+fused": ["train.adamw_impl=fused"], "harness+foreach": ["train.adamw_impl=foreach"],
                    "harness+compile": ["train.compile=true"]}


def common_overrides(steps: int, warmup: int) -> list[str]:
    return ["train.precision=fp32", f"train.max_steps={steps}", f"measure.warmup_steps={warmup}",
            "train.warmup_steps=2", "eval.before=false", "eval.validation=false", "task.n_test=4",
            "report.enabled=false"]


# --------------------------------------------------------------------------- one run


def run_harness(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-harness-") as out:
        proc = subprocess.run([sys.executable, "-m", "harness", *overrides, f"hydra.run.dir={out}"],
                              capture_output=True, text=True, cwd=REPO)
        path = Path(out) / "result.json"
        if proc.returncode != 0 or not path.is_file():
            raise RuntimeError(f"harness run failed: {proc.stderr[-1500:]}")
        m = json.loads(path.read_text())["metrics"]
        return {"tokens_per_s": m["tokens_per_s"], "compiled": m.get("compiled"), "adamw_impl": m.get("adamw_impl")}


def run_child(runner: str, overrides: list[str]) -> dict:
    """A trainer or bare-loop run, in a fresh process of this script."""
    proc = subprocess.run([sys.executable, __file__, "--child", runner, "--", *overrides],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{runner} run failed: {proc.stderr[-1500:]}")
    return json.loads(lines[-1])


def setup(overrides: list[str]) -> dict:
    """The harness's own job setup for `overrides`: config, model with the method applied,
    optimizer, schedule and the batches of every step (same data, order and padding)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import torch

    from harness.config import CONF_DIR
    from harness.data import batch_stream, tokenize_examples
    from harness.job import autocast_for, pick_device, seed_everything
    from harness.methods import apply_method, make_optimizer
    from harness.models import load_model, load_tokenizer, resolve_model_source
    from harness.tasks import load_task
    from harness.train import lr_scheduler

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    model_cfg, method, tcfg = config["model"], config["method"], config["train"]
    device = pick_device(config["device"])
    seed_everything(config["seed"], config["deterministic"])
    source = resolve_model_source(model_cfg)
    tokenizer = load_tokenizer(source, model_cfg["revision"], pad_token=model_cfg.get("pad_token"))
    examples, _ = tokenize_examples(load_task(config["task"])["train"], tokenizer, tcfg["seq_len"])
    model = load_model(source, model_cfg["revision"], dtype=getattr(torch, method["base_dtype"]),
                       quantization=method.get("quantization"), device=device)
    model = apply_method(model, method, max_steps=tcfg["max_steps"],
                         gradient_checkpointing=tcfg["gradient_checkpointing"])
    lr = tcfg["lr"] * tcfg["lr_scale"]
    optimizer = make_optimizer(model, method["optimizer"], lr, tcfg["weight_decay"], tcfg["adamw_impl"])
    scheduler = lr_scheduler(optimizer, tcfg["schedule"], tcfg["warmup_steps"], tcfg["max_steps"])
    stream = batch_stream(examples, tcfg["batch_size"], config["seed"], tokenizer.pad_token_id, device)
    batches = [next(stream) for _ in range(tcfg["max_steps"])]
    return {"config": config, "device": device, "model": model, "optimizer": optimizer, "scheduler": scheduler,
            "batches": batches, "autocast": autocast_for(device, tcfg["precision"])[0]}


def throughput(ends: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens of the steps after the warm-up over the time from the warm-up's end to the last step's end."""
    return sum(tokens[warmup:]) / (ends[-1] - ends[warmup - 1])


def bare_loop(s: dict, sampler_interval: float | None = None, logging_: bool = False) -> dict:
    """The loop every training loop has, and nothing else (plus one audited addition)."""
    import logging

    import torch
    from tqdm import tqdm

    from harness.measure import MemorySampler, synchronize
    from harness.train import is_adalora

    model, optimizer, scheduler, device = s["model"], s["optimizer"], s["scheduler"], s["device"]
    adalora = is_adalora(model)
    tcfg = s["config"]["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = [b.pop("n_tokens") for b in s["batches"]]
    for b in s["batches"]:
        b.pop("n_labels")
    memory = MemorySampler(device, sampler_interval).start() if sampler_interval else None
    log = logging.getLogger("bench")
    steps = tqdm(s["batches"], disable=None) if logging_ else s["batches"]
    ends = []
    model.train()
    probe = memory.probe if memory is not None else (lambda: None)
    for step, batch in enumerate(steps):
        with s["autocast"]():
            loss = model(**batch).loss
        probe()
        loss.backward()
        if tcfg["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, tcfg["max_grad_norm"])
        optimizer.step()
        probe()
        if adalora:  # the method itself: ranks are pruned and reallocated from the gradients
            model.base_model.update_and_allocate(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if logging_:
            value = loss.item()
            steps.set_postfix(loss=f"{value:.4f}")
            if (step + 1) % 25 == 0:
                log.info("step %d loss %.4f", step + 1, value)
        synchronize(device)
        ends.append(time.perf_counter())
    if memory is not None:
        memory.stop()
    return {"tokens_per_s": throughput(ends, tokens, s["config"]["measure"]["warmup_steps"])}


def trainer_loop(s: dict) -> dict:
    """transformers.Trainer on the same model, optimizer, schedule and batches."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from harness.measure import synchronize
    from harness.train import is_adalora

    tcfg, device = s["config"]["train"], s["device"]
    tokens = [b.pop("n_tokens") for b in s["batches"]]
    for b in s["batches"]:
        b.pop("n_labels")
    ends = []

    class InOrder(Trainer):  # the batches in the harness's order, as the other runners take them
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class StepEnds(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            if is_adalora(s["model"]):  # PEFT's recipe for AdaLoRA under Trainer
                s["model"].base_model.update_and_allocate(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=tcfg["max_steps"], per_device_train_batch_size=1, gradient_accumulation_steps=1,
            max_grad_norm=tcfg["max_grad_norm"] or None, logging_strategy="no", save_strategy="no", report_to="none",
            use_cpu=device.type == "cpu", dataloader_pin_memory=False, disable_tqdm=True, seed=s["config"]["seed"],
            bf16=tcfg["precision"] == "bf16", remove_unused_columns=False)
        batches = [{k: v.cpu() for k, v in b.items()} for b in s["batches"]]  # one item = one whole batch
        trainer = InOrder(model=s["model"], args=args, train_dataset=batches, data_collator=lambda items: items[0],
                          optimizers=(s["optimizer"], s["scheduler"]), callbacks=[StepEnds()])
        with torch.autograd.set_grad_enabled(True):
            trainer.train()
    return {"tokens_per_s": throughput(ends, tokens, s["config"]["measure"]["warmup_steps"])}


def child(runner: str, overrides: list[str]) -> None:
    s = setup(overrides)
    if runner == "trainer":
        out = trainer_loop(s)
    else:
        interval = {"bare+sampler": s["config"]["measure"]["sample_interval_s"], "bare+sampler10ms": 0.01}.get(runner)
        out = bare_loop(s, sampler_interval=interval, logging_=runner == "bare+logging")
    print(json.dumps(out))


def run(runner: str, overrides: list[str]) -> dict:
    if runner in HARNESS_VARIANTS:
        return run_harness(overrides + HARNESS_VARIANTS[runner])
    return run_child(runner, overrides)


# --------------------------------------------------------------------------- the benchmark


def machine() -> dict:
    import torch
    import transformers

    from harness.results import cpu_name

    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(rows: list[dict], info: dict, command: str) -> str:
    lines = [f"# Training throughput: harness vs Trainer vs a bare loop", "",
             f"Command: `{command}`", "",
             f"Machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
             f"GPU: {info['gpu'] or 'none'}; Python {info['python']}, torch {info['torch']}, "
             f"transformers {info['transformers']}; {info['date']}.", "",
             "Settings: train.precision=fp32, the arithmetic task, "
             + "; ".join(f"{m}: {' '.join(o)}, {n} steps of which {w} warm-up" for m, (o, n, w) in MODELS.items())
             + ". Tokens/s: median over rounds; ratio: median over rounds of runner / bare loop (or Trainer) "
             "in the same round.", "",
             "| model | method | runner | tokens/s (median) | min | max | x bare loop | x Trainer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['runner']} | {r['median']:,.0f} | {r['min']:,.0f} | "
                     f"{r['max']:,.0f} | {r['vs_bare']:.3f} | {r['vs_trainer']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--configs", default=",".join([f"{m}:{x}" for m in MODELS for x in METHODS] + list(EXTRA)),
                        help="model:method pairs, comma-separated")
    parser.add_argument("--audit", default="tiny-5m:lora", help="model:method pairs for the audit variants ('' for none)")
    parser.add_argument("--only", default="", help="run only these runners (comma-separated; bare always runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.overrides)
        return

    pairs = [tuple(c.split(":")) for c in args.configs.split(",") if c]
    audit = {tuple(c.split(":")) for c in args.audit.split(",") if c}
    plan = [(m, x, RUNNERS + (AUDIT if (m, x) in audit else ())) for m, x in pairs]
    if args.only:
        keep = set(args.only.split(",")) | {"bare", "trainer"}
        plan = [(m, x, tuple(r for r in runners if r in keep)) for m, x, runners in plan]
    def overrides(model: str, method: str) -> list[str]:
        sizing, steps, warmup = MODELS[model]
        return common_overrides(steps, warmup) + sizing + [f"method={method}"]

    for m in {m for m, _ in pairs}:  # build each model into the cache before timing anything
        subprocess.run([sys.executable, "-m", "harness", *common_overrides(2, 1), *MODELS[m][0],
                        f"hydra.run.dir={tempfile.mkdtemp()}"], capture_output=True, cwd=REPO)
    speeds: dict = {}
    for r in range(args.rounds):
        for model, method, runners in plan:
            order = runners[r % len(runners):] + runners[:r % len(runners)]
            for runner in order:
                out = run(runner, overrides(model, method))
                speeds.setdefault((model, method, runner), []).append(out["tokens_per_s"])
                print(f"round {r + 1}/{args.rounds}  {model:13s} {method:6s} {runner:16s} {out['tokens_per_s']:9,.0f} tokens/s"
                      + (f"  (compiled: {out['compiled']})" if runner == "harness+compile" else ""), flush=True)
    rows = []
    for model, method, runners in plan:
        bare, trainer = speeds[(model, method, "bare")], speeds[(model, method, "trainer")]
        for runner in runners:
            v = speeds[(model, method, runner)]
            rows.append({"model": model, "method": method, "runner": runner, "median": statistics.median(v),
                         "min": min(v), "max": max(v), "tokens_per_s": v,
                         "vs_bare": statistics.median(a / b for a, b in zip(v, bare)),
                         "vs_trainer": statistics.median(a / b for a, b in zip(v, trainer))})
    info = machine()
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    text = render(rows, info, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command, "rows": rows,
                                                         "models": MODELS}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
