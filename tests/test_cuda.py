"""The branches that run only on CUDA, executed on the CPU with a fake CUDA machine
(tests/fake_cuda.py: torch.cuda's answers and NVML, no kernel). Each test asserts what the
harness records or decides, and each holds a bug that a reading of the code against torch 2.13,
bitsandbytes 0.50, PEFT and nvidia-ml-py found before any GPU ran it (issue 32)."""

from __future__ import annotations

import json
import os
import time
import types

import bitsandbytes  # noqa: F401  (imported before any test fakes CUDA: its import asks the GPU which library to load)
import peft  # noqa: F401
import pytest
import torch

from conftest import compose
from fake_cuda import MIB, FakeCuda, FakeGpu
from harness.errors import ConfigError

V100 = dict(name="Tesla V100-SXM2-32GB", capability=(7, 0), total_mb=32_768, multiprocessors=80)
A100 = dict(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), total_mb=81_920, multiprocessors=108)


@pytest.fixture
def cuda(monkeypatch):
    """One fake H100; the sampler's context creation recorded instead of run."""
    from harness import measure

    fake = FakeCuda(monkeypatch, [FakeGpu()])
    monkeypatch.setattr(measure, "create_cuda_context", lambda device: fake.calls.append("create_cuda_context"))
    return fake


# --------------------------------------------------------------------------- memory readings


def test_each_phase_starts_with_the_allocators_cache_emptied(cuda):
    """Bug 3: `reset_peak_memory_stats` resets the peak to what is reserved now, cached blocks
    included, so blocks cached by loading and by the scores before training counted as
    training's peak. Each phase now starts with the cache emptied."""
    from harness.measure import MemorySampler

    cuda.allocate(300)  # before the baseline (another job's leftovers, the context's first block)
    sampler = MemorySampler(torch.device("cuda:0"), interval_s=0.01).start()
    assert cuda.calls.index("create_cuda_context") < cuda.calls.index("memory_reserved")  # context before baseline
    cuda.allocate(1000)                       # the weights
    sampler.phase("prepare")
    cuda.allocate(3000), cuda.free(3000)      # scoring: 3000 MiB used, then cached by the allocator
    sampler.phase("train")
    cuda.allocate(2000)                       # a training step: 2000 MiB more than the weights
    time.sleep(0.05)
    peaks = sampler.stop()
    assert peaks["memory_source"] == "cuda_max_reserved" and peaks["memory_phase"] == "train"
    assert peaks["peak_memory_mb"] == pytest.approx(3000)  # weights + step; without emptying: 4000
    assert peaks["phase_peak_memory_mb"] == {"load": pytest.approx(1000), "prepare": pytest.approx(4000),
                                             "train": pytest.approx(3000)}
    assert peaks["cuda_max_allocated_mb"] == pytest.approx(3000) and peaks["cuda_max_reserved_mb"] == pytest.approx(3000)
    assert peaks["nvml_used_peak_mb"] == pytest.approx(3000) and peaks["nvml_error"] is None
    assert peaks["paged_memory_mb"] == 0


def test_paged_optimizer_states_count_in_the_headline_and_the_memory_limit(cuda, monkeypatch):
    """Bug 4: bitsandbytes' paged optimizers keep their states in CUDA managed memory, which
    torch's allocator does not see: full-paged's headline left them out and memory_limit_mb
    could not cap them. They are read from bitsandbytes' page manager and added."""
    import bitsandbytes.functional as F

    from harness.measure import MemoryLimitExceeded, MemorySampler

    pages = F.GlobalPageManager.get_instance()
    monkeypatch.setattr(pages, "paged_tensors", [])
    sampler = MemorySampler(torch.device("cuda"), interval_s=0.01, limit_mb=2000).start()
    # the allocator is capped at the limit above the baseline (a real CUDA OOM past it)
    assert cuda.gpus[0].limit == 2000 * MIB
    cuda.allocate(1000)
    sampler.phase("train")
    pages.paged_tensors.append(types.SimpleNamespace(nbytes=600 * MIB))  # AdamW8bit's states, paged
    time.sleep(0.05)
    assert sampler.usage_mb() == pytest.approx(1600)
    pages.paged_tensors.append(types.SimpleNamespace(nbytes=600 * MIB))
    with pytest.raises(MemoryLimitExceeded):  # 1000 reserved + 1200 paged > 2000: the sampler stops the job
        time.sleep(2)
    peaks = sampler.stop()
    assert peaks["memory_source"] == "cuda_max_reserved_plus_paged"
    assert peaks["paged_memory_mb"] == pytest.approx(1200) and peaks["peak_memory_mb"] == pytest.approx(2200)
    assert sampler.exceeded_mb == pytest.approx(2200)


