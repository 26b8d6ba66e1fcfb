"""Measurement: peak memory (sampled in a background thread), step timing, weight bytes.

Peak memory, by device (each reading minus its baseline, taken before the model loads):
  CUDA  torch's peak allocated and peak reserved (exact, from the caching allocator), and
        NVML "used" memory of the GPU, sampled. The headline is peak reserved: what the
        process's tensors really held on the card, allocator slack included; each phase
        starts with the allocator's cache emptied, so that blocks cached by loading and
        scoring do not count as training's. bitsandbytes' paged optimizer states live in
        CUDA managed memory, outside torch's allocator: their bytes are added to the
        headline whole (`paged_memory_mb`, memory_source `cuda_max_reserved_plus_paged`),
        as resident on the card unless it runs short, which is what paging them is for.
  CPU   the bytes malloc has handed out and not yet had back (glibc's mallinfo2(): every
        tensor, oneDNN scratch and library buffer), sampled, plus the model's tensors that
        live in memory-mapped checkpoint files (a load without a copy, which malloc never
        sees): the headline, what the job's tensors really hold (`cpu_malloc_in_use`).
        Beside it, the OS view: the kernel's RSS high-water mark (VmHWM on Linux), which also
        counts what the allocator keeps after a free and the checkpoint file pages mapped
        while loading. Reading mallinfo2 changes nothing in how the allocator behaves, and one
        call per sample is all the thread does; without glibc (macOS, musl) RSS is sampled and
        the headline falls back to it.
Phases: a job tells the sampler when it moves from loading the model ("load") to preparing it
(the method applied, the scores before training: "prepare") to training ("train"), and each
phase's peak is kept (`phase_peak_memory_mb`). The headline is the training phase's peak,
what the memory model predicts: from the start of the first training step to the end of the
last, the weights and everything else still held included. A phase before it can peak higher
(a load that casts a checkpoint's dtype, scoring with a large vocabulary); a job that fails
before training reports the phase it failed in (`memory_phase`). The RSS high-water mark is
the kernel's, over the whole process.
All values are MiB (2**20 bytes).
"""

from __future__ import annotations

import ctypes
import resource
import signal
import sys
import threading
import time

MIB = 2**20


class MemoryLimitExceeded(MemoryError):
    """The job went over its `memory_limit_mb`: an out-of-memory result, like a CUDA OOM."""


def _max_rss_bytes() -> int:
    """This process's RSS high-water mark. Linux: VmHWM, which a new process starts afresh;
    ru_maxrss would carry the peak of the process that started this one across fork/exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, others: KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's mallinfo2 (glibc 2.33+), or None on other C libraries."""
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _mallinfo2() if sys.platform.startswith("linux") else None


