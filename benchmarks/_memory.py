"""Peak tensor memory of one piece of work (a training step), on CPU and CUDA.

    peak = bytes alive at the start (counted explicitly) + the step's transient peak

What is counted
---------------
* At the start, `alive`: the tensors the caller names (model parameters and buffers, a
  reference model, optimizer state, masks, the batch), as the sum of their *unique
  storages* (a storage shared by several tensors or views counts once, at its full
  size: untyped_storage().nbytes(), keyed by data_ptr). Nothing is guessed: what the
  caller does not name is not in this term (`alive_tensor_bytes()` counts every tensor
  the garbage collector can see, as a cross-check for forgotten ones).
* During the step, on CPU: every allocation and free made through c10's CPU allocator
  (what every torch CPU tensor uses), recorded by torch.profiler with
  profile_memory=True. Each event has a byte delta (+ alloc, - free) and a timestamp; the
  events are sorted by time, summed cumulatively, and the transient peak is the largest
  prefix sum (0 if nothing is allocated). Sizes are the bytes requested, unrounded.
  On CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
  memory_allocated() at the start (the caching allocator's block-rounded sizes; the
  cache of freed blocks is not counted, as on CPU).

What is not counted
-------------------
* Memory not obtained through torch's allocator: oneDNN / BLAS / OpenMP scratch
  buffers, the Python heap, autograd graph nodes, the profiler's own records, glibc
  fragmentation. (`rss_*` in the benchmark reports the process's resident set as a
  coarse cross-check that includes all of that.)
* Frees, during the step, of blocks allocated *before* the profiler started: torch's CPU
  reporter does not know their size and emits no event for them (it warns once), so
  such a tensor stays counted until the end of the step. This can only over-state the
  peak. A step that starts with gradients already set to None (as the benchmark's do)
  frees almost nothing it did not allocate itself.

Phases: `with tracker.phase("backward"):` marks a part of the step; the report gives the
transient peak reached inside each phase (CPU: a torch.profiler record_function range;
CUDA: the peak statistics are read and reset at each phase boundary) and the phase in
which the overall peak happened, and on CPU the torch ops running at that moment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from typing import Iterable, Iterator

import torch

_PHASE_PREFIX = "phase:"


# ---------------------------------------------------------------------- explicit counting
def _flatten(items) -> Iterator[torch.Tensor]:
    if items is None:
        return
    if isinstance(items, torch.Tensor):
        yield items
    elif isinstance(items, dict):
        for v in items.values():
            yield from _flatten(v)
    elif isinstance(items, (list, tuple, set, frozenset)) or hasattr(items, "__next__"):
        for v in items:
            yield from _flatten(v)


def storage_bytes(*items) -> int:
    """Bytes of the unique storages of the tensors in `items` (tensors, or any nesting
    of lists / tuples / dicts / iterators of them). Views and shared storages count
    once, at the storage's full size; meta / fake tensors count zero."""
    seen: dict[tuple[str, int], int] = {}
    for t in _flatten(items):
        if t.device.type == "meta":
            continue
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage, and fake
            continue  # tensors (torch.compile keeps some alive) whose data pointer cannot be read
        if ptr == 0:
            continue
        key = (str(t.device), ptr)
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of a module (gradients are None at the steps' start)."""
    return [*module.parameters(), *module.buffers()]


def quant_state_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of every bitsandbytes 4-bit weight's QuantState (absmax, code book and,
    with double quantization, the second level): neither parameters nor buffers, so
    module_tensors does not see them."""
    from seat.quant import linear4bit_modules

    out = []
    for _, module in linear4bit_modules(model):
        state = module.weight.quant_state
        out += [state.absmax, state.code]
        if state.nested:
            out += [state.offset, state.state2.absmax, state.state2.code]
    return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's tensors: its per-parameter state (exp_avg, exp_avg_sq, step, and
    for seat.optim.SparseAdamW idx), plus SparseAdamW's compact gradients, masks and
    8-bit code books (state_bits=8: {device: {key: map}})."""
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for attr in ("_grads", "_masks", "_qmaps"):  # seat.optim.SparseAdamW
        tensors += list(_flatten(list(getattr(opt, attr, {}).values())))
    return tensors


def alive_tensor_bytes(device: str | torch.device = "cpu") -> int:
    """Unique-storage bytes of every tensor the garbage collector tracks on `device`
    (parameters, optimizer state, anything reachable as a Python object). A cross-check
    of the explicit count: tensors held only inside C++ (autograd graphs) are missed."""
    device_type = torch.device(device).type
    tensors = []
    with warnings.catch_warnings():  # isinstance on some deprecated module-level objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.device.type == device_type:
                    tensors.append(obj)
            except Exception:  # noqa: BLE001 - objects whose isinstance / device raise
                continue
    return storage_bytes(tensors)