def test_nvml_reads_the_gpu_torch_uses_found_by_its_uuid(monkeypatch):
    """Bug 8: the NVML handle came from the CUDA index, but CUDA orders devices fastest first
    and NVML by PCI bus (and CUDA_VISIBLE_DEVICES renumbers them): it could read another GPU.
    It is now found by the UUID torch reports, for a MIG slice too."""
    from harness.measure import _nvml_handle

    fast, slow = FakeGpu(pci_position=1), FakeGpu(name="NVIDIA A100-SXM4-80GB", pci_position=0)
    fake = FakeCuda(monkeypatch, [fast, slow])
    import pynvml

    assert pynvml.nvmlDeviceGetHandleByIndex(0) is slow  # what an index lookup found for cuda:0
    assert _nvml_handle(torch.device("cuda:0")) == (fast, None)
    assert _nvml_handle(torch.device("cuda:1")) == (slow, None)
    fast.mig = True
    assert _nvml_handle(torch.device("cuda:0")) == (fast, None)  # MIG-<uuid>
    pynvml.fail.add("nvmlDeviceGetHandleByUUID")
    handle, error = _nvml_handle(torch.device("cuda:0"))
    assert handle is None and error.startswith(f"nvmlDeviceGetHandleByUUID('MIG-{fast.uuid}'): NVMLError")
    assert fake.gpus[0] is fast


def test_an_nvml_error_never_ends_the_job(cuda, monkeypatch):
    """Bug 8: NVML was read unguarded when the sampler started, outside the job's try: an NVML
    error (no permission, a MIG parent) ended the job with no result. torch's readings stand,
    and the result says why NVML was not read."""
    import pynvml

    from harness.measure import MemorySampler

    pynvml.fail.add("nvmlDeviceGetMemoryInfo")
    sampler = MemorySampler(torch.device("cuda:0"), interval_s=0.01).start()
    cuda.allocate(100)
    time.sleep(0.03)
    peaks = sampler.stop()
    assert peaks["peak_memory_mb"] == pytest.approx(100) and peaks["nvml_used_peak_mb"] is None
    assert peaks["nvml_error"] == "nvmlDeviceGetMemoryInfo: NVMLError: nvmlDeviceGetMemoryInfo: Insufficient Permissions"


# --------------------------------------------------------------------------- the device


def test_native_bf16_is_asked_of_the_jobs_own_gpu_and_excludes_emulation(monkeypatch):
    """Bug 2: torch.cuda.is_bf16_supported() counts emulation by default, so a V100 or T4 said
    native bf16 and never fell back to float32. Bug 12: it asks the current device, cuda:0,
    whatever the job's device."""
    from harness.job import has_native_bf16, without_emulated_bf16

    FakeCuda(monkeypatch, [FakeGpu(**V100), FakeGpu(**A100)])
    assert torch.cuda.is_bf16_supported()  # what the harness asked before
    assert not has_native_bf16(torch.device("cuda:0"))
    assert has_native_bf16(torch.device("cuda:1"))
    method = {"base_dtype": "bfloat16", "quantization": {"bnb_4bit_compute_dtype": "bfloat16"}}
    ran, tcfg = without_emulated_bf16(method, {"precision": "bf16"}, torch.device("cuda:0"))
    assert ran["base_dtype"] == "float32" and ran["quantization"]["bnb_4bit_compute_dtype"] == "float32"
    assert tcfg["precision"] == "fp32"
    assert without_emulated_bf16(method, {"precision": "bf16"}, torch.device("cuda:1")) == (method, {"precision": "bf16"})


def test_cuda_n_becomes_the_current_device_and_a_missing_ordinal_is_refused(monkeypatch):
    """Bug 12: device=cuda:N never called set_device (libraries that use "the current device"
    used cuda:0), and an ordinal the process cannot see failed inside the memory sampler."""
    from harness.job import pick_device

    fake = FakeCuda(monkeypatch, [FakeGpu(), FakeGpu()])
    assert pick_device("cuda:1") == torch.device("cuda:1") and fake.current == 1
    assert pick_device("cuda") == torch.device("cuda:0") and fake.current == 0
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(ConfigError, match=r"^device='cuda:2': this process sees 2 CUDA device\(s\), cuda:0 to cuda:1 "
                                          r"\(CUDA_VISIBLE_DEVICES=4,5\)$"):
        pick_device("cuda:2")
    FakeCuda(monkeypatch, [])
    with pytest.raises(ConfigError, match=r"^device='cuda', but no CUDA device is available"):
        pick_device("cuda")


