"""Unit tests of the pieces a job is made of: task data, batching, metric, measurement, results."""

import json
import signal

import pytest

from conftest import compose


def arithmetic(**overrides):
    from harness.tasks import load_task

    task = compose()["task"]
    task.update(overrides)
    return load_task(task)


def test_arithmetic_splits_are_deterministic_disjoint_and_correct():
    a, b = arithmetic(), arithmetic()
    for split in ("train", "validation", "test"):
        assert a[split]["prompt"] == b[split]["prompt"]
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (300, 50, 50)
    prompts = [set(a[s]["prompt"]) for s in ("train", "validation", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    for prompt, answer in zip(a["test"]["prompt"], a["test"]["answer"]):
        x, y = prompt.rstrip("=").split("+")
        assert int(answer) == int(x) + int(y) and len(x) == len(y) == 2
    assert arithmetic(seed=99)["test"]["prompt"] != a["test"]["prompt"]


def test_arithmetic_bad_settings_are_refused():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="operations='/'"):
        arithmetic(operations="/")
    with pytest.raises(ConfigError, match="exceeds the 400 distinct problems"):
        arithmetic(n_train=1000)


def test_tokenized_examples_train_on_the_answer_only(model_cache):
    from harness.data import IGNORE_INDEX, tokenize_examples
    from harness.models import load_tokenizer, resolve_model_source

    tok = load_tokenizer(resolve_model_source(compose()["model"]), None)
    ds = arithmetic()["train"]
    examples, dropped = tokenize_examples(ds, tok, seq_len=64)
    assert dropped == 0 and len(examples) == 300
    first = examples[0]
    answer_ids = [t for t in first["labels"] if t != IGNORE_INDEX]
    assert tok.decode(answer_ids, skip_special_tokens=True) == ds[0]["answer"]
    assert answer_ids[-1] == tok.eos_token_id and first["input_ids"][0] == tok.bos_token_id
    assert tok.decode(first["input_ids"], skip_special_tokens=True) == ds[0]["prompt"] + ds[0]["answer"]
    _, dropped = tokenize_examples(ds, tok, seq_len=5)
    assert dropped == 300


def test_one_resolver_says_where_every_shipped_model_comes_from_without_torch(tmp_path):
    """harness.models.model_source decides every model's source (tiny, GGUF, random weights,
    folder, Hub) from its config alone: no torch import, no download, no build."""
    import subprocess
    import sys

    from conftest import REPO

    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (folder / "model.safetensors").write_bytes(b"")
    code = f"""
import json, sys
from pathlib import Path
from omegaconf import OmegaConf
from harness.models import model_source
kinds = {{}}
for p in sorted(Path("conf/model").glob("*.yaml")):
    cfg = OmegaConf.to_container(OmegaConf.load(p))
    if p.stem == "path":
        cfg["name_or_path"] = {str(folder)!r}
    s = model_source(cfg)
    kinds[p.stem] = [s.kind, (s.architecture or {{}}).get("model_type")]
    if p.stem == "qwen2.5-0.5b":
        s = model_source({{**cfg, "init": "random"}})
        kinds["random"] = [s.kind, s.architecture["model_type"], s.folder().parent.name, s.built in (True, False)]
print(json.dumps(kinds))
assert "torch" not in sys.modules, "torch imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    kinds = json.loads(proc.stdout)
    assert kinds["tiny-1m"] == ["tiny", "llama"] and kinds["tiny-13m"] == ["tiny", "llama"]
    assert kinds["smollm2-135m-gguf"] == ["gguf", "llama"]  # its shipped architecture, for the planner
    assert kinds["qwen2.5-7b"] == ["hub", "qwen2"] and kinds["llama-3.1-8b"] == ["hub", "llama"]
    assert kinds["path"] == ["folder", "llama"]  # the folder's own config.json
    assert kinds["random"] == ["random", "qwen2", "random-models", True]


def test_length_grouped_batches_cover_each_epoch_and_group_lengths():
    from itertools import islice

    from harness.data import length_grouped_batches

    lengths = [5 + (i * 7) % 40 for i in range(1000)]
    batches = list(islice(length_grouped_batches(lengths, 10, seed=3), 100))
    assert sorted(i for b in batches for i in b) == list(range(1000))  # one epoch, each once
    assert batches == list(islice(length_grouped_batches(lengths, 10, seed=3), 100))
    assert batches != list(islice(length_grouped_batches(lengths, 10, seed=4), 100))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # little padding (random batches would pad ~50%)


def test_collate_pads_right_and_masks_labels():
    import torch

    from harness.data import IGNORE_INDEX, collate

    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1, 2], "labels": [-100, 2]}],
                    pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 2, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long


def test_exact_match_metric_loads_by_path_offline():
    from harness.metrics import load_metric

    metric = load_metric("exact_match")
    assert metric.compute(predictions=["19", " 7 ", "3"], references=["19", "7", "4"]) == {
        "exact_match": pytest.approx(2 / 3), "per_example": [1.0, 1.0, 0.0]}


def sampler_peaks(code: str) -> dict:
    """Run `code` (which prints the sampler's peaks as its last line) in a fresh process, as
    every job runs, so that memory freed by earlier tests cannot hide or fake a reading."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_memory_sampler_sees_an_allocation():
    """In a fresh process (as every job runs), so that memory freed by earlier tests cannot hide it."""
    code = """
import json, torch
from harness.measure import MemorySampler
sampler = MemorySampler("cpu", interval_s=0.005).start()
block = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, touched
peaks = sampler.stop()
assert sampler.stop() is peaks
print(json.dumps(peaks))
"""
    peaks = sampler_peaks(code)
    assert peaks["memory_source"] == "cpu_malloc_in_use"
    assert 256 <= peaks["peak_memory_mb"] < 270  # the tensor, plus little else
    assert peaks["malloc_in_use_peak_mb"] == peaks["peak_memory_mb"]
    assert peaks["rss_high_water_mark_mb"] >= 250


def test_cpu_peak_memory_is_the_most_in_use_at_once():
    """Blocks allocated and freed in turn, of sizes glibc keeps in its heap after a free: the
    headline is the most that was in use at once (two 64 MiB tensors at the end), whatever the
    allocator kept."""
    code = """
import json, torch
from harness.measure import MemorySampler
sampler = MemorySampler("cpu", interval_s=0.002).start()
for size in range(1, 17):  # 1-16 MiB, each pair freed before the next
    a = torch.ones(size * 2**18); b = torch.ones(size * 2**18); del a, b
keep = [torch.ones(2**24), torch.ones(2**24)]  # 2 x 64 MiB held at the end
peaks = sampler.stop()
print(json.dumps(peaks))
"""
    peaks = sampler_peaks(code)
    assert 128 <= peaks["peak_memory_mb"] < 140


def test_the_peak_is_the_training_phases_and_each_phase_keeps_its_own():
    """A load that peaks high (a 256 MiB cast, then freed) and training that holds 64 MiB plus
    128 MiB of steps: the headline is training's, with the load's kept beside it."""
    code = """
import json, torch
from harness.measure import MemorySampler
sampler = MemorySampler("cpu", interval_s=0.005).start()
weights = torch.ones(2**24)                        # 64 MiB, held to the end
cast = torch.ones(2**26); del cast                 # 256 MiB at load, freed
sampler.phase("prepare")
sampler.phase("train")
step = torch.ones(2**25); sampler.probe(); del step  # 128 MiB during a step
print(json.dumps(sampler.stop()))
"""
    peaks = sampler_peaks(code)
    phases = peaks["phase_peak_memory_mb"]
    assert peaks["memory_phase"] == "train" and set(phases) == {"load", "prepare", "train"}
    assert 320 <= phases["load"] < 335       # weights + the cast at once
    assert 64 <= phases["prepare"] < 70      # what was held after the load
    assert 192 <= peaks["peak_memory_mb"] == phases["train"] < 200


def test_a_phase_below_the_baseline_reads_zero_not_a_negative_peak():
    """Memory held before the job (the baseline) and freed during it: no phase of the job is
    above the baseline, and its peak reads 0 (a negative peak once broke the result schema
    for a job run in a process that had run others)."""
    code = """
import json, torch
from harness.measure import MemorySampler
held = torch.ones(2**25)                           # 128 MiB held before the job starts
sampler = MemorySampler("cpu", interval_s=0.005).start()
del held
sampler.phase("prepare")
sampler.phase("train")
step = torch.ones(2**20); sampler.probe(); del step  # 4 MiB during a step
print(json.dumps(sampler.stop()))
"""
    peaks = sampler_peaks(code)
    assert peaks["peak_memory_mb"] == 0.0 and peaks["phase_peak_memory_mb"]["train"] == 0.0
    assert peaks["phase_peak_memory_mb"]["load"] >= 0.0


def test_weights_mapped_from_a_checkpoint_file_count_as_memory(tmp_path):
    """A same-dtype safetensors load maps the file instead of copying it: malloc never sees
    those weights, so the sampler adds them (and only those)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.measure import file_mapped_tensor_bytes
    from harness.models import load_model

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # fp32 weights
    param_bytes = lambda m: sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()  # noqa: E731
                                 for p in m.parameters()}.values())
    mapped = load_model(str(tmp_path), None, dtype=torch.float32, quantization=None, device="cpu")
    assert file_mapped_tensor_bytes(mapped) == param_bytes(mapped) > 0
    cast = load_model(str(tmp_path), None, dtype=torch.bfloat16, quantization=None, device="cpu")
    assert file_mapped_tensor_bytes(cast) == 0  # cast on load: new tensors, from malloc


def test_step_timer_excludes_warmup_and_counts_tokens(monkeypatch):
    """Throughput is the tokens after the warm-up over the wall time from the warm-up's end to
    the last step's end: the time between steps counts, the step time is the median."""
    from harness import measure

    clock = iter([0.0, 9.0,  10.0, 19.0,  20.0, 20.1,  20.5, 20.8,  21.0, 21.2])  # start, stop of 5 steps
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    timer = measure.StepTimer("cpu", warmup_steps=2)
    for tokens in [1, 1, 100, 100, 100]:
        timer.start()
        timer.stop(tokens)
    s = timer.summary()
    assert s["timed_steps"] == 3
    assert s["tokens_per_s"] == pytest.approx(300 / (21.2 - 19.0))
    assert s["step_time_ms"] == pytest.approx(200)
    assert measure.StepTimer("cpu", warmup_steps=5).summary()["tokens_per_s"] is None


def test_weight_bytes_of_a_plain_model():
    import torch

    from harness.measure import count_params, weight_bytes

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2).to(torch.bfloat16))
    assert weight_bytes(model) == {"weight_bytes": (4 * 8 + 8) * 4 + (8 * 2 + 2) * 2,
                                   "quantized_bits_per_weight": None}
    assert count_params(model) == {"trainable_params": 58, "total_params": 58}