def malloc_in_use_bytes() -> int | None:
    """Bytes malloc has handed out and not had back, in every arena: small blocks in the heaps
    (uordblks) plus the blocks it mmapped on their own (hblkhd). None without glibc."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def file_mapped_tensor_bytes(module) -> int:
    """Bytes of `module`'s parameters and buffers whose storage lies in a memory-mapped file.

    transformers loads a safetensors checkpoint without copying when the dtype and device
    match (a private mapping of the file): those weights are real memory of the job, but
    malloc never handed them out. Linux only (/proc/self/maps); 0 elsewhere."""
    try:
        regions = []
        for line in open("/proc/self/maps"):
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                regions.append((start, end))
    except OSError:
        return 0
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or t.device.type != "cpu":
            continue
        seen.add(ptr)
        if any(start <= ptr < end for start, end in regions):
            total += storage.nbytes()
    return total


class MemorySampler:
    """Start before the model loads; `stop()` returns the peaks over the measured span.

    With `limit_mb`, the job is held to that much memory above the baseline: on CUDA the
    caching allocator is capped (a real CUDA OOM), and on every device the sampler raises
    MemoryLimitExceeded in the main thread as soon as it reads more than the limit.
    """

    def __init__(self, device, interval_s: float = 0.05, limit_mb: float | None = None):
        import psutil
        import torch

        self.device = torch.device(device)
        self.interval_s = interval_s
        self.current_phase = "load"
        # phase changes counted by the main thread; the sampling thread restarts its own peak
        # when it sees a new one (only it writes its peak: no lock, which a signal could leave held)
        self._phase_index = self._seen_index = 0
        self.phase_peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._nvml = None
        self.nvml_error: str | None = None  # why NVML was not read (no driver, a MIG parent, no permission)
        # CPU with glibc: the headline reads malloc's bytes in use (else RSS, or CUDA's peaks)
        self.uses_malloc = self.device.type != "cuda" and _MALLINFO2 is not None
        if self.device.type == "cuda":
            create_cuda_context(self.device)  # before the baseline: the context is not the job's
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_allocated = torch.cuda.memory_allocated(self.device)
            self.base_reserved = torch.cuda.memory_reserved(self.device)
            self._nvml, self.nvml_error = _nvml_handle(self.device)
            self.base_sampled = self._read()
        else:
            self._process = psutil.Process()
            self.base_sampled = self._read()
            self.base_in_use = malloc_in_use_bytes()
            self.peak_in_use = self.peak_probed = self.base_in_use
        self.mapped_bytes = 0  # CPU: model tensors mapped from checkpoint files (see note_model)
        self.peak_sampled = self.base_sampled
        self.samples = 0
        self.peaks: dict | None = None  # set by the first stop()
        self.limit_mb = limit_mb
        self.exceeded_mb: float | None = None
        if limit_mb and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (self.base_reserved + limit_mb * MIB) / total),
                                                       self.device)

    def probe(self) -> None:
        """A reading from the training loop itself, at the moments memory peaks (after the
        forward pass, after the optimizer step): one mallinfo2 call, so the thread can sample
        slowly and still not miss a step's peak. A no-op on CUDA, whose peaks are exact."""
        if self.uses_malloc:
            self.peak_probed = max(self.peak_probed, malloc_in_use_bytes())

    def phase(self, name: str) -> None:
        """End the current phase, keeping its peak, and start `name` ("prepare", "train") with
        peaks reset to what is held now (the baseline stays the job's)."""
        self.phase_peaks[self.current_phase] = self._phase_peak_mb()
        self.current_phase = name
        if self.device.type == "cuda":
            import gc

            import torch

            gc.collect()  # what the last phase dropped, then the blocks cached for it
            torch.cuda.empty_cache()  # reserved = held: the new phase's peak starts from there
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.uses_malloc:
            self.peak_probed = malloc_in_use_bytes()
        self._phase_index += 1

    def _phase_peak_mb(self) -> float:
        """The current phase's peak so far, on the headline's basis (the thread's peak counts
        once it has sampled in this phase); 0 for a phase that never held more than the
        baseline (a process that frees, during the job, memory it held before it: a job run
        inside a process that ran others)."""
        if self.device.type == "cuda":
            import torch

            reserved = torch.cuda.max_memory_reserved(self.device) - self.base_reserved
            return max(0.0, (reserved + paged_bytes()) / MIB)
        fresh = self._seen_index == self._phase_index
        if self.uses_malloc:
            sampled = self.peak_in_use if fresh else 0
            peak = max(sampled, self.peak_probed, malloc_in_use_bytes()) - self.base_in_use + self.mapped_bytes
        else:
            peak = max(self.peak_sampled if fresh else 0, self._read()) - self.base_sampled
        return max(0.0, peak / MIB)

    def note_model(self, model) -> None:
        """Count, from now on, the model's tensors that live in mapped checkpoint files (CPU):
        malloc does not see them. Call once the model is ready to train."""
        if self.device.type == "cpu":
            self.mapped_bytes = file_mapped_tensor_bytes(model)

    def usage_mb(self) -> float:
        """Memory the job holds now above the baseline, on the headline's basis: torch reserved
        on CUDA, malloc in use on CPU (RSS without glibc)."""
        if self.device.type == "cuda":
            import torch

            return (torch.cuda.memory_reserved(self.device) - self.base_reserved + paged_bytes()) / MIB
        if self.uses_malloc:
            return (malloc_in_use_bytes() - self.base_in_use + self.mapped_bytes) / MIB
        return (self._read() - self.base_sampled) / MIB

    def _read(self) -> int:
        if self.device.type == "cuda":
            if self._nvml is None:
                return 0
            import pynvml

            try:
                return pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used
            except Exception as e:  # an NVML error never ends the job: torch's readings still stand
                self._nvml, self.nvml_error = None, f"nvmlDeviceGetMemoryInfo: {type(e).__name__}: {e}"
                return 0
        return self._process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            if self.limit_mb and self.exceeded_mb is None and (used := self.usage_mb()) > self.limit_mb:
                self.exceeded_mb = used
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        index = self._phase_index
        restart = index != self._seen_index  # a new phase: this reading starts its peak
        self._seen_index = index
        if self.uses_malloc:
            # one mallinfo2 call: the RSS peak comes from the kernel's high-water mark at the end
            value = malloc_in_use_bytes()
            self.peak_in_use = value if restart else max(self.peak_in_use, value)
        else:
            value = self._read()
            self.peak_sampled = value if restart else max(self.peak_sampled, value)
        self.samples += 1

    def _raise_exceeded(self, signum, frame) -> None:
        raise MemoryLimitExceeded(f"over memory_limit_mb={self.limit_mb:g}")

    def start(self) -> "MemorySampler":
        """Start sampling (call from the main thread, which receives MemoryLimitExceeded)."""
        if self.limit_mb:
            self._previous_handler = signal.signal(signal.SIGUSR1, self._raise_exceeded)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop sampling and return the peaks; later calls return the same peaks."""
        if self.peaks is None:
            self.peaks = self._stop_and_read()
        return self.peaks

    def _stop_and_read(self) -> dict:
        self._stop.set()
        self._thread.join()
        if self.limit_mb:
            signal.signal(signal.SIGUSR1, self._previous_handler)
        self._sample()
        self.peak_sampled = max(self.peak_sampled, self._read())
        peak = self.phase_peaks[self.current_phase] = self._phase_peak_mb()  # the headline
        common = {"peak_memory_mb": peak, "memory_phase": self.current_phase,
                  "phase_peak_memory_mb": dict(self.phase_peaks), "memory_samples": self.samples}
        # every peak below is the current phase's: training's, or where a failed job stopped
        sampled = (self.peak_sampled - self.base_sampled) / MIB
        if self.device.type == "cuda":
            import torch

            allocated = (torch.cuda.max_memory_allocated(self.device) - self.base_allocated) / MIB
            reserved = (torch.cuda.max_memory_reserved(self.device) - self.base_reserved) / MIB
            paged = paged_bytes() / MIB
            return {
                "memory_source": "cuda_max_reserved_plus_paged" if paged else "cuda_max_reserved",
                "cuda_max_allocated_mb": allocated,
                "cuda_max_reserved_mb": reserved,
                "paged_memory_mb": paged,
                "nvml_used_peak_mb": sampled if self._nvml is not None else None,
                "nvml_error": self.nvml_error,
                **common,
            }
        hwm = (_max_rss_bytes() - self.base_sampled) / MIB
        in_use = (max(self.peak_in_use, self.peak_probed) - self.base_in_use) / MIB if self.uses_malloc else None
        return {
            "memory_source": "cpu_rss" if in_use is None else "cpu_malloc_in_use",
            "malloc_in_use_peak_mb": in_use,
            "file_mapped_weights_mb": self.mapped_bytes / MIB,
            "rss_peak_sampled_mb": sampled if in_use is None else None,  # with glibc, VmHWM stands alone
            "rss_high_water_mark_mb": hwm,  # the whole process's, every phase
            **common,
        }


def release_freed_cpu_memory(threshold_kb: int | None) -> int | None:
    """Have glibc's malloc serve blocks of `threshold_kb` and more with mmap, so they go back
    to the OS when freed and RSS follows the memory in use. Off by default
    (`measure.cpu_mmap_threshold_kb: null`): it turns every large allocation into an mmap and
    page faults, which cost a CPU job a large part of its speed (row harness+mmap of
    benchmarks/results/throughput.md),
    and the headline reading (malloc in use) does not need it. Returns the threshold set in
    bytes, or None (not glibc, or not asked)."""
    if not threshold_kb or not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        M_MMAP_THRESHOLD = -3
        if libc.mallopt(M_MMAP_THRESHOLD, int(threshold_kb) * 1024) != 1:
            return None
        libc.malloc_trim(0)  # hand back what the heap already holds, before the baseline
    except (OSError, AttributeError):  # musl and other libcs: leave the allocator as it is
        return None
    return int(threshold_kb) * 1024


def create_cuda_context(device) -> None:
    """Create the CUDA context on `device` (the first allocation does)."""
    import torch

    torch.zeros(1, device=device)


def paged_bytes() -> int:
    """Bytes of bitsandbytes' paged buffers (the states of its paged optimizers): CUDA managed
    memory, which torch's allocator does not see. bitsandbytes keeps every one it makes in its
    GlobalPageManager; 0 when bitsandbytes is not loaded or none was made (on a CPU its paged
    optimizers fall back to ordinary tensors)."""
    functional = sys.modules.get("bitsandbytes.functional")
    if functional is None:
        return 0
    return sum(t.nbytes for t in list(functional.GlobalPageManager.get_instance().paged_tensors))


def _nvml_handle(device):
    """(NVML handle of the torch device, None) or (None, why not). The device is found by its
    UUID, which torch reports: CUDA numbers devices fastest first by default, NVML in PCI bus
    order, and CUDA_VISIBLE_DEVICES renumbers them, so an index could name another GPU."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
    except Exception as e:  # no driver, no NVML: torch's readings still stand
        return None, f"{type(e).__name__}: {e}"
    candidates = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for candidate in candidates:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(candidate), None
        except Exception as e:
            error = f"nvmlDeviceGetHandleByUUID({candidate!r}): {type(e).__name__}: {e}"
    return None, error


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times optimizer steps (device synchronized) and counts their non-padding tokens.

    Throughput is the tokens of the steps after the warm-up over the wall time from the end
    of the warm-up to the end of the last step, so everything the loop does between steps
    (data, logging, progress bar) counts; `step_time_ms` is the median time of one step.
    """

    def __init__(self, device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self.times: list[float] = []
        self.tokens: list[int] = []
        self._t0 = 0.0
        self._first_start: float | None = None
        self._ends: list[float] = []

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        if self._first_start is None:
            self._first_start = self._t0

    def stop(self, tokens: int) -> float:
        synchronize(self.device)
        end = time.perf_counter()
        self._ends.append(end)
        self.times.append(end - self._t0)
        self.tokens.append(tokens)
        return end - self._t0

    def summary(self) -> dict:
        w = self.warmup_steps
        times, tokens = self.times[w:], self.tokens[w:]
        if not times:
            return {"tokens_per_s": None, "step_time_ms": None, "timed_steps": 0}
        window = self._ends[-1] - (self._ends[w - 1] if w else self._first_start)
        ordered = sorted(times)
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        return {
            "tokens_per_s": sum(tokens) / window,
            "step_time_ms": median * 1000,
            "timed_steps": len(times),
        }


# --------------------------------------------------------------------------- sizes


def hqq_layers(model) -> list:
    """The model's HQQ-quantized Linear layers (hqq's HQQLinear), without importing hqq."""
    return [m for m in model.modules() if type(m).__name__ == "HQQLinear"]


def _hqq_side_bytes(layer) -> int:
    """Bytes of an HQQ layer's scales and zero points (its `meta`; quantized ones included)."""
    import torch

    def tensors(d):
        for v in d.values():
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, dict):
                yield from tensors(v)

    return sum(_nbytes(t) for t in tensors(layer.meta))