@pytest.mark.parametrize("error,oom", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (torch.AcceleratorError("CUDA error: out of memory\nCompile with `TORCH_USE_CUDA_DSA`"), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5\n"
                  "Last error:\nCuda failure 'out of memory'"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 10737418240 bytes"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("Expected all tensors to be on the same device"), False),
    (ValueError("out of memory"), False),  # not an error a device raises
])
def test_out_of_memory_is_recognised_in_its_every_form(error, oom):
    """Bug 11: CUDA OOMs that come as torch.AcceleratorError or a RuntimeError (cuBLAS, NCCL),
    or wrapped by a library, were recorded as `error`, not `oom`."""
    from harness.job import is_out_of_memory

    assert is_out_of_memory(error) is oom
    try:  # wrapped, as transformers wraps errors while loading
        try:
            raise error
        except Exception as inner:
            raise OSError("cannot load the model") from inner
    except OSError as wrapped:
        assert is_out_of_memory(wrapped) is oom


def test_a_device_that_fails_before_the_job_starts_leaves_an_error_result(cuda, tmp_path, monkeypatch):
    """Bug 1: the job's first CUDA calls (its device's facts, the memory sampler) ran outside
    its try: a CUDA error there ("Cannot re-initialize CUDA in forked subprocess") left no
    result, only "exited with code 1 without writing a result". Now it is the job's result."""
    from harness import results
    from harness.job import run_job

    def refuse(device=None):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you "
                           "must use the 'spawn' start method")

    monkeypatch.setattr(torch.cuda, "get_device_properties", refuse)
    result = run_job(compose(["device=cuda"]), tmp_path)
    assert result["status"] == "error" and result["error"].startswith("RuntimeError: Cannot re-initialize CUDA")
    written = json.loads((tmp_path / "result.json").read_text())
    results.validate(written)
    assert written["status"] == "error" and written["env"]["device"] is None and written["metrics"]["wall_total_s"] > 0


def test_the_device_facts_of_a_gpu_job(cuda):
    from harness.results import device_info

    gpu = cuda.gpus[0]
    info = device_info(torch.device("cuda:0"))
    assert info == {"device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3",
                    "cuda": {"runtime": "12.8", "driver": "570.124.06", "capability": "9.0",
                             "total_memory_mb": 81_559, "multiprocessors": 132, "uuid": gpu.uuid}}


def test_mfu_of_a_mig_slice_is_of_its_share_of_the_gpu(monkeypatch):
    """Bug 9 on the job's side: the MFU uses the device's name and SM count, so a MIG slice is
    measured against its share of the GPU's peak (it got the whole GPU's: MFU up to 7x low)."""
    from harness import job

    FakeCuda(monkeypatch, [FakeGpu(name="NVIDIA H100 80GB HBM3 MIG 1g.10gb", multiprocessors=16, mig=True)])
    monkeypatch.setattr("harness.flops.matmul_weights", lambda model: (1_000_000, 0, 0))
    config = types.SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, head_dim=16,
                                   num_key_value_heads=4, vocab_size=100)
    m = job.training_flops(torch.nn.Linear(1, 1), config, {"optimizer": {"name": "adamw"}},
                           [{"input_ids": [1] * 32}], torch.device("cuda:0"), 1000.0, 32)
    assert m["peak_bf16_tflops"] == pytest.approx(989.4 * 16 / 132)
    assert m["mfu"] == pytest.approx(m["train_tflops"] / (989.4 * 16 / 132))


def test_nccl_on_gpus_each_rank_on_its_own(monkeypatch):
    """A job across ranks on GPUs: rank r joins NCCL on cuda:LOCAL_RANK, made current."""
    import torch.distributed as dist

    from harness import distributed

    fake = FakeCuda(monkeypatch, [FakeGpu(), FakeGpu()])
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init("auto") == torch.device("cuda:1") and fake.current == 1
    assert joined == [("nccl", {"device_id": torch.device("cuda:1")})]
    assert distributed.init("cpu") == torch.device("cpu") and joined[-1] == ("gloo", {})


# --------------------------------------------------------------------------- models on a GPU