def test_atomic_write_leaves_a_whole_file_or_the_old_one(tmp_path):
    from harness.results import write_json_atomic

    path = tmp_path / "result.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(ValueError):  # NaN is not JSON: nothing replaces the good file
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("returncode,status", [(-signal.SIGKILL, "oom"), (-signal.SIGSEGV, "error"), (3, "error")])
def test_a_dead_job_still_gets_a_valid_result(returncode, status):
    from harness.launch import result_for_dead_job
    from harness.results import validate

    result = result_for_dead_job(compose(), returncode, "python -m harness", [])
    validate(result)
    assert result["status"] == status and result["error"]


def test_diverging_job_stops_early_as_diverged(tmp_path, monkeypatch):
    import torch

    from conftest import FAST, run_in_process
    from harness.results import validate

    # The loss turns NaN from the 4th call on, as it does when training blows up.
    cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def nan_from_fourth_call(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from_fourth_call)
    result = run_in_process(tmp_path, ["method=lora", *FAST])
    validate(result)
    assert result["status"] == "diverged", result["error"]
    assert result["metrics"]["diverged_step"] == 3
    assert len(result["metrics"]["train_losses"]) == 3
    assert result["error"] == "loss is nan at step 3"
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "diverged"


def test_same_seed_same_losses_and_score(tmp_path):
    from conftest import FAST, run_in_process

    runs = [run_in_process(tmp_path / str(i), ["method=qlora", *FAST, "train.max_steps=15"]) for i in range(2)]
    assert runs[0]["metrics"]["train_losses"] == runs[1]["metrics"]["train_losses"]
    assert runs[0]["metrics"]["score"] == runs[1]["metrics"]["score"]
    other = run_in_process(tmp_path / "seed1", ["method=qlora", *FAST, "train.max_steps=15", "seed=1"])
    assert other["metrics"]["train_losses"] != runs[0]["metrics"]["train_losses"]


