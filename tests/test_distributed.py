"""One job across several processes (train.nproc_per_node, harness/distributed.py): two ranks
on the CPU with gloo, started by torchrun's machinery like on GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, compose, results_under, run_cli
from harness.config import validate
from harness.errors import ConfigError

# a whole job cut to a few steps; 33 examples make each epoch's second batch one example, so a
# rank gets a share without any example and must still join its step's collectives
SHORT = ["device=cpu", "train.max_steps=4", "train.warmup_steps=1", "measure.warmup_steps=1", "task.n_train=33",
         "task.n_test=8", "eval.validation=false", "report.enabled=false"]


def by_ranks(folder: Path) -> dict:
    return {(r["method"], r["config"]["train"]["nproc_per_node"]): r for r in results_under(folder)}


def test_two_ranks_train_as_one_process_does_on_the_same_global_batch(tmp_path):
    """full, lora and qlora (bitsandbytes' CPU 4-bit layers shard): the loss of every step, on
    2 ranks, equals one process's on the same global batch (float32, dropout off: each rank
    draws its own dropout masks); so does the score, scored before training too (generation
    and choice scoring on the sharded model). Only rank 0 writes; the job records each
    rank's memory and device."""
    common = ["train.nproc_per_node=1,2", "train.precision=fp32", *SHORT]
    full = run_cli(["-m", "method=full", *common, f"hydra.sweep.dir={tmp_path / 'full'}"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-2000:]
    peft = run_cli(["-m", "method=lora,qlora", "method.peft.lora_dropout=0", *common,
                    f"hydra.sweep.dir={tmp_path / 'peft'}"], cwd=tmp_path)
    assert peft.returncode == 0, peft.stderr[-2000:]
    runs = {**by_ranks(tmp_path / "full"), **by_ranks(tmp_path / "peft")}
    assert sorted(runs) == [(m, n) for m in ("full", "lora", "qlora") for n in (1, 2)]
    for method in ("full", "lora", "qlora"):
        one, two = runs[method, 1], runs[method, 2]
        assert one["status"] == two["status"] == "ok", (one["error"], two["error"])
        # qlora's 4-bit layers compute in bf16 whatever train.precision says: 0.03% apart, measured
        tolerance = 2e-3 if method == "qlora" else 1e-5
        assert two["metrics"]["train_losses"] == pytest.approx(one["metrics"]["train_losses"], rel=tolerance), method
        assert two["metrics"]["score"] == one["metrics"]["score"], method
        assert two["metrics"]["score_before"] == one["metrics"]["score_before"], method
        per_rank = two["metrics"]["peak_memory_mb_per_rank"]
        assert len(per_rank) == 2 and two["metrics"]["peak_memory_mb"] == max(per_rank) > 0
        launch = two["env"]["launch"]
        assert launch["world_size"] == 2 and [r["device"] for r in launch["rank_devices"]] == ["cpu", "cpu"]
        assert "world_size" not in one["env"]["launch"] and "peak_memory_mb_per_rank" not in one["metrics"]
        assert two["metrics"]["trainable_params"] == one["metrics"]["trainable_params"]
    # one result and one predictions file in the job's folder, nothing of the ranks left over
    folders = [p.parent for p in (tmp_path / "peft").rglob("result.json")
               if json.loads(p.read_text())["config"]["train"]["nproc_per_node"] == 2]
    for folder in folders:
        assert not list(folder.glob(".rank-*")) and not (folder / ".payload.json").exists()
        assert (folder / "predictions.jsonl").is_file()


def rank_pid(sweep_pid: int, rank: int) -> int | None:
    """The pid of rank `rank` of the 2-rank job a sweep (the process `sweep_pid`) runs now: its
    agent is the one process under the sweep with two children and no grandchildren, started in
    rank order."""
    import psutil

    for process in psutil.Process(sweep_pid).children(recursive=True):
        try:
            ranks = process.children()
            if len(ranks) == 2 and not any(r.children() for r in ranks):
                return sorted(ranks, key=lambda r: (r.create_time(), r.pid))[rank].pid
        except psutil.Error:
            continue
    return None


def test_a_killed_rank_ends_its_job_the_sweep_goes_on_and_a_rerun_resumes(tmp_path):
    """Rank 1 of a 2-rank job killed mid-training (SIGSEGV: a crash): the job ends `error`
    naming the rank and how it died, the sweep's next job runs, the sweep exits 1; the same
    command again runs the killed job and keeps the other. (A rank killed by SIGKILL ends the
    job `oom`, as one process does: on Linux usually the kernel's OOM killer; like any oom, a
    rerun keeps it.)"""
    args = [sys.executable, "-m", "harness", "-m", "method=lora", "train.nproc_per_node=2,1", "train.max_steps=40",
            "train.log_every=1",
            *[s for s in SHORT if not s.startswith("train.max_steps")], f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, killed = time.time() + 120, None
    while killed is None and time.time() < deadline and first.poll() is None:
        logs = list((tmp_path / "sweep").glob("0_*/job.log"))
        if logs and "step 2/40" in logs[0].read_text() and (pid := rank_pid(first.pid, 1)):
            os.kill(pid, signal.SIGSEGV)
            killed = pid
        time.sleep(0.1)
    out, err = first.communicate(timeout=300)
    assert killed, f"rank 1 never seen training: {err[-2000:]}"
    assert first.returncode == 1, err[-2000:]
    runs = by_ranks(tmp_path / "sweep")
    dead, other = runs["lora", 2], runs["lora", 1]
    assert dead["status"] == "error" and dead["error"] == "rank 1 of 2: process killed by signal SIGSEGV", dead["error"]
    assert other["status"] == "ok"
    again = run_cli(args[3:], cwd=tmp_path)  # the same command, in this process (no second interpreter)
    assert again.returncode == 0, again.stderr[-2000:]
    runs = by_ranks(tmp_path / "sweep")
    assert runs["lora", 2]["status"] == "ok" and len(runs["lora", 2]["metrics"]["train_losses"]) == 40
    assert runs["lora", 1]["env"]["start_time"] == other["env"]["start_time"]  # kept, not rerun


@pytest.mark.parametrize("overrides, message", [
    (["method=adalora"], "method 'adalora' does not shard with FSDP (train.nproc_per_node=2); methods that do: "
                         "dora, full, lora, qlora"),
    (["forgetting=synthetic"], "forgetting=synthetic: scores the base model in one process, not with "
                               "train.nproc_per_node=2"),
    (["train.compile=true"], "train.compile=true: not with train.nproc_per_node=2"),
])
def test_what_cannot_run_across_ranks_is_refused_in_one_line(overrides, message):
    config = compose(["train.nproc_per_node=2", *overrides])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert str(e.value).startswith(message)


def test_an_unshardable_method_is_refused_before_launch(tmp_path):
    run = run_cli(["method=ia3", "train.nproc_per_node=2", "device=cpu"], cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: method 'ia3' does not shard with FSDP (train.nproc_per_node=2); methods that do: dora, full, lora, "
        "qlora (a method config with `fsdp: true`)"]
    assert not list(tmp_path.rglob("result.json"))


def test_jobs_of_several_ranks_are_refused_by_the_one_gpu_per_job_launcher(tmp_path):
    run = run_cli(["-m", "hydra/launcher=local-gpus", "train.nproc_per_node=2", "device=cpu"], cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: train.nproc_per_node=2 with hydra/launcher=local-gpus: that launcher gives each job one GPU; "
        "run jobs of several ranks with the default launcher (or slurm)"]


def test_each_rank_takes_its_share_of_the_global_batch():
    import torch

    from harness.data import batch_stream
    from harness.distributed import rank_batches

    examples = [{"input_ids": [1] * n, "labels": [-100] * (n - 2) + [5, 6]} for n in (4, 6, 5)]
    batches = list(batch_stream(examples, 3, 0, 0, "cpu").__next__() for _ in range(1))
    whole = batches[0]
    shares = [next(rank_batches(iter([dict(whole)]), r, 2)) for r in (0, 1)]
    assert [s["input_ids"].shape[0] for s in shares] == [2, 1]
    assert sum(s["n_labels"] for s in shares) == whole["n_labels"] == shares[0]["world_labels"]
    assert all(s["n_tokens"] == whole["n_tokens"] for s in shares)
    assert torch.equal(shares[1]["input_ids"][0], whole["input_ids"][1][: shares[1]["input_ids"].shape[1]])
    # a batch of one example: rank 1 gets it with no label, to join the collectives
    single = {k: v[:1] if hasattr(v, "shape") else v for k, v in whole.items()}
    empty = next(rank_batches(iter([single]), 1, 2))
    assert empty["n_labels"] == 0 and (empty["labels"] == -100).all() and empty["input_ids"].shape[0] == 1
