"""A fake CUDA machine for the CPU test suite, so that every branch the harness runs only on a
GPU runs here too: `torch.cuda`'s functions and NVML (`pynvml`) as the harness calls them,
answering from GPUs described by name, capability, memory, SM count and UUID, with a caching
allocator's counters (allocated, reserved, peaks, the cache) that a test moves by hand.

What it cannot fake honestly is left out: no tensor is ever allocated on "cuda", no kernel runs.
Code that would allocate on the GPU (a model moved there, a training step) is not run with it;
the tests drive the measurement, device and launch code around such steps instead.
"""

from __future__ import annotations

import types
import uuid as uuid_module
from dataclasses import dataclass, field

MIB = 2**20


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] = (9, 0)
    total_mb: int = 81_559
    multiprocessors: int = 132
    uuid: str = field(default_factory=lambda: str(uuid_module.uuid4()))
    pci_position: int | None = None  # NVML's index (PCI bus order); None: the same as CUDA's
    context_mb: int = 500  # what NVML counts as used once a process has a context on it
    mig: bool = False  # a MIG slice: NVML knows it as MIG-<uuid>
    # the caching allocator, in bytes
    allocated: int = 0
    cached: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    limit: int | None = None  # set_per_process_memory_fraction

    @property
    def reserved(self) -> int:
        return self.allocated + self.cached


class FakeProperties:
    def __init__(self, gpu: FakeGpu):
        self.name, (self.major, self.minor) = gpu.name, gpu.capability
        self.total_memory, self.multi_processor_count = gpu.total_mb * MIB, gpu.multiprocessors
        self.uuid = gpu.uuid  # torch prints it without a GPU-/MIG- prefix


class FakeCuda:
    """Patches torch.cuda (through pytest's monkeypatch) to answer for `gpus`; `calls` records
    each patched call by name, in order."""

    def __init__(self, monkeypatch, gpus: list[FakeGpu], nvml: bool = True):
        import torch

        self.gpus, self.calls, self.current = gpus, [], 0
        self.initialized = False
        cuda = torch.cuda

        def record(name, fn):
            def wrapper(*args, **kwargs):
                self.calls.append(name)
                return fn(*args, **kwargs)
            monkeypatch.setattr(cuda, name, wrapper)

        record("is_available", lambda: bool(self.gpus))
        record("device_count", lambda: len(self.gpus))
        record("current_device", lambda: self.current)
        record("set_device", lambda device: setattr(self, "current", self.index(device)))
        record("get_device_name", lambda device=None: self.gpu(device).name)
        record("get_device_capability", lambda device=None: self.gpu(device).capability)
        record("get_device_properties", lambda device=None: FakeProperties(self.gpu(device)))
        record("is_bf16_supported", lambda including_emulation=True: True)  # as torch says on any CUDA GPU
        record("is_initialized", lambda: self.initialized)
        record("synchronize", lambda device=None: None)
        record("memory_allocated", lambda device=None: self.gpu(device).allocated)
        record("memory_reserved", lambda device=None: self.gpu(device).reserved)
        record("max_memory_allocated", lambda device=None: self.gpu(device).peak_allocated)
        record("max_memory_reserved", lambda device=None: self.gpu(device).peak_reserved)
        record("reset_peak_memory_stats", self._reset_peaks)
        record("empty_cache", self._empty_cache)
        record("mem_get_info", lambda device=None: ((self.gpu(device).total_mb * MIB - self.gpu(device).reserved),
                                                    self.gpu(device).total_mb * MIB))
        record("set_per_process_memory_fraction", self._set_fraction)
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(torch.version, "hip", None)
        if nvml:
            import sys

            monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(self))

    def index(self, device) -> int:
        import torch

        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        return torch.device(device).index or 0

    def gpu(self, device=None) -> FakeGpu:
        return self.gpus[self.index(device)]

    # the allocator, driven by the test
    def allocate(self, mb: float, device=0) -> None:
        import torch

        gpu, n = self.gpu(device), int(mb * MIB)
        take = min(gpu.cached, n)
        if gpu.limit is not None and gpu.reserved + n - take > gpu.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {mb:.2f} MiB")
        gpu.cached -= take
        gpu.allocated += n
        gpu.peak_allocated = max(gpu.peak_allocated, gpu.allocated)
        gpu.peak_reserved = max(gpu.peak_reserved, gpu.reserved)

    def free(self, mb: float, device=0) -> None:
        gpu, n = self.gpu(device), int(mb * MIB)
        gpu.allocated -= n
        gpu.cached += n  # the caching allocator keeps the block

    def _reset_peaks(self, device=None) -> None:
        gpu = self.gpu(device)
        gpu.peak_allocated, gpu.peak_reserved = gpu.allocated, gpu.reserved

    def _empty_cache(self) -> None:
        for gpu in self.gpus:
            gpu.cached = 0

    def _set_fraction(self, fraction: float, device=None) -> None:
        gpu = self.gpu(device)
        gpu.limit = int(fraction * gpu.total_mb * MIB)


class NVMLError(Exception):
    pass


class FakeNvml(types.ModuleType):
    """pynvml as the harness calls it. `used` counts a context, what torch reserved and
    `managed` (paged) bytes the test sets; `fail` names a call that raises NVMLError."""

    NVMLError = NVMLError

    def __init__(self, cuda: FakeCuda):
        super().__init__("pynvml")
        self.cuda, self.managed, self.fail = cuda, 0, set()

    def _check(self, name):
        if name in self.fail:
            raise NVMLError(f"{name}: Insufficient Permissions")

    def _order(self):  # NVML's order: PCI bus position
        gpus = list(self.cuda.gpus)
        return sorted(gpus, key=lambda g: g.pci_position if g.pci_position is not None else gpus.index(g))

    def nvmlInit(self):
        self._check("nvmlInit")

    def nvmlDeviceGetCount(self):
        self._check("nvmlDeviceGetCount")
        return len(self.cuda.gpus)

    def nvmlSystemGetDriverVersion(self):
        return "570.124.06"

    def nvmlDeviceGetHandleByIndex(self, index):
        self._check("nvmlDeviceGetHandleByIndex")
        return self._order()[index]

    def nvmlDeviceGetHandleByUUID(self, text):
        self._check("nvmlDeviceGetHandleByUUID")
        for gpu in self.cuda.gpus:
            if text == ("MIG-" if gpu.mig else "GPU-") + gpu.uuid:
                return gpu
        raise NVMLError(f"Not Found: {text}")

    def nvmlDeviceGetMemoryInfo(self, handle):
        self._check("nvmlDeviceGetMemoryInfo")
        used = handle.context_mb * MIB + handle.reserved + self.managed
        return types.SimpleNamespace(used=used, total=handle.total_mb * MIB, free=handle.total_mb * MIB - used)