def test_scoring_before_training_does_not_change_training(tmp_path):
    """Evaluation puts layers in eval mode; training afterwards must be the same as without it
    (bitsandbytes repacks 4-bit weights for CPU inference, which used to break backprop)."""
    from conftest import FAST, run_in_process

    args = ["method=qlora", *FAST, "train.max_steps=8"]
    with_eval = run_in_process(tmp_path / "a", args)
    without = run_in_process(tmp_path / "b", [*args, "eval.before=false"])
    assert with_eval["metrics"]["train_losses"] == without["metrics"]["train_losses"]
    assert without["metrics"]["score_before"] is None


def test_a_local_model_folder_loads_through_the_same_path(tmp_path):
    """model=path with a folder in the Hugging Face layout (here: a tiny model's cache folder)."""
    import shutil

    from conftest import FAST, run_in_process
    from harness.models import resolve_model_source

    folder = tmp_path / "my-model"
    shutil.copytree(resolve_model_source(compose()["model"]), folder)
    result = run_in_process(tmp_path / "out", ["model=path", f"model.name_or_path={folder}",
                                               "model.name=my-model", "method=lora", *FAST])
    assert result["status"] == "ok", result["error"]
    assert result["model"] == "my-model"
    assert result["config"]["model"]["name_or_path"] == str(folder)


