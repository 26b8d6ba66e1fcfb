"""A sweep survives kills, reruns and bad input; results reproduce."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, cli, needs_root, results_under, run_cli


def start(args, cwd: Path) -> subprocess.Popen:
    """`python -m harness ARGS` in its own process group, as a terminal or scheduler runs it
    (with Ctrl-C's default action: a shell without job control starts background commands
    with SIGINT ignored, which every process below would inherit)."""
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


SWEEP = ["-m", "method=lora,prompt,full,prefix", *FAST, "train.max_steps=10", "eval.before=false",
         "report.enabled=false"]


@pytest.mark.slow  # a real sweep process, SIGKILLed: run by .ci/run with -m slow
def test_sweep_killed_during_its_third_job_resumes_without_rerunning_finished_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    args = [*SWEEP, f"hydra.sweep.dir={sweep}"]
    proc = start(args, tmp_path)
    wait_for(lambda: any(sweep.glob("2_*/job.log")))  # the third job has started
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep, its job server and its job, all at once
    proc.wait()
    first = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("result.json")}
    assert set(first) == {"0_tiny-1m_lora_arithmetic_s0", "1_tiny-1m_prompt_arithmetic_s0"}

    rerun = run_cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    output = rerun.stdout + rerun.stderr
    after = {p.parent.name: json.loads(p.read_text()) for p in sweep.rglob("result.json")}
    assert len(after) == 4 and all(r["status"] == "ok" for r in after.values())
    for name, result in first.items():  # not rerun: the very same results
        assert after[name]["env"]["start_time"] == result["env"]["start_time"]
        assert after[name]["env"]["pid"] == result["env"]["pid"]
        assert f"skipped {name}: complete (ok)" in output
    assert "running 2_tiny-1m_full_arithmetic_s0" in output
    assert not list(sweep.rglob("*.tmp"))
    assert len(list(sweep.rglob("result*.json"))) == 4  # no duplicates


def test_changing_a_training_key_reruns_the_affected_jobs_only(tmp_path):
    sweep = tmp_path / "sweep"
    common = ["-m", "method=lora", *FAST, "eval.before=false", "report.enabled=false", f"hydra.sweep.dir={sweep}"]
    assert run_cli([*common, "train.max_steps=4,5"], cwd=tmp_path).returncode == 0
    before = {r["config"]["train"]["max_steps"]: r for r in results_under(sweep)}
    proc = run_cli([*common, "train.max_steps=4,6"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = {r["config"]["train"]["max_steps"]: r for r in results_under(sweep)}
    assert set(after) == {4, 6}
    assert after[4]["env"]["start_time"] == before[4]["env"]["start_time"]  # same config: kept
    assert after[6]["config_hash"] != before[5]["config_hash"]
    # The result of the old configuration is kept aside, never lost.
    (kept,) = sweep.glob(f"1_*/result.{before[5]['config_hash']}.json")
    assert json.loads(kept.read_text())["config"]["train"]["max_steps"] == 5


def test_force_reruns_a_complete_job(tmp_path):
    from harness.__main__ import prepare_folder
    from harness.results import config_hash

    job = tmp_path / "job"
    job.mkdir()
    result = json.loads((REPO / "tests" / "golden" / "intel-amx" / "lora" / "result.json").read_text())
    # The hash of this code and the installed packages (the golden's own hash names the package
    # versions it was recorded with, which a newer release on the registry changes).
    wanted = result["config_hash"] = config_hash(result["config"])
    assert config_hash(json.loads(json.dumps(result["config"]))) == wanted  # stable across a JSON round trip
    (job / "result.json").write_text(json.dumps(result))
    assert prepare_folder(job, wanted, force=False) is True   # complete: skipped
    assert prepare_folder(job, wanted, force=True) is False   # force=true: run again
    (job / ".result.json.abc.tmp").write_text("{")  # a write killed half-way
    assert prepare_folder(job, "0" * 16, force=False) is False
    assert not list(job.glob("*.tmp")) and (job / f"result.{wanted}.json").is_file()


def job_holding(tmp_path: Path, status: str | None, text: str | None = None) -> tuple[Path, dict]:
    """A job folder holding the golden lora result with `status` (or the raw `text`)."""
    from harness.results import config_hash

    job = tmp_path / "job"
    job.mkdir()
    result = json.loads((REPO / "tests" / "golden" / "intel-amx" / "lora" / "result.json").read_text())
    result.update(status=status, error=None if status in ("ok", None) else f"ended {status}",
                  config_hash=config_hash(result["config"]))
    (job / "result.json").write_text(text if text is not None else json.dumps(result))
    return job, result


@pytest.mark.parametrize("status,kept", [("ok", True), ("oom", True), ("diverged", True),
                                         ("error", False), ("cancelled", False)])
def test_resume_keeps_finished_results_and_reruns_failed_ones(tmp_path, status, kept):
    from harness.__main__ import prepare_folder

    from harness.results import reusable

    job, result = job_holding(tmp_path, status)
    assert reusable(job / "result.json", result["config_hash"]) == (
        kept, f"complete ({status}), same configuration hash {result['config_hash']}" if kept
        else f"last run ended {status}")
    assert prepare_folder(job, result["config_hash"], force=False) is kept
    assert json.loads((job / "result.json").read_text())["status"] == status  # left for the rerun to replace


def test_resume_reruns_a_torn_result_and_clears_a_killed_write(tmp_path):
    from harness.__main__ import prepare_folder
    from harness.results import config_hash

    golden = json.loads((REPO / "tests" / "golden" / "intel-amx" / "lora" / "result.json").read_text())
    text = json.dumps(golden)
    job, _ = job_holding(tmp_path, None, text=text[: len(text) // 2])  # cut mid-write (no atomic rename)
    (job / ".result.json.x1.tmp").write_text(text[:100])
    from harness.results import reusable

    assert reusable(job / "result.json", config_hash(golden["config"]))[1] == "result unreadable (JSONDecodeError)"
    assert prepare_folder(job, config_hash(golden["config"]), force=False) is False
    assert not list(job.glob("*.tmp"))


def test_keys_outside_the_hash_keep_a_result_and_others_rerun_it():
    from harness.results import config_hash

    config = json.loads((REPO / "tests" / "golden" / "intel-amx" / "lora" / "result.json").read_text())["config"]
    base = config_hash(config)
    unhashed = [("report", {"enabled": False, "out": "/elsewhere"}), ("sweep_name", "other"), ("force", True)]
    for key, value in unhashed:
        assert config_hash({**config, key: value}) == base, key
    assert config_hash({**config, "train": {**config["train"], "log_every": 1}}) == base
    for key, value in [("seed", 7), ("device", "cuda"), ("budget", "params")]:
        assert config_hash({**config, key: value}) != base, key
    assert config_hash({**config, "train": {**config["train"], "lr": 1e-5}}) != base
    assert config_hash({**config, "method": {**config["method"], "name": "other"}}) != base


def test_a_package_version_change_reruns_a_result_and_keeps_the_old_one(tmp_path, monkeypatch):
    import harness.results as results
    from harness.__main__ import prepare_folder

    job, result = job_holding(tmp_path, "ok")
    versions = results.package_versions()
    monkeypatch.setattr(results, "package_versions", lambda: {**versions, "torch": "9.9.9"})
    wanted = results.config_hash(result["config"])
    assert wanted != result["config_hash"]
    assert prepare_folder(job, wanted, force=False) is False  # rerun under the new torch
    assert json.loads((job / f"result.{result['config_hash']}.json").read_text())["status"] == "ok"  # kept aside
    monkeypatch.setattr(results, "package_versions", lambda: {**versions, "hydra-core": "0.0.1"})
    assert results.config_hash(result["config"]) == result["config_hash"]  # a package that computes nothing


@pytest.mark.slow  # a real sweep process, signalled: run by .ci/run with -m slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_job_records_itself_as_cancelled(tmp_path, sig):
    proc = start(["train.max_steps=5000", "train.log_every=1", "hydra.run.dir=run"], tmp_path)
    log = tmp_path / "run" / "job.log"
    wait_for(lambda: log.is_file() and "step 2/" in log.read_text())
    os.killpg(proc.pid, sig)  # as Ctrl-C (SIGINT to the group) or a scheduler (SIGTERM) does
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # leave no job training on after a failure
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, out
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == "cancelled"
    assert result["error"] == f"cancelled by {sig.name}"
    from harness.results import validate

    validate(result)


def test_repro_passes_on_a_fresh_result_and_fails_on_an_altered_one(tmp_path, capsys):
    """A result recorded here reruns bit-identically here (the committed goldens come from
    another CPU, whose bf16 kernels differ: tests/test_golden.py compares with tolerances)."""
    from harness.repro import main as repro

    job = tmp_path / "job"
    proc = cli(["method=lora", *FAST, "train.max_steps=8", f"hydra.run.dir={job}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    golden = json.loads((job / "result.json").read_text())
    # only what must be identical on one machine (speed and memory depend on its load)
    identical = "train_losses,score,trainable_params,weight_bytes"
    assert repro([str(job), "--metrics", identical]) == 0
    ok = capsys.readouterr().out
    assert "all within tolerance" in ok
    assert "train_losses" in ok and "identical" in ok and "tokens_per_s" not in ok

    golden["metrics"]["train_losses"][3] += 1e-6  # one recorded loss, altered a little
    (job / "result.json").write_text(json.dumps(golden))
    assert repro([str(job / "result.json"), "--metrics", identical]) == 1
    bad = capsys.readouterr().out
    header = bad.splitlines()[0].split()
    assert header == ["job", "metric", "recorded", "rerun", "tolerance", "verdict"]
    (line,) = [row for row in bad.splitlines() if "MISMATCH" in row]
    assert "train_losses" in line
    assert "1 mismatch(es)" in bad


# --------------------------------------------------------------------------- bad input


def broken_model_folder(tmp: Path, weights: bool = True, config: str = '{"model_type": "llama"}') -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / ("model.safetensors" if weights else "pytorch_model.bin")).write_bytes(b"\0" * 16)
    return folder


def result_folder(tmp: Path, text: str) -> Path:
    folder = tmp / "sweep" / "0_job"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(text)
    return tmp / "sweep"


def foreign_result(tmp: Path) -> Path:
    golden = json.loads((REPO / "tests" / "golden" / "intel-amx" / "lora" / "result.json").read_text())
    golden["schema_version"] = 99
    return result_folder(tmp, json.dumps(golden))


GPT2 = '{"model_type": "gpt2"}'
H, R, P, PL = "harness", "harness.report", "harness.repro", "harness.plan"
def options(group: str) -> str:
    """A config group's options as the error line lists them (a new option breaks no test)."""
    return ", ".join(sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")))


BAD_INPUT = [
    # entry point, arguments (a function of the test's tmp folder), what the error line says
    (H, lambda t: ["model=tiny-9000"], f"unknown model 'tiny-9000' (allowed: {options('model')})"),
    (H, lambda t: ["-m", "method=lora,qlora4"],
     f"unknown method 'qlora4' (allowed: {options('method')})"),
    (H, lambda t: ["task=gsm9k"], f"unknown task 'gsm9k' (allowed: {options('task')})"),
    (H, lambda t: ["forgetting=books"], f"unknown forgetting 'books' (allowed: {options('forgetting')})"),
    (H, lambda t: ["task=gsm8k", "task.dataset.path=/no/such/data"], "task.dataset.path='/no/such/data': no such folder"),
    (H, lambda t: ["task=sst2"], "task.dataset: cannot read split 'train' of 'stanfordnlp/sst2' at revision 8d51e7e"),
    (H, lambda t: ["task=sst2", "task.n_validation=0"], "task.n_validation=0: must be a positive integer"),
    (H, lambda t: ["model.init=scratch"], "model.init='scratch': allowed values are pretrained, random"),
    (H, lambda t: ["model.tiny.pretrain.held_out_below=80"],
     "model.tiny.pretrain.held_out_below=80: must be an integer from 0 to model.tiny.pretrain.max_operand=49"),
    (H, lambda t: ["forgetting=wikitext", "forgetting.n_texts=0"], "forgetting.n_texts=0: must be a positive integer"),
    (H, lambda t: ["-m", "sweep=nightly"], f"unknown sweep 'nightly' (allowed: {options('sweep')})"),
    (H, lambda t: ["method=lora", "method.peft.r=0"], "method.peft.r=0: must be a positive integer"),
    (H, lambda t: ["train.max_steps=0"], "train.max_steps=0: must be a positive integer"),
    (H, lambda t: ["train.batch_size=-4"], "train.batch_size=-4: must be a positive integer"),
    (H, lambda t: ["train.max_steps=abc"], "train.max_steps='abc': must be a positive integer"),
    (H, lambda t: ["train.lr=abc"], "train.lr='abc': must be a positive number"),
    (H, lambda t: ["train.schedule=step"], "train.schedule='step': allowed values are cosine, linear, constant"),
    (H, lambda t: ["train.compile=maybe"], "train.compile='maybe': must be true or false"),
    (H, lambda t: ["train.adamw_impl=turbo"], "train.adamw_impl='turbo': allowed values are default, forloop, foreach, fused"),
    (H, lambda t: ["measure.cpu_mmap_threshold_kb=0"], "measure.cpu_mmap_threshold_kb=0: must be a positive integer"),
    (H, lambda t: ["train.foo=1"], "train.foo: no such key in train (the keys in train: max_steps, batch_size"),
    (H, lambda t: ["train.lr=[1,2"], "no viable alternative at input '[1,2'"),
    (H, lambda t: ["~task.metric"], "task.metric is missing from the configuration"),
    (H, lambda t: ["device=tpu"], "device='tpu': allowed values are auto, cpu, cuda, cuda:N"),
    (H, lambda t: ["model=path"], "model.name_or_path must be set: add model.name_or_path=... to the command line"),
    (H, lambda t: ["model=path", "model.name_or_path=/no/such/model"],
     "model.name_or_path='/no/such/model': no such model folder"),
    (H, lambda t: ["model=path", f"model.name_or_path={broken_model_folder(t, config='{oops')}"],
     "config.json cannot be read as JSON"),
    (H, lambda t: ["model=path", f"model.name_or_path={broken_model_folder(t, weights=False)}"],
     "no *.safetensors weights (the harness loads safetensors only"),
    (H, lambda t: ["model=qwen2.5-0.5b", "model.architecture=qwen9"],
     "model.architecture='qwen9': not a shipped architecture (allowed: llama-3.1-70b, llama-3.1-8b"),
    (H, lambda t: ["model=qwen2.5-0.5b", "~model.architecture", "model.init=random"],
     "model.init=random needs model.architecture, one of llama-3.1-70b, llama-3.1-8b"),
    (H, lambda t: ["method=galore", "method.optimizer.rank=0"], "method.optimizer.rank=0: must be a positive integer"),
    (H, lambda t: ["model.tiny.hidden_size=250"],  # once: the model build hung on it
     "model.tiny.hidden_size=250: must be an even multiple of model.tiny.num_attention_heads=4"),
    (H, lambda t: ["model.tiny.num_key_value_heads=3"],
     "model.tiny.num_key_value_heads=3: must divide model.tiny.num_attention_heads=4"),
    (H, lambda t: ["-m", "seed=0,1", "train.lr=1e-3,-1"], "train.lr=-1.0: must be a positive number"),
    (H, lambda t: ["-m", "sweep=ci", "model=tiny-1m,tiny-13m", "model.tiny.num_hidden_layers=0"],
     "model.tiny.num_hidden_layers=0: must be a positive integer"),
    (H, lambda t: ["model.trust_remote_code=maybe"], "model.trust_remote_code='maybe': must be true or false"),
    (H, lambda t: ["memory_limit_mb=-5"], "memory_limit_mb=-5.0: must be a positive number, or null"),
    (H, lambda t: ["budget=rank"], "budget='rank': allowed values are default, params, memory"),
    (H, lambda t: ["hydra.run.dir=/proc/harness-out"], "output folder /proc/harness-out cannot be created"),
    (H, lambda t: ["-m", "hydra.sweep.dir=/proc/harness-sweep", "seed=0,1"],
     "output folder /proc/harness-sweep cannot be created"),
    (H, lambda t: ["-m", "report.out=/proc/harness-report", "seed=0,1"],  # a sweep's report: before its first job
     "output folder /proc/harness-report cannot be created (/proc is not a writable folder); choose another with "
     "report.out=DIR (or report.enabled=false)"),
    (R, lambda t: [str(t / "nowhere")], "no such folder"),
    (R, lambda t: [str(t)], "no result.json under"),
    (R, lambda t: [str(result_folder(t, '{"schema_version": 2, "sta'))], "no readable result.json under"),
    (R, lambda t: [str(foreign_result(t))], "no readable result.json under"),
    (R, lambda t: [str(REPO / "tests" / "golden" / "intel-amx"), "--out", "/proc/harness-report"],
     "output folder /proc/harness-report cannot be created"),
    (P, lambda t: [str(t / "nowhere")], "does not exist"),
    (P, lambda t: [str(t)], "no result.json under"),
    (P, lambda t: [str(result_folder(t, "not json"))], "is not a valid result (JSONDecodeError"),
    (P, lambda t: [str(foreign_result(t))], "is not a valid result (ValidationError: 99 is not one of [2, 3, 4, 5, 6, 7, 8, 9])"),
    (P, lambda t: [str(REPO / "tests" / "golden" / "intel-amx"), "--jobs", "0"], "--jobs 0: must be a positive integer"),
    (P, lambda t: [str(REPO / "tests" / "golden" / "intel-amx"), "--metrics", "loss"],
     "--metrics 'loss': allowed metrics are train_losses, score_before, score"),
    (PL, lambda t: ["model=qwen9"], "unknown model 'qwen9' (allowed: llama-3.1-70b, llama-3.1-8b"),
    (PL, lambda t: ["model=qwen2.5-7b", "train.batch_size=0"], "train.batch_size=0: must be a positive integer"),
    (PL, lambda t: ["train.seq_len=abc"], "train.seq_len='abc': must be a positive integer"),
    (PL, lambda t: ["train.seq_len=-512"], "train.seq_len=-512: must be a positive integer"),
    (PL, lambda t: ["train.foo=1"], "train.foo: no such key in train"),
    (PL, lambda t: ["train.batch_size=1,2"], "'train.batch_size=1,2': the planner takes one value per key"),
    (PL, lambda t: ["--gpu-mem=0"], "--gpu-mem='0': give GPU memory sizes in GB, positive numbers"),
    (PL, lambda t: ["--gpu-mem=lots"], "--gpu-mem='lots': give GPU memory sizes in GB, positive numbers"),
    (PL, lambda t: ["model=path", "model.name_or_path=/no/such/model"], "model.name_or_path='/no/such/model': no such model folder"),
    (PL, lambda t: ["model=path", "model.name_or_path=someorg/somemodel"],
     "names the Hub id 'someorg/somemodel' and no model.architecture"),
    (PL, lambda t: ["model=qwen2.5-0.5b", "model.architecture=qwen9"],  # once: a traceback here
     "model.architecture='qwen9': not a shipped architecture (allowed: llama-3.1-70b, llama-3.1-8b"),
    (PL, lambda t: ["model=path", f"model.name_or_path={broken_model_folder(t, config=GPT2)}"],
     "cannot plan for this model: model_type 'gpt2' (the memory model knows: llama, mistral, qwen2, qwen3)"),
]


@pytest.mark.parametrize("entry,make_args,message", BAD_INPUT,
                         ids=[f"{e}:{m[:40]}" for e, _, m in BAD_INPUT])
def test_bad_input_gets_one_clear_line(tmp_path, entry, make_args, message):
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(tmp_path)
    made = sorted(p for p in tmp_path.rglob("*"))  # what the case itself set up
    proc = subprocess.run([sys.executable, "-m", entry, *args], cwd=work, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert sorted(p for p in tmp_path.rglob("*")) == made  # nothing written, not even a folder


def wrong_values(f) -> tuple[str, str]:
    """For a field of the config schema: a value of the wrong type and one out of range (for a
    true/false key, two values that are neither), as command-line text, from its metadata."""
    m, kind = f.metadata, f.type.replace("Optional[", "").rstrip("]")
    if kind == "bool":
        return "maybe", "0.5"
    if kind == "int":
        return "abc", str(m.get("min", 1) - 1)
    if kind == "float":
        return "abc", str(m["above"]) if "above" in m else str(m.get("min", 0) - 1)
    if "choices" in m or "pattern" in m:
        return "[a,b]", "no/such_value"
    return "[a,b]", "''"  # a free string: the empty one


def schema_keys():
    """Every scalar key of the top level, train, measure, eval and report (harness/schema.py),
    with its field."""
    from dataclasses import fields

    from harness import schema

    keys = [(f.name, f) for f in fields(schema.Config) if f.name not in schema.SECTIONS]
    keys += [(f"{section}.{f.name}", f) for section, kind in schema.SECTIONS.items() for f in fields(kind)]
    return [(key, f) for key, f in keys if f.type.replace("Optional[", "").rstrip("]") in schema.SCALARS]


WRONG = [(key, value) for key, f in schema_keys() for value in wrong_values(f)]


def test_the_schema_covers_every_key_of_the_config_file():
    """conf/config.yaml's top level (the config groups aside), train, measure, eval and report."""
    import yaml

    config = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    keys = {k for k, v in config.items() if k not in ("defaults", "hydra") and not isinstance(v, dict)}
    keys |= {f"{section}.{k}" for section in ("train", "measure", "eval", "report") for k in config[section]}
    assert keys == {key for key, _ in schema_keys()}


@pytest.mark.parametrize("key,value", WRONG, ids=[f"{k}={v}" for k, v in WRONG])
def test_a_wrong_value_of_any_key_is_one_line_naming_it(tmp_path, key, value):
    """Each key's wrong-type and out-of-range value, drawn from the config schema: exit 2, one
    error line naming the key, no traceback, nothing written."""
    proc = run_cli([f"{key}={value}"], cwd=tmp_path)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{key}=" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written, not even a folder


@pytest.mark.parametrize("args,message", [
    (["+train.max_step=100"], "error: train.max_step: no such key in train (did you mean train.max_steps?)"),
    (["+unknown_key=1"], "error: unknown_key: no such key at the top level (the keys at the top level: sweep_name,"),
    (["+eval.batchsize=8"], "error: eval.batchsize: no such key in eval (did you mean eval.batch_size?)"),
    (["train.foo=1"], "error: train.foo: no such key in train (the keys in train: max_steps,"),
    (["-m", "seed=0,1", "+measure.warmup=3"], "error: measure.warmup: no such key in measure (did you mean measure.warmup_steps?)"),
])
def test_an_unknown_key_is_refused_with_the_nearest_one(tmp_path, args, message):
    """Hydra's `+key=value` appends any key; a key the harness does not read (a typo) is
    refused before any job, naming the nearest key it has."""
    proc = run_cli(args, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert not list(tmp_path.iterdir())


# A method's settings, refused by methods.check_settings before any job (checked here in the
# process: the command line's route for a ConfigError is the same for all of them, and is
# tested with the GaLore rank above and a 4-bit type below).
METHOD_SETTINGS = [
    # settings the harness hands to bitsandbytes, PEFT and torch
    (["method.quantization.bnb_4bit_quant_type=nf5"],
     "method.quantization.bnb_4bit_quant_type='nf5': allowed values are fp4, nf4"),
    (["+method.quantization.bnb_4bit_foo=1"],
     "method.quantization.bnb_4bit_foo: not a BitsAndBytesConfig setting (allowed: load_in_8bit, load_in_4bit"),
    (["method.quantization.bnb_4bit_compute_dtype=bf16"],
     "method.quantization.bnb_4bit_compute_dtype='bf16': allowed values are bfloat16, float16, float32"),
    (["method.quantization.bnb_4bit_use_double_quant=yes"],
     "method.quantization: bnb_4bit_use_double_quant must be a boolean"),
    (["+method.peft.bias=some"], "method.peft.bias='some': allowed values are none, all, lora_only"),
    (["+method.peft.rank=4"], "method.peft.rank: not a setting of PEFT's LoraConfig (allowed: "),
    (["+method.optimizer.betas=[1.5,0.9]"],
     "method.optimizer.betas=[1.5, 0.9]: Invalid beta parameter at index 0: 1.5"),
    (["+method.optimizer.momentum=0.9"], "method.optimizer.momentum: not an optimizer setting (allowed: name, betas, eps, "
     "loraplus_lr_ratio, rank, update_proj_gap, scale, proj_type, scale_type)"),
    # the methods added for issue 20
    (["method=loraplus", "method.optimizer.loraplus_lr_ratio=0.5"],
     "method.optimizer.loraplus_lr_ratio=0.5: must be a number >= 1"),
    (["method=miss", "+method.optimizer.loraplus_lr_ratio=16"],
     "method.optimizer.loraplus_lr_ratio: LoRA+ needs a LoRA method (peft_type LORA), not MISS"),
    (["method=adapter", "method.peft.bottleneck_size=0"],
     "method 'adapter': bad PEFT setting: bottleneck_size=0: must be a positive integer"),
    (["method=adapter", "method.peft.nonlinearity=swish"],
     "method 'adapter': bad PEFT setting: nonlinearity='swish': allowed values are relu, gelu, silu, tanh"),
    (["method=adapter-pfeiffer", "+method.peft.r=8"],
     "method.peft.r: not a setting of harness.adapters' BottleneckConfig (allowed: bottleneck_size, nonlinearity, "
     "target_modules, zero_init_up)"),
    (["method=lora-hqq4", "method.quantization.nbits=5"],
     "method.quantization.nbits=5: allowed values are 1, 2, 3, 4, 8"),
    (["method=lora-hqq4", "method.quantization.quant_method=gptq"],
     "method.quantization.quant_method='gptq': allowed values are hqq (leave it out for bitsandbytes)"),
    (["method=lora-hqq4", "+method.quantization.load_in_4bit=true"],
     "method.quantization.load_in_4bit: not an HqqConfig setting (allowed: quant_method, nbits, group_size"),
    (["method=galore", "method.optimizer.proj_type=diagonal"],
     "method.optimizer.proj_type='diagonal': allowed values are std, reverse_std, right, left, full"),
    (["method=lora", "+method.optimizer.rank=8"],
     "method.optimizer.rank: a setting of a projecting optimizer; it needs method.optimizer.name=galore_adamw "
     "or method.optimizer.name=apollo_adamw"),
    (["method=galore", "+method.optimizer.scale_type=channel"],
     "method.optimizer.scale_type: a setting of a projecting optimizer; it needs method.optimizer.name=apollo_adamw"),
    (["method=apollo", "method.optimizer.scale_type=row"],
     "method.optimizer.scale_type='row': allowed values are channel, tensor"),
    (["method=apollo", "method.optimizer.proj_type=full"],
     "method.optimizer.proj_type='full': allowed values are std, reverse_std, right, left"),
    (["method=apollo", "method.quantization={load_in_4bit: true}"],
     "method.optimizer.name=apollo_adamw: APOLLO trains every weight of a full-precision model"),
    (["method=galore", "method.peft={peft_type: LORA, r: 8}"],
     "method.optimizer.name=galore_adamw: GaLore trains every weight of a full-precision model"),
    (["method=eva", "method.peft.eva_config.rho=0.5"], "method 'eva': bad PEFT setting: `rho` must be >= 1.0"),
    (["method=eva", "+method.peft.eva_config.steps=5"],
     "method.peft.eva_config.steps: not a setting of PEFT's EvaConfig (allowed: adjust_scaling_factors, "
     "label_mask_value, rho, tau, use_label_mask, whiten)"),
]


@pytest.mark.parametrize("overrides,message", METHOD_SETTINGS, ids=[m[:50] for _, m in METHOD_SETTINGS])
def test_a_bad_method_setting_is_one_message_naming_it(overrides, message):
    from conftest import compose
    from harness.errors import ConfigError
    from harness.methods import check_settings

    cfg = compose(overrides)
    with pytest.raises(ConfigError) as e:
        check_settings(cfg["method"], cfg["train"])
    assert str(e.value).startswith(message), str(e.value)


LIBRARY_SETTINGS = [
    # settings the harness hands to libraries, through the command line: the tiny model's
    # config, a sweep whose second value only is bad, one method setting (the rest of those are
    # METHOD_SETTINGS, in the process above). Each is built before the first job (once: a
    # traceback from inside the job, or no error at all)
    (["+model.tiny.hidden_act=nope"], "model.tiny.hidden_act='nope': allowed values are "),
    (["+model.tiny.hidden_sizes=64"], "model.tiny.hidden_sizes: not a LlamaConfig setting (allowed: "),
    (["-m", "method=lora,full-adam8bit", "+method.optimizer.eps=1e-8,-1.0"],  # the second value only
     "method.optimizer.eps=-1.0: Invalid epsilon value: -1.0"),
    (["method.quantization.bnb_4bit_quant_type=nf5"],  # and one of those, by the command line's route
     "method.quantization.bnb_4bit_quant_type='nf5': allowed values are fp4, nf4"),
]


@pytest.mark.parametrize("args,message", LIBRARY_SETTINGS, ids=[m[:50] for _, m in LIBRARY_SETTINGS])
def test_library_settings_are_checked_before_any_job_in_one_line(tmp_path, args, message):
    proc = run_cli([*args, *FAST], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not any(tmp_path.iterdir())  # no job ran, nothing written


class Unpicklable(Exception):  # like huggingface_hub's strict-dataclass errors: no unpickling
    def __init__(self, what, cause):
        super().__init__(f"{what}: {cause}")


def raise_unpicklable():
    raise Unpicklable("validator", "the hidden size is not a multiple of the heads")


def killed_by_the_kernel():
    os.kill(os.getpid(), signal.SIGKILL)


def exits_at_once(code: int):
    os._exit(code)  # (os._exit itself is not picklable when coverage.py patches it)


@pytest.mark.parametrize("func,args,message", [
    (raise_unpicklable, (), "Unpicklable: validator: the hidden size is not a multiple of the heads"),
    (exits_at_once, (3,), "the process running exits_at_once died"),
    (killed_by_the_kernel, (), "the process running killed_by_the_kernel died"),
])
def test_a_failure_in_the_build_process_comes_back_at_once(func, args, message):
    """The process that builds models once left the app waiting forever on an exception that
    could not be unpickled (multiprocessing.Pool); a killed build process hung it too."""
    from harness.errors import ConfigError
    from harness.launch import call_in_server

    started = time.monotonic()
    with pytest.raises(ConfigError, match=message):
        call_in_server(func, *args)
    assert time.monotonic() - started < 30


def test_a_model_build_that_fails_ends_the_command_at_once_with_one_line(tmp_path):
    """A failure inside the process that builds a model (here: the model cache cannot be
    written) ends the command with one line naming the model, exit 2, nothing left behind."""
    proc = cli(["model.tiny.seed=7", *FAST], cwd=tmp_path, timeout=120, env={"HARNESS_CACHE": "/proc/no-cache"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model 'tiny-1m' cannot be built: " in errors[0] and "/proc/no-cache" in errors[0], \
        proc.stderr[-3000:]
    assert not any(tmp_path.iterdir())


def test_a_full_disk_stops_the_sweep_in_one_line_keeps_results_and_resumes(tmp_path):
    """The sweep folder's disk fills up while the second job runs: one line names the file the
    job could not write, the first result stays whole, the third job never starts, exit 1;
    after space is freed, the same command resumes (the first job is not run again)."""
    needs_root("mounting a small tmpfs as a disk that fills up")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        sweep = disk / "sweep"
        args = ["-m", "method=lora,prompt,full", *FAST, "train.max_steps=5", "eval.before=false",
                "report.enabled=false", f"hydra.sweep.dir={sweep}"]
        fill = ["+hydra.callbacks.fill._target_=conftest.FillDiskOnJobStart", "+hydra.callbacks.fill.job=1"]
        env = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = cli([*args, *fill], cwd=tmp_path, env=env)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert f"cannot write {sweep}/1_tiny-1m_prompt_arithmetic_s0/" in errors[0], errors
        assert "No space left on device" in errors[0] and "rerun the same command to resume" in errors[0]
        first = results_under(sweep)
        assert [(r["method"], r["status"]) for r in first] == [("lora", "ok")]  # whole, and the only one
        assert not (sweep / "2_tiny-1m_full_arithmetic_s0").exists()  # the sweep stopped
        assert not list(sweep.rglob("*.tmp"))
        (sweep / "filler").unlink()
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        after = {r["method"]: r for r in results_under(sweep)}
        assert set(after) == {"lora", "prompt", "full"} and all(r["status"] == "ok" for r in after.values())
        assert after["lora"]["env"]["start_time"] == first[0]["env"]["start_time"]  # kept, not rerun
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_oom_and_diverged_jobs_are_results_and_the_sweep_goes_on(tmp_path):
    """Over memory_limit_mb: oom; an absurd learning rate: diverged (NaN); the sweep goes on
    to its last job and reports all of them."""
    sweep = tmp_path / "s"
    proc = run_cli(["-m", "memory_limit_mb=15,null", "train.lr=1e30,1e-2", "train.warmup_steps=0", *FAST,
                "train.max_steps=8", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = {(r["config"]["memory_limit_mb"], r["config"]["train"]["lr"]): r for r in results_under(sweep)}
    assert {k: r["status"] for k, r in found.items()} == {
        (15, 1e30): "oom", (15, 1e-2): "oom", (None, 1e30): "diverged", (None, 1e-2): "ok"}
    oom = found[(15, 1e-2)]
    assert "over memory_limit_mb=15" in oom["error"] and oom["metrics"]["peak_memory_mb"] > 15
    # the result carries what the memory model says the job needs
    need = oom["metrics"]["predicted_peak_memory_mb"]
    assert need > 15 and f"predicted need: {need:,.0f} MiB" in oom["error"]
    diverged = found[(None, 1e30)]
    assert diverged["metrics"]["diverged_step"] < 8 and "loss is nan" in diverged["error"]
    import pandas as pd

    table = pd.read_csv(sweep / "report" / "results.csv")
    assert sorted(table["status"]) == ["diverged", "ok", "oom", "oom"]
    assert "over memory_limit_mb=15" in (sweep / "report" / "index.html").read_text()
