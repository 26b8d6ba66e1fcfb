"""`python -m harness.evidence [--dry-run] [--out DIR] [--minutes M]`: the GPU evidence run.

On one GPU of the H100 / H200 class, on architecture-only models (`model.init=random`: memory
and speed, no scores) and random token ids of set lengths (`task=lengths`), within about nine
minutes, in this order (each step is one `python -m harness -m ...` sweep, as a user runs it):

  8b      qlora, lora8 and lora on Llama-3.1-8B at batch 2 x 2048, gradient checkpointing on
          and off: torchtune's published rows
  3b      LoRA r32 on Llama-3.2-3B at batch 4 x 768: PEFT's method comparison's LoRA row
  oom     a job held below its need (memory_limit_mb) in a sweep whose next job runs
  1b      every method of conf/method/ on Llama-3.2-1B at batch 4 x 512, a few steps each (in
          parts, so the deadline can fall between them)
  8b-full full fine-tuning of Llama-3.1-8B as above (fp32 AdamW: expected not to fit 80 GB)
  fsdp    lora on Llama-3.2-1B across 2 GPUs (train.nproc_per_node=2), on a machine with 2+

Then the report of every job (harness/report) into DIR, and DIR/evidence.html with
DIR/facts.csv and DIR/published.csv beside it: each fact of "what a correct harness must
reproduce" (../shared/reference.md) that these jobs can test, whether it held and its numbers;
our figures beside torchtune's and PEFT's published ones (same model, batch and length) with
the ratio and the differences in setup.

It first checks what it needs (a CUDA GPU, its free memory, the packages and bitsandbytes' CUDA
library, the disk) and says in one line what is missing (exit 2). A step that would start after
the deadline (`--minutes`, 9) is skipped and listed as such; a job the deadline cuts off ends as
cancelled, like any job sent SIGTERM.

`--dry-run` runs every step on the CPU at tiny sizes (the tiny-1m model, 64-token examples, 3
steps), the same commands, report and page, in a few minutes: CI runs it, so the script cannot
rot before a GPU runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.config import CONF_DIR, host_gpus

# What every job of the run shares: random token ids, no scoring, a few timed steps.
COMMON = ["task=lengths", "task.n_train=64", "eval.before=false", "eval.validation=false", "train.max_steps=6",
          "measure.warmup_steps=2", "train.log_every=1", "report.enabled=false"]
GPU = ["model.init=random"]
DRY = ["device=cpu", "task.n_train=16", "train.max_steps=3", "measure.warmup_steps=1"]
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "evaluate", "hydra", "omegaconf",
            "hqq", "galore_torch", "apollo_torch", "pynvml", "psutil", "jsonschema", "scipy", "pandas",
            "matplotlib", "jinja2")
FREE_GPU_GIB = 40   # the 8B rows without gradient checkpointing need about this much
FREE_DISK_GIB = 40  # random-weight checkpoints: 8B 16 GB, 3B 6.4 GB, 1B 2.5 GB, and the results


@dataclass
class Step:
    name: str
    what: str
    gpu: list[str]           # the step's own overrides on a GPU
    dry: list[str]           # the same step at tiny sizes on the CPU
    min_gpus: int = 1
    results: list[Path] = field(default_factory=list)


def methods() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))


def steps(parts: int = 5) -> list[Step]:
    batch_2x2048 = ["train.batch_size=2", "task.seq_len=2048"]
    tiny = ["model=tiny-1m", "task.seq_len=64"]
    out = [
        Step("8b", "torchtune's rows: qlora, lora8, lora on Llama-3.1-8B, batch 2 x 2048, gradient checkpointing "
                   "on and off",
             ["model=llama-3.1-8b", "method=qlora,lora8,lora", *batch_2x2048, "train.gradient_checkpointing=true,false"],
             [*tiny, "method=qlora,lora8,lora", "train.batch_size=2", "train.gradient_checkpointing=true,false"]),
        Step("3b", "PEFT's method comparison's LoRA row: r 32 on Llama-3.2-3B, batch 4 x 768",
             ["model=llama-3.2-3b", "method=lora", "method.peft.r=32", "train.batch_size=4", "task.seq_len=768"],
             [*tiny, "method=lora", "method.peft.r=32", "train.batch_size=4"]),
        Step("oom", "a job held below its need (memory_limit_mb=512) in a sweep whose next job runs",
             ["model=llama-3.2-1b", "method=lora", "train.batch_size=4", "task.seq_len=512", "memory_limit_mb=512,null"],
             [*tiny, "method=lora", "train.batch_size=4", "memory_limit_mb=1,null"]),
    ]
    names = methods()
    for i in range(parts):
        chunk = ",".join(names[i::parts])
        out.append(Step(f"1b-{i + 1}", f"methods {chunk} on Llama-3.2-1B, batch 4 x 512",
                        ["model=llama-3.2-1b", f"method={chunk}", "train.batch_size=4", "task.seq_len=512"],
                        [*tiny, f"method={chunk}", "train.batch_size=4"]))
    out += [
        Step("8b-full", "full fine-tuning (fp32 AdamW) of Llama-3.1-8B, batch 2 x 2048, gradient checkpointing on",
             ["model=llama-3.1-8b", "method=full", *batch_2x2048, "train.gradient_checkpointing=true"],
             [*tiny, "method=full", "train.batch_size=2", "train.gradient_checkpointing=true"]),
        Step("fsdp", "lora on Llama-3.2-1B across 2 GPUs (FSDP), batch 8 x 512",
             ["model=llama-3.2-1b", "method=lora", "train.batch_size=8", "task.seq_len=512", "train.nproc_per_node=2"],
             [*tiny, "method=lora", "train.batch_size=8", "train.nproc_per_node=2"], min_gpus=2),
    ]
    return out


def importable(name: str) -> bool:
    if name in sys.modules:  # imported already (or blocked: None)
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def missing(dry_run: bool, out: Path) -> str | None:
    """What the run lacks, in one line; None when it has everything."""
    absent = [name for name in PACKAGES if not importable(name)]
    if absent:
        return f"missing Python packages: {', '.join(absent)} (docs/gpu-evidence.md says how to carry them)"
    if dry_run:
        return None
    import torch

    if not host_gpus() or not torch.cuda.is_available():
        return "no CUDA GPU visible (run with --dry-run on a machine without one)"
    import bitsandbytes.cextension

    if not bitsandbytes.cextension.lib.compiled_with_cuda:
        return (f"bitsandbytes {bitsandbytes.__version__} has no CUDA library for this torch "
                f"(CUDA {torch.version.cuda}): install a bitsandbytes built for it")
    free_gpu = torch.cuda.mem_get_info(0)[0] / 2**30
    if free_gpu < FREE_GPU_GIB:
        return f"GPU 0 has {free_gpu:.1f} GiB free; the run needs {FREE_GPU_GIB} GiB"
    free_disk = shutil.disk_usage(next(p for p in [out, *out.parents] if p.exists())).free / 2**30
    if free_disk < FREE_DISK_GIB:
        return f"{out} has {free_disk:.1f} GiB of disk free; the run needs {FREE_DISK_GIB} GiB (random-weight checkpoints)"
    return None


def run_step(step: Step, out: Path, dry_run: bool, deadline: float, log) -> str:
    """Run one step's sweep; how it ended, in a few words."""
    sweep = out / "sweeps" / step.name
    command = [sys.executable, "-m", "harness", "-m", *COMMON, *(DRY + step.dry if dry_run else GPU + step.gpu),
               f"hydra.sweep.dir={sweep}"]
    log(f"step {step.name}: {step.what}\n  {' '.join(command[1:])}")
    started = time.time()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{step.name}.log", "w") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:  # past the deadline: the running job ends as cancelled, the others stay
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = "cut off at the deadline"
    step.results = sorted(sweep.rglob("result.json"))
    outcome = f"{len(step.results)} job(s), exit {code}, {time.time() - started:.0f} s"
    log(f"  {outcome}")
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.evidence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--out", type=Path, help="the run's folder (default: reports/<gpu>-<date>, "
                                                 "or reports/evidence-dry-run)")
    parser.add_argument("--minutes", type=float, default=9.0, help="start no step after this many minutes (9)")
    args = parser.parse_args(argv)
    out = args.out or Path("reports") / ("evidence-dry-run" if args.dry_run else f"{gpu_slug()}-{dt.date.today()}")
    if (problem := missing(args.dry_run, out)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.time()
    deadline = started + args.minutes * 60
    gpus = len(host_gpus())
    ran: list[tuple[Step, str]] = []
    for step in steps():
        if not args.dry_run and gpus < step.min_gpus:
            ran.append((step, f"skipped: needs {step.min_gpus} GPUs, this machine has {gpus}"))
        elif time.time() >= deadline:
            ran.append((step, f"skipped: the {args.minutes:g}-minute deadline had passed"))
        else:
            ran.append((step, run_step(step, out, args.dry_run, deadline, log)))
    sweeps = [out / "sweeps" / step.name for step, _ in ran if step.results]
    if not sweeps:
        print(f"error: no job wrote a result; see {out / 'logs'}", file=sys.stderr)
        return 1
    report = subprocess.run([sys.executable, "-m", "harness.report", *map(str, sweeps), "--out", str(out)],
                            capture_output=True, text=True)
    if report.returncode != 0:
        print(f"error: the report could not be rendered: {report.stderr.strip()}", file=sys.stderr)
        return 1
    from harness.report.evidence import write_page

    page = write_page(out, ran, dry_run=args.dry_run, minutes=(time.time() - started) / 60)
    log(f"evidence: {page} (report: {out / 'index.html'}) in {(time.time() - started) / 60:.1f} minutes")
    (out / "run.log").write_text("\n".join(lines) + "\n")
    return 0


def gpu_slug() -> str:
    """'h100', 'a100', 'rtx-4090', ... from GPU 0's name (its words up to the first with a digit),
    for the run's folder."""
    import re

    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    words = [w for w in re.split(r"[\s-]+", name) if w and w not in ("NVIDIA", "GeForce", "Tesla")]
    upto = next((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), None)
    return "-".join(words[: upto + 1]).lower() if upto is not None else "gpu"


if __name__ == "__main__":
    sys.exit(main())