def regression():
    """A one-layer model whose forward returns an object with `.loss`, as HF models do."""
    import types

    import torch

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, x, y):
            return types.SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(x), y))

    return Regression()


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 4 give the gradient of one batch of 8 (same-size micro-batches)."""
    import torch

    from harness.measure import StepTimer
    from harness.train import train

    torch.manual_seed(1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def run(batches, grad_accum):
        model = regression()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        stream = iter([{"x": bx, "y": by, "n_tokens": len(bx), "n_labels": len(bx)} for bx, by in batches])
        timer = StepTimer("cpu", warmup_steps=0)
        losses = train(model, opt, sched, stream, max_steps=1, grad_accum=grad_accum, max_grad_norm=None,
                       timer=timer)
        return model.linear.weight.detach().clone(), losses, timer.tokens

    big = run([(x, y)], grad_accum=1)
    small = run([(x[:4], y[:4]), (x[4:], y[4:])], grad_accum=2)
    assert torch.allclose(big[0], small[0], atol=1e-6)
    assert big[1] == pytest.approx(small[1], abs=1e-6)
    assert small[2] == [8]  # tokens of both micro-batches counted in the step


def test_accumulated_micro_batches_of_uneven_lengths_make_the_update_of_one_batch():
    """grad_accum=4 x batch 8 and grad_accum=1 x batch 32 over the same 32 examples of uneven
    lengths give the same parameters after one step: the loss is the mean over all labelled
    tokens of the step, not the mean of the micro-batches' means (which this data tells apart)."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.data import IGNORE_INDEX, collate
    from harness.measure import StepTimer
    from harness.train import train

    rng = random.Random(0)
    examples = []
    for i in range(32):  # short examples first, long ones last: micro-batches differ in labelled tokens
        prompt, answer = rng.randint(2, 6), 2 + i // 2
        ids = [rng.randrange(1, 100) for _ in range(prompt + answer)]
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})

    def batch(rows):
        labelled = sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in rows)
        return {**collate(rows, 0, "cpu"), "n_tokens": sum(len(e["input_ids"]) for e in rows), "n_labels": labelled}

    def one_step(micro_batches, equal_weights=False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        if equal_weights:  # the old normalisation: each micro-batch's mean loss / grad_accum
            for b in micro_batches:
                b["n_labels"] = 1
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        losses = train(model, opt, sched, iter(micro_batches), max_steps=1, grad_accum=len(micro_batches),
                       max_grad_norm=None, timer=StepTimer("cpu", 0))
        return torch.cat([p.detach().flatten() for p in model.parameters()]), losses[0]

    whole, whole_loss = one_step([batch(examples)])
    accumulated, accumulated_loss = one_step([batch(examples[i:i + 8]) for i in range(0, 32, 8)])
    assert torch.allclose(whole, accumulated, atol=1e-6, rtol=1e-5)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-5)
    mean_of_means, _ = one_step([batch(examples[i:i + 8]) for i in range(0, 32, 8)], equal_weights=True)
    assert not torch.allclose(whole, mean_of_means, atol=1e-4)  # the test tells the two apart