# ---------------------------------------------------------------------- the report
@dataclasses.dataclass
class MemoryReport:
    device: str
    method: str  # "profiler (CPU allocator events)" or "cuda max_memory_allocated"
    start_bytes: int  # explicitly counted tensors alive at the start
    transient_peak_bytes: int  # largest (allocated - freed) during the step, >= 0
    end_bytes: int  # (allocated - freed) at the end of the step
    phases: dict[str, int]  # phase -> transient peak reached inside it
    peak_phase: str | None  # phase in which the transient peak happened
    peak_ops: list[str]  # CPU: the ops (outermost first) running at the peak
    n_events: int  # allocation + free events seen (CPU)

    @property
    def peak_bytes(self) -> int:
        return self.start_bytes + self.transient_peak_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["peak_bytes"] = self.peak_bytes
        return d


def transient_peak(deltas: Iterable[int]) -> tuple[int, int, int]:
    """(peak, index of the event reaching it or -1, final) of the running sum of byte
    deltas (allocations +, frees -), in order; peak >= 0 (the start)."""
    running, peak, at = 0, 0, -1
    for i, d in enumerate(deltas):
        running += d
        if running > peak:
            peak, at = running, i
    return peak, at, running


class PeakMemory:
    """Context manager measuring one step (see the module docstring).

        with PeakMemory("cpu", alive=[module_tensors(model), optimizer_tensors(opt)]) as pm:
            with pm.phase("forward"): loss = ...
            with pm.phase("backward"): loss.backward()
        pm.report.peak_bytes
    """

    def __init__(self, device: str | torch.device = "cpu", alive=()):
        self.device = torch.device(device)
        self.alive = alive
        self.report: MemoryReport | None = None
        self._prof = None
        self._phases: dict[str, int] = {}
        self._peak_phase: str | None = None
        self._cuda_peak = 0
        self._cuda_base = 0

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - self._cuda_base
                self._phases[name] = max(self._phases.get(name, 0), peak)
                if peak > self._cuda_peak:
                    self._cuda_peak, self._peak_phase = peak, name
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with torch.profiler.record_function(_PHASE_PREFIX + name):
                yield

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> "PeakMemory":
        self._start_bytes = storage_bytes(self.alive)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            self._cuda_peak = 0
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = max(self._cuda_peak, torch.cuda.max_memory_allocated(self.device) - self._cuda_base)
            end = torch.cuda.memory_allocated(self.device) - self._cuda_base
            self.report = MemoryReport(str(self.device), "cuda max_memory_allocated", self._start_bytes,
                                       max(peak, 0), end, dict(self._phases), self._peak_phase, [], 0)
            return
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.report = self._cpu_report()

    def _cpu_report(self) -> MemoryReport:
        events = self._prof.profiler.kineto_results.events()
        memory, ranges = [], []
        for e in events:
            if e.name() == "[memory]":
                if e.device_type() == torch._C._autograd.DeviceType.CPU:
                    memory.append((e.start_ns(), e.nbytes()))
            else:
                ranges.append((e.start_ns(), e.end_ns(), e.name()))
        memory.sort(key=lambda m: m[0])  # stable: simultaneous events keep their recorded order
        peak, at, end = transient_peak(d for _, d in memory)
        phases, peak_phase, peak_ops = {}, None, []
        t_peak = memory[at][0] if at >= 0 else None
        for start, stop, name in ranges:
            if not name.startswith(_PHASE_PREFIX):
                continue
            phase = name[len(_PHASE_PREFIX):]
            running, best = 0, 0
            for t, d in memory:  # running sum from the step start: its level entering the
                if t > stop:  # phase and its max inside [start, stop]
                    break
                if t >= start:
                    best = max(best, running + d)
                running += d
                if t < start:
                    best = max(0, running)
            phases[phase] = max(phases.get(phase, 0), best)
            if t_peak is not None and start <= t_peak <= stop:
                peak_phase = phase
        if t_peak is not None:
            around = [(start, -(stop - start), name) for start, stop, name in ranges
                      if start <= t_peak <= stop and not name.startswith(_PHASE_PREFIX)
                      and not name.startswith("ProfilerStep")]
            peak_ops = [name for _, _, name in sorted(around)][:6]
        return MemoryReport(str(self.device), "profiler (CPU allocator events)", self._start_bytes, peak, end,
                            phases, peak_phase, peak_ops, len(memory))


def measure_peak(fn, *, device="cpu", alive=()) -> MemoryReport:
    """PeakMemory around fn(tracker) (fn may mark phases with tracker.phase(name))."""
    with PeakMemory(device, alive) as tracker:
        fn(tracker)
    return tracker.report


# ---------------------------------------------------------------------- process RSS
def rss_bytes() -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) of this process in bytes, from /proc/self/status (None elsewhere)."""
    values = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0]) * 1024
    except OSError:
        return None, None
    return values.get("VmRSS"), values.get("VmHWM")


def reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process: Linux,
    `echo 5 > /proc/self/clear_refs`. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """gc, then hand freed heap memory back to the OS (glibc malloc_trim), so that the
    next method's RSS does not start with the previous one's freed blocks."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
