"""The GPU evidence run (python -m harness.evidence): its checks before anything runs, the facts
it tests, and (slow) the whole run at tiny sizes on the CPU, as CI runs it so that the script a
GPU runs once has run every line before."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from fake_cuda import FakeCuda, FakeGpu


def test_a_run_without_what_it_needs_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import bitsandbytes.cextension
    import torch

    from harness import evidence

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    FakeCuda(monkeypatch, [])  # NVML and torch see no GPU
    assert evidence.main(["--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: no CUDA GPU visible (run with --dry-run on a machine without one)"]
    assert not (tmp_path / "run").exists()
    fake = FakeCuda(monkeypatch, [FakeGpu()])
    assert not bitsandbytes.cextension.lib.compiled_with_cuda  # this CPU machine's bitsandbytes
    assert evidence.missing(False, tmp_path).startswith("bitsandbytes ") and "has no CUDA library" in \
        evidence.missing(False, tmp_path)
    monkeypatch.setattr(bitsandbytes.cextension.lib, "compiled_with_cuda", True)
    fake.allocate(60_000)  # 60 GB of the 80 held by something else
    assert evidence.missing(False, tmp_path) == "GPU 0 has 21.1 GiB free; the run needs 40 GiB"  # 81,559 MiB less 60,000
    fake.free(60_000), torch.cuda.empty_cache()
    monkeypatch.setattr(evidence, "FREE_DISK_GIB", 10**6)
    assert evidence.missing(False, tmp_path).endswith("of disk free; the run needs 1000000 GiB (random-weight checkpoints)")
    monkeypatch.setattr(evidence, "FREE_DISK_GIB", 0)
    assert evidence.missing(False, tmp_path) is None
    monkeypatch.setattr(evidence, "PACKAGES", (*evidence.PACKAGES, "no_such_package"))
    assert evidence.missing(True, tmp_path).startswith("missing Python packages: no_such_package")


def test_every_method_runs_in_the_1b_steps_once():
    from harness.evidence import methods, steps

    parts = [s for s in steps() if s.name.startswith("1b-")]
    swept = [m for s in parts for o in s.gpu if o.startswith("method=") for m in o.removeprefix("method=").split(",")]
    assert sorted(swept) == methods() and len(methods()) >= 30
    for step in steps():  # the dry run sweeps what the GPU run sweeps, at tiny sizes
        sweep = lambda overrides: [o for o in overrides if o.startswith(("method=", "train.gradient_checkpointing=",
                                                                         "memory_limit_mb=", "train.nproc_per_node="))]
        assert [o.split("=")[0] for o in sweep(step.gpu)] == [o.split("=")[0] for o in sweep(step.dry)], step.name


def rows(**by_method):
    """Result rows of step 1b: method -> (peak MiB, tokens/s, trainable, FLOPs per token)."""
    return pd.DataFrame([{"step": "1b-1", "method": m, "status": "ok", "metrics.peak_memory_mb": mem,
                          "metrics.tokens_per_s": tps, "metrics.trainable_params": params,
                          "metrics.flops_per_token": flops, "config.train.gradient_checkpointing": False}
                         for m, (mem, tps, params, flops) in by_method.items()])


def test_the_facts_are_judged_from_the_numbers():
    from harness.report.evidence import facts

    good = rows(full=(9000, 900, 10**9, 6e9), lora=(4000, 1000, 10**6, 4e9), lora8=(3000, 700, 10**6, 4e9),
                qlora=(2000, 800, 10**6, 4e9), adalora=(4100, 880, 10**6, 4e9), prompt=(4300, 950, 10**4, 4.4e9),
                prefix=(4200, 990, 10**5, 4.1e9))
    held = {f["fact"].split(".")[0]: f["held"] for f in facts(good)}
    assert held == {"1": "yes", "2": "not tested", "3": "yes", "4": "yes", "5": "not tested", "6": "yes", "7": "yes",
                    "8": "not tested"}
    bad = good.copy()
    bad.loc[bad["method"] == "qlora", "metrics.tokens_per_s"] = 1100  # QLoRA faster than LoRA: suspect
    bad.loc[bad["method"] == "lora8", "metrics.peak_memory_mb"] = 5000  # 8-bit above bf16
    found = {f["fact"].split(".")[0]: f for f in facts(bad)}
    assert found["1"]["held"] == "no" and "lora8 5,000 MiB" in found["1"]["numbers"]
    assert found["3"]["held"] == "no" and found["3"]["numbers"] == "1b: qlora 1,100 vs lora 1,000 tokens/s (1.10x)"


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_renders_its_pages(tmp_path):
    out = tmp_path / "evidence"
    proc = subprocess.run([sys.executable, "-m", "harness.evidence", "--dry-run", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "index.html").is_file() and (out / "evidence.html").is_file()
    results = {}
    for path in sorted((out / "sweeps").rglob("result.json")):
        r = json.loads(path.read_text())
        results.setdefault(path.relative_to(out / "sweeps").parts[0], []).append(r)
    from harness.evidence import methods, steps

    assert set(results) == {s.name for s in steps()}  # every step ran, the 2-rank one too
    assert sorted(r["method"] for name, rs in results.items() if name.startswith("1b-") for r in rs) == methods()
    assert all(r["status"] == "ok" for name, rs in results.items() if name != "oom" for r in rs), \
        [(name, r["method"], r["error"]) for name, rs in results.items() for r in rs if r["status"] != "ok"]
    assert [r["status"] for r in results["oom"]] == ["oom", "ok"]  # held below its need, then the next job runs
    assert results["fsdp"][0]["env"]["launch"]["world_size"] == 2
    assert all(r["metrics"]["score"] is None and r["config"]["task"]["name"] == "lengths"
               for rs in results.values() for r in rs)
    facts = pd.read_csv(out / "facts.csv")
    assert len(facts) == 8 and set(facts["held"]) <= {"yes", "no", "not tested"}
    published = pd.read_csv(out / "published.csv")
    assert list(published["method"]) == ["lora", "qlora", "full", "lora"] and published["ours_gib"].notna().all()
    page = (out / "evidence.html").read_text()
    assert "dry run on the CPU" in page and "none of its numbers is evidence about GPUs" in page


def test_steps_after_the_deadline_are_skipped_and_a_run_without_results_says_so(tmp_path, capsys):
    from harness import evidence

    assert evidence.main(["--dry-run", "--minutes", "0", "--out", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: no job wrote a result; see {tmp_path / 'run' / 'logs'}"]


@pytest.mark.parametrize("name,slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
                                       ("Tesla V100-SXM2-32GB", "v100")])
def test_the_runs_folder_is_named_for_its_gpu(monkeypatch, name, slug):
    from harness.evidence import gpu_slug

    FakeCuda(monkeypatch, [FakeGpu(name=name)])
    assert gpu_slug() == slug