def test_a_model_that_does_not_compile_trains_eagerly_and_says_so(monkeypatch, caplog):
    """train.compile=true: when torch.compile fails on the model, one warning, the same losses
    as an eager run, and `compiled: false` with the reason recorded."""
    import torch

    from harness.measure import StepTimer
    from harness.train import train

    def failing_compile(model, **options):
        def forward(**batch):
            raise torch._dynamo.exc.Unsupported("a layer this backend cannot trace")
        return forward

    torch.manual_seed(1)
    data = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1), "n_tokens": 4, "n_labels": 4} for _ in range(3)]

    def run(compile):
        model = regression()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        record = {}
        losses = train(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), iter([dict(b) for b in data]),
                       max_steps=3, grad_accum=1, max_grad_norm=1.0, timer=StepTimer("cpu", 0), compile=compile,
                       record=record)
        return losses, record

    eager, eager_record = run(False)
    monkeypatch.setattr(torch, "compile", failing_compile)
    with caplog.at_level("WARNING", logger="harness.train"):
        fallen_back, record = run(True)
    assert fallen_back == eager
    assert eager_record == {"compiled": False, "compile_error": None}
    assert record["compiled"] is False and "cannot trace" in record["compile_error"]
    warnings = [r.getMessage() for r in caplog.records if "does not compile" in r.getMessage()]
    assert len(warnings) == 1 and "training eagerly" in warnings[0]


def test_adamw_implementation_is_chosen_and_reported():
    import torch

    from harness.methods import adamw_impl_used, make_optimizer

    model = torch.nn.Linear(4, 4)
    impls = {impl: adamw_impl_used(make_optimizer(model, {"name": "adamw"}, 1e-3, 0.0, impl))
             for impl in ("default", "forloop", "foreach", "fused")}
    assert impls == {"default": "forloop", "forloop": "forloop", "foreach": "foreach", "fused": "fused"}  # CPU tensors
    assert adamw_impl_used(torch.optim.SGD(model.parameters(), lr=0.1)) is None