def count_params(model) -> dict:
    """Trainable and total parameters, counting each packed 4-bit weight as its logical size."""
    trainable = total = 0
    hqq = {id(m.W_q): m.meta["shape"].numel() for m in hqq_layers(model)}  # packed: its logical size
    for p in model.parameters():
        n = hqq.get(id(p)) or _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return {"trainable_params": trainable, "total_params": total}


def _logical_numel(p) -> int:
    quant_state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
    return quant_state.shape.numel() if quant_state is not None else p.numel()


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def _quant_state_bytes(p) -> tuple[int, int]:
    """Bytes of the side data of a quantized weight: (scales, lookup tables).

    Scales grow with the weight: 4-bit block absmax (and with double quantization their own
    quantized scales), LLM.int8 row scales. Lookup tables (the NF4 code, the 8-bit code of
    double quantization: about 1 KiB per layer) do not, so bits per weight leave them out.
    """
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        scales, tables = _nbytes(qs.absmax) + _nbytes(getattr(qs, "offset", None)), _nbytes(qs.code)
        if getattr(qs, "state2", None) is not None:  # double quantization: the scales' scales
            scales += _nbytes(qs.state2.absmax)
            tables += _nbytes(qs.state2.code)
        return scales, tables
    return _nbytes(getattr(p, "SCB", None)), 0  # LLM.int8 row scales


def weight_bytes(model) -> dict:
    """Bytes of all weights as stored (packed 4-bit as packed, quantization scales and tables
    included), and the bits per weight of the quantized Linear layers, scales included (the
    QLoRA paper's 4.127 bits for NF4 with double quantization; HQQ's 4 bits with a bf16 scale
    and zero per 64 weights: 4.5); None without any."""
    total = 0
    quant_bytes = quant_weights = 0
    for layer in hqq_layers(model):  # HQQ: the packed weight is a parameter, its scales are not
        side = _hqq_side_bytes(layer)
        total += side
        quant_bytes += _nbytes(layer.W_q) + side
        quant_weights += layer.meta["shape"].numel()
    seen = set()
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        scales, tables = _quant_state_bytes(p)
        total += _nbytes(p) + scales + tables
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            quant_bytes += _nbytes(p) + scales
            quant_weights += _logical_numel(p)
    return {
        "weight_bytes": total,
        "quantized_bits_per_weight": 8 * quant_bytes / quant_weights if quant_weights else None,
    }