def test_random_weights_are_built_where_they_fit(cuda, monkeypatch):
    """Bug 5: a random-weight model was built whole on the GPU (to_empty(device="cuda")): the
    70B and 72B configs could not be built on an 80 GB card. It is built on the GPU when it fits
    90% of the free memory, else on the CPU, else refused in one line."""
    import psutil

    from harness.models import build_device

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2000 * 2**30))
    assert build_device(16 * 2**30) == "cuda"          # an 8B model in bf16
    assert build_device(141 * 2**30) == "cpu"          # a 70B model: 141 GB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=100 * 2**30))
    with pytest.raises(ConfigError, match=r"^building its random bf16 weights takes 141.0 GiB, and neither the GPU "
                                          r"nor this host has that much free \(host: 100.0 GiB available\)$"):
        build_device(141 * 2**30)


def test_hqq_quantizes_from_the_host_not_a_whole_bf16_copy_on_the_gpu(monkeypatch, model_cache):
    """Bug 10: the HQQ path moved the whole bf16 model to the GPU before quantizing it (hqq
    moves each layer itself as it quantizes it): the load peak was the unquantized model's."""
    from harness import models

    seen = {}

    def quantize(model, config, dtype, device):
        seen["weights"] = {p.device.type for p in model.parameters()}
        seen["device"] = device

    monkeypatch.setattr(models, "quantize_with_hqq", quantize)
    source = models.resolve_model_source(compose()["model"])
    models.load_model(source, None, dtype=torch.bfloat16, quantization={"quant_method": "hqq", "nbits": 4},
                      device=torch.device("cuda:0"))
    assert seen == {"weights": {"cpu"}, "device": torch.device("cuda:0")}


def test_what_hqq_leaves_behind_moves_one_tensor_at_a_time():
    from harness.models import move_outside

    class Packed(torch.nn.Linear):  # stands for HQQLinear, whose tensors hqq places itself
        pass

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Packed(2, 2), torch.nn.LayerNorm(2))
    model[2].register_buffer("rotary", torch.ones(2))
    move_outside(model, Packed, "meta")
    assert {p.device.type for p in model[0].parameters()} == {"meta"} and model[2].rotary.device.type == "meta"
    assert {p.device.type for p in model[1].parameters()} == {"cpu"}


# --------------------------------------------------------------------------- launching on a GPU host


def test_on_a_host_with_gpus_jobs_spawn(monkeypatch):
    """Bug 1: every job was forked from a server that had imported bitsandbytes, whose import
    initialises CUDA (cextension -> cuda_specs -> torch.cuda.get_device_capability); a forked
    process cannot use CUDA after that. On a host with GPUs jobs spawn."""
    import sys

    from harness import launch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    FakeCuda(monkeypatch, [FakeGpu()])  # NVML says one GPU
    assert launch.job_context().get_start_method() == "spawn"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVIDIA driver
    assert launch.job_context().get_start_method() == "forkserver"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert launch.job_context().get_start_method() == "spawn"


def test_a_spawned_job_runs_and_records_where_it_ran(tmp_path, monkeypatch):
    """The spawn path for real (on the CPU): the job process starts fresh, takes its payload's
    environment before anything asks a device, and writes its result."""
    import multiprocessing

    from harness import launch

    monkeypatch.setattr(launch, "job_context", lambda: multiprocessing.get_context("spawn"))
    config = compose(["train.max_steps=2", "eval.before=false", "task.n_test=4", "task.n_validation=4"])
    payload = {"config": config, "command": "test", "overrides": [], "launched_at": time.time(),
               "env": {"CUDA_VISIBLE_DEVICES": "", "HARNESS_GPU_SLOT": "0"}}
    result = launch.launch_job(payload, tmp_path)
    assert result["status"] == "ok", result["error"]
    assert result["env"]["launch"]["cuda_visible_devices"] == "" and result["env"]["launch"]["gpu_slot"] == 0
    assert result["env"]["pid"] != os.getpid()


@pytest.mark.parametrize("visible,nvml,gpus", [
    (None, 2, ["0", "1"]), ("2,3", 8, ["2", "3"]), ("", 8, []), ("-1", 8, []), ("0,-1,1", 8, ["0"]),
    ("GPU-8a6e,GPU-1b2c", 8, ["GPU-8a6e", "GPU-1b2c"]), (None, 0, [])])
def test_the_gpus_of_a_host_as_cuda_visible_devices_names_them(monkeypatch, visible, nvml, gpus):
    from harness.config import gpu_count, host_gpus

    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    FakeCuda(monkeypatch, [FakeGpu() for _ in range(nvml)])
    assert host_gpus() == gpus and gpu_count() == len(gpus)


