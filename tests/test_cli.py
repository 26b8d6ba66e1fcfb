"""`python -m harness` as a user runs it: default job, sweeps, help, and bad input."""

import time

import pytest

from conftest import FAST, cli, results_under
from harness import results


def test_default_job_runs_under_30_seconds(tmp_path):
    start = time.monotonic()
    proc = cli([], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 30, f"default job took {elapsed:.1f} s"
    (result,) = results_under(tmp_path / "outputs")
    results.validate(result)
    assert (result["status"], result["model"], result["method"], result["task"]) == (
        "ok", "tiny-1m", "qlora", "arithmetic")
    assert "result: " + str(tmp_path / "outputs") in proc.stdout + proc.stderr  # says where
    assert result["env"]["command"] == "python -m harness"


def test_multirun_runs_every_job_in_its_own_process(tmp_path):
    proc = cli(["-m", "method=lora,prompt", "seed=0,1", *FAST, "train.max_steps=6", "eval.before=false",
                f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = results_under(tmp_path / "sweep")
    assert sorted((r["method"], r["seed"]) for r in found) == [
        ("lora", 0), ("lora", 1), ("prompt", 0), ("prompt", 1)]
    assert all(r["status"] == "ok" for r in found)
    # Each job ran in a fresh process of its own, so each peak memory is its own.
    assert len({r["env"]["pid"] for r in found}) == 4


def test_help_lists_groups_and_options(tmp_path):
    proc = cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for word in ("model:", "method:", "task:", "qlora", "lora8", "adalora", "prefix", "prompt", "full",
                 "tiny-1m", "tiny-5m", "tiny-13m", "arithmetic", "max_steps"):
        assert word in proc.stdout


BAD_INPUT = [
    (["model=tiny-9000"], "unknown model 'tiny-9000' (allowed: path, tiny-13m, tiny-1m, tiny-5m)"),
    (["-m", "method=lora,qlora4"], "unknown method 'qlora4' (allowed: adalora, full, lora, lora8, prefix, prompt, qlora)"),
    (["task=gsm9k"], "unknown task 'gsm9k' (allowed: arithmetic)"),
    (["method=lora", "method.peft.r=0"], "method.peft.r=0: must be a positive integer"),
    (["train.max_steps=0"], "train.max_steps=0: must be a positive integer"),
    (["train.batch_size=-4"], "train.batch_size=-4: must be a positive integer"),
    (["train.lr=abc"], "train.lr='abc': must be a positive number"),
    (["train.schedule=step"], "train.schedule='step': allowed values are cosine, linear, constant"),
    (["model=path", "model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': no such model folder"),
    (["model=path"], "model.name_or_path must be set: add model.name_or_path=... to the command line"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_gets_one_clear_line(tmp_path, args, message):
    proc = cli(args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not list(tmp_path.rglob("result.json"))
    assert not list(tmp_path.rglob("*.tmp"))


# Refused by the job process, after it read the model's config.
@pytest.mark.parametrize("args,message", [
    (["method=lora", "method.peft.target_modules=[attn_q]"],
     "method 'lora' cannot apply to this model"),
    (["method=prompt", "method.peft.num_virtual_tokens=250"],
     "num_virtual_tokens=250 + train.seq_len=64 exceeds the model's max_position_embeddings=256"),
    (["method=full", "+method.quantization.load_in_4bit=true"],
     "a quantized base cannot be fully fine-tuned"),
])
def test_method_that_cannot_apply_is_refused(tmp_path, args, message):
    proc = cli(args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not list(tmp_path.rglob("result.json"))
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


def test_failing_job_writes_an_error_result_and_exits_1(tmp_path):
    # A Hub id cannot load offline: the job fails after it started, so it is a result.
    proc = cli(["model=path", "model.name_or_path=no-such-org/no-such-model", *FAST], cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    (result,) = results_under(tmp_path / "outputs")
    results.validate(result)
    assert result["status"] == "error" and "no-such-org/no-such-model" in result["error"]
    assert result["metrics"]["score"] is None