def test_logged_task_loss_is_the_models_causal_lm_loss(model_cache):
    """AdaLoRA's logged loss is recomputed from logits; it must equal what HF computes."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.models import resolve_model_source
    from harness.train import task_loss

    model = AutoModelForCausalLM.from_pretrained(resolve_model_source(compose()["model"]))
    ids = torch.tensor([[1, 5, 9, 14, 20, 2], [1, 7, 7, 30, 2, 0]])
    labels = torch.tensor([[-100, -100, -100, 14, 20, 2], [-100, -100, 7, 30, 2, -100]])
    out = model(input_ids=ids, labels=labels)
    assert task_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_training_flops_per_token_by_method(model_cache):
    """6N + 12Lhs for full fine-tuning; frozen weights cost 4 FLOPs, adapters 6; virtual tokens."""
    import torch
    from transformers import AutoConfig

    from harness import flops
    from harness.methods import apply_method
    from harness.models import load_model, resolve_model_source

    cfg = compose()
    source = resolve_model_source(cfg["model"])
    config = AutoConfig.from_pretrained(source)
    L, h, V = 4, 128, config.vocab_size
    linear = L * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384) + h * V  # decoder + lm_head
    s = 10.0
    per_method = {}
    for method in ("full", "lora", "prompt", "prefix", "ptuning"):
        m = compose([f"method={method}"])["method"]
        model = load_model(source, None, dtype=torch.float32, quantization=None, device=torch.device("cpu"))
        model = apply_method(model, m, max_steps=10, gradient_checkpointing=False)
        frozen, trainable, encoder = flops.matmul_weights(model)
        v = (m["peft"] or {}).get("num_virtual_tokens", 0)
        per_method[method] = flops.training_flops_per_token(
            config, frozen, trainable, s, prompt_tokens=v if method in ("prompt", "ptuning") else 0,
            prefix_tokens=v if method == "prefix" else 0, encoder=encoder)
        if method == "ptuning":  # the prompt encoder's three Linear layers, 128 wide, once per sequence
            assert (frozen, trainable, encoder) == (linear, 0, 3 * 128 * 128)
        else:
            assert encoder == 0
        if method == "full":
            assert (frozen, trainable) == (0, linear)
        if method == "lora":  # r=16 on every decoder linear: 16 * (in + out) each
            assert (frozen, trainable) == (linear, L * 16 * (256 + 192 + 192 + 256 + 512 + 512 + 512))
    attention = 12 * L * h * s
    assert per_method["full"] == 6 * linear + attention
    assert per_method["lora"] == 4 * linear + 6 * 155648 + attention
    assert per_method["prompt"] == pytest.approx((4 * linear + 12 * L * h * (s + 20)) * (s + 20) / s)
    assert per_method["prefix"] == pytest.approx(4 * linear + 12 * L * h * (s + 20))
    assert per_method["ptuning"] == pytest.approx(per_method["prompt"] + 6 * 3 * 128 * 128 * 20 / s)


def test_llama_adapter_flops_drop_the_lower_layers_backward_and_add_the_adapter_attention():
    from transformers import LlamaConfig

    from harness import flops

    c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2)
    q, kv, h, inter, L, s = 64, 32, 64, 128, 10, 20
    layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    adapter = 4 * h * q + 2 * h * kv + 12 * q * L + 4 * q * h
    # top 2 of 4: two layers forward only (2 FLOPs per weight and 4 per attention position saved
    # of 4 and 12), two with the adapter attention
    assert flops.adaption_prompt_flops(c, L, 2, s) == 2 * adapter - 2 * (2 * layer + 8 * q * s)
    assert flops.adaption_prompt_flops(c, L, 4, s) == 4 * adapter  # every layer: only the adapters


def test_galore_and_apollo_projections_cost_flops_once_per_step():
    import torch

    from harness import flops

    weights = [torch.empty(64, 32), torch.empty(32, 96), torch.empty(8, 8)]
    # GaLore: 4 * m * n * min(r, m, n) each (there and back), r=16
    assert flops.projection_step_flops(weights, {"name": "galore_adamw", "rank": 16}) == \
        4 * (64 * 32 * 16 + 32 * 96 * 16 + 8 * 8 * 8)
    # APOLLO: 2 * m * n * r each (the gradient projected, not the update; r not clipped)
    assert flops.projection_step_flops(weights, {"name": "apollo_adamw", "rank": 16}) == \
        2 * 16 * (64 * 32 + 32 * 96 + 8 * 8)


@pytest.mark.parametrize("name,sms,peak", [
    ("NVIDIA H100 80GB HBM3", 132, 989.4), ("NVIDIA H100 PCIe", 114, 756.0), ("NVIDIA H100 NVL", 132, 835.0),
    ("NVIDIA H200", 132, 989.4), ("NVIDIA H200 NVL", 132, 835.0), ("NVIDIA GH200 480GB", 132, 989.4),
    ("NVIDIA A100-SXM4-80GB", 108, 312.0), ("NVIDIA A100 80GB PCIe", 108, 312.0),
    ("NVIDIA L40S", 142, 362.1), ("NVIDIA L40", 142, 181.0), ("NVIDIA L4", 58, 121.0),
    ("NVIDIA GeForce RTX 4090", 128, 165.2), ("NVIDIA A10G", 80, 70.0), ("NVIDIA A10", 72, 125.0),
    # names that a substring match took for another GPU: not in the table, so no MFU
    ("NVIDIA RTX A1000", 16, None), ("NVIDIA RTX A1000 6GB Laptop GPU", 16, None), ("NVIDIA L40G", 142, None),
    # a MIG slice: the whole GPU's peak times its share of the SMs (1g.10gb: 16 of 132)
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", 16, 989.4 * 16 / 132), ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", 42, 312.0 * 42 / 108),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None, None),
    ("Intel(R) Xeon(R) Processor", None, None), (None, None, None)])
def test_mfu_only_for_known_devices(name, sms, peak):
    from harness.flops import utilization

    u = utilization(1e9, 1000.0, name, sms)
    assert u["peak_bf16_tflops"] == peak
    assert u["train_tflops"] == pytest.approx(1.0)
    assert u["mfu"] == (pytest.approx(1.0 / peak) if peak else None)


def test_adapter_bytes_of_a_model_with_a_rank_pruned_to_zero_says_nothing_of_fsdp(model_cache):
    """AdaLoRA prunes some modules to rank 0; PEFT's save then warns that FSDP shards were not
    gathered (there are none): the harness keeps that misleading line out of the job's log."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    from harness.job import adapter_bytes
    from harness.models import load_model, resolve_model_source

    source = resolve_model_source(compose()["model"])
    model = get_peft_model(load_model(source, None, dtype=torch.float32, quantization=None,
                                      device=torch.device("cpu")), LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A["default"].weight = torch.nn.Parameter(torch.zeros(0, layer.in_features))
    layer.lora_B["default"].weight = torch.nn.Parameter(torch.zeros(layer.out_features, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert adapter_bytes(model) > 0