def test_local_gpus_gives_each_running_job_a_gpu_the_user_allowed(tmp_path):
    """Bug 7: with more jobs than GPUs the slots named GPUs that do not exist (CUDA then sees
    none and device=auto trains on the CPU without a word), outside the user's
    CUDA_VISIBLE_DEVICES, or "0" where the user had set it empty."""
    import contextlib

    from harness.launch import gpu_slot, slot_count

    assert slot_count(4, ["2", "3"]) == 2      # 4 jobs asked, 2 GPUs: 2 at a time, the others wait
    assert slot_count(-1, ["0", "1", "2"]) == 3  # joblib's -1: a job per GPU
    assert slot_count(2, []) == 2              # CPU jobs side by side
    with contextlib.ExitStack() as held:
        taken = [held.enter_context(gpu_slot(tmp_path / "slots", 2, ["2", "3"])) for _ in range(2)]
    assert taken == [(0, "2"), (1, "3")]
    with gpu_slot(tmp_path / "cpu", 2, []) as (slot, visible):
        assert (slot, visible) == (0, "")      # a CPU job sees no GPU
    with pytest.raises(ValueError, match="3 GPU slots for 2 GPUs"):
        with gpu_slot(tmp_path / "bad", 3, ["0", "1"]):
            pass


def test_bf16_autocast_on_a_gpu_is_cudas(cuda):
    """train.precision=bf16 on a GPU: bf16 autocast for device type cuda, recorded as such."""
    from harness.job import autocast_for

    factory, dtype = autocast_for(torch.device("cuda:0"), "bf16")
    assert dtype == "bfloat16" and factory.keywords == {"device_type": "cuda", "dtype": torch.bfloat16}
    assert factory.func is torch.autocast
    assert autocast_for(torch.device("cuda:0"), "fp32")[1] is None


def test_the_memory_model_on_a_gpu_counts_the_cuda_context_and_multi_tensor_adamw():
    """The memory model's CUDA terms: the planner adds the CUDA context to each prediction, and
    AdamW's default on CUDA is the multi-tensor (foreach) step, whose temporaries the CPU's
    for-loop step does not make."""
    from harness import memory_model, plan

    arch = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000, "tie_word_embeddings": False}
    full = {"name": "full", "base_dtype": "float32", "optimizer": {"name": "adamw"}}
    gpu = memory_model.predict(arch, full, batch_size=2, seq_len=64, device="cuda")
    cpu = memory_model.predict(arch, full, batch_size=2, seq_len=64, device="cpu")
    assert gpu["peak_mb"] > cpu["peak_mb"]  # the foreach step's temporaries
    train = {"batch_size": 2, "seq_len": 64, "gradient_checkpointing": False, "precision": "bf16",
             "adamw_impl": "default", "nproc_per_node": 1, "grad_accum": 1}
    (row,) = plan.plan(arch, [full], train, [gpu["peak_mb"] / 1024 + 0.4, gpu["peak_mb"] / 1024 + 0.6])
    # a card fits the job when the prediction plus the 512 MiB CUDA context is within it
    assert row["peak_mb"] == gpu["peak_mb"] and list(row[k] for k in row if k.startswith("fits_")) == [False, True]


def test_a_cuda_oom_in_a_job_is_an_oom_result_with_its_prediction(cuda, tmp_path, monkeypatch):
    """A CUDA out-of-memory raised while the job runs (here as the model loads onto the GPU,
    wrapped by the loader as transformers wraps it) is recorded as `oom`, with the memory
    model's prediction of the need, the peak so far and the phase it happened in."""
    from harness import job, results

    def load(setup, config, device, sampler):
        cuda.allocate(50_000)  # the weights so far
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.2 GiB is free.")
        except torch.OutOfMemoryError as e:
            raise OSError("cannot load the model") from e

    monkeypatch.setattr(job, "load", load)
    result = job.run_job(compose(["device=cuda"]), tmp_path)
    results.validate(json.loads((tmp_path / "result.json").read_text()))
    m = result["metrics"]
    assert result["status"] == "oom" and result["error"].startswith("OSError: cannot load the model")
    assert "(predicted need: " in result["error"] and m["predicted_peak_memory_mb"] > 0
    assert m["memory_source"] == "cuda_max_reserved" and m["memory_phase"] == "load"
    assert m["peak_memory_mb"] == pytest.approx(50_000)
    assert result["env"]["device"] == "cuda:0" and result["env"]["bf16_native"] is True
