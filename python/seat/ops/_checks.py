"""Input validation shared by the ops: every op checks before any kernel runs.

Errors name the argument and say what to do: TypeError for a wrong type or dtype,
ValueError for a wrong shape, device, layout or value.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._constants import INT32_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACCUM_DTYPES = (torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

# Non-CPU idx tensors whose values were already checked (checking them costs a copy to
# the host), keyed weakly by identity, with the tensor version and the bound they were
# checked against. Only a fast path to a clear error: a write torch does not see (through
# .numpy(), .data, DLPack) leaves the version as it was, and then the kernels' own bounds
# (an index outside the tensor is skipped) are what keeps memory safe. CPU indices are
# checked on every call (one vectorized pass, ~1% of a gather), so on CPU no write slips
# past.
_checked_indices: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(
    name: str,
    t,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; pass {name}.contiguous() (kernels index its flat storage)")
    return t


def same_device(**named: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    items = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; move them to the same device"
            )
    return first.device


def same_numel(compact_name: str, compact: torch.Tensor, idx_name: str, idx: torch.Tensor) -> None:
    if compact.dim() != 1 or compact.numel() != idx.numel():
        raise ValueError(
            f"{compact_name} must be 1-D with one entry per index ({idx_name} has {idx.numel()}); "
            f"got shape {tuple(compact.shape)}"
        )


def index_tensor(name: str, idx, bound: int) -> torch.Tensor:
    """idx: 1-D contiguous int32 (layout only; values are checked by index_values)."""
    tensor(name, idx, dtypes=(torch.int32,), ndim=1)
    if bound > INT32_MAX:
        raise ValueError(f"{name} indexes a tensor of {bound} elements; int32 indices reach at most 2**31-1")
    return idx


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return t.device.type == "meta" or _is_fake(t)


def host_values(t: torch.Tensor) -> np.ndarray:
    """t's values as a numpy array: a view of a CPU tensor, a copy of any other."""
    if t.device.type == "cpu" and not t.requires_grad:
        return t.numpy()  # no intermediate tensors: this runs for every mask of every step
    return t.detach().cpu().numpy()


def checked_every_call(t: torch.Tensor) -> bool:
    """Whether the values of mask tensor t are checked on every call (CPU: cheap) rather
    than once per in-place version (elsewhere: a copy to the host and a sync)."""
    return t.device.type == "cpu"


def index_values(name: str, idx: torch.Tensor, bound: int) -> None:
    """idx values sorted, unique and in [0, bound). One pass over idx: on every call for
    a CPU idx, once per in-place version elsewhere (see _checked_indices)."""
    if idx.numel() == 0 or is_fake(idx):
        return
    every_call = checked_every_call(idx)
    if not every_call and _checked_indices.get(idx) == (idx._version, bound):
        return
    values = host_values(idx)
    lo, hi = int(values[0]), int(values[-1])
    if values.size > 1 and not bool((values[1:] > values[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique (strictly increasing); use torch.unique(sorted=True)")
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {bound}) for a tensor of {bound} elements")
    if not every_call:
        _checked_indices[idx] = (idx._version, bound)


def no_aliasing(named: Iterable[tuple[str, torch.Tensor | None, bool]]) -> None:
    """Refuse arguments whose memory overlaps where at least one of the two is written.

    named: (argument name, tensor or None, written by the op) of real (not fake or meta)
    contiguous tensors, so a tensor's memory is one byte range; empty ones hold none. A
    sweep per device over the ranges sorted by start: O(n log n) for the long lists of
    sparse_adamw_. An op writing memory it also reads through another argument would give
    a result that depends on the order a backend visits entries: refused on every backend.
    """
    by_device: dict = {}
    for name, t, written in named:
        if t is not None and t.numel():
            start = t.data_ptr()
            by_device.setdefault(t.device, []).append((start, start + t.numel() * t.element_size(), name, written))
    for spans in by_device.values():
        spans.sort(key=lambda s: s[0])
        reach_any = reach_written = (0, "")  # (end, name) of the furthest-reaching span so far
        for start, end, name, written in spans:
            for reach in (reach_any, reach_written) if written else (reach_written,):
                if reach[0] > start:
                    raise ValueError(f"{reach[1]} and {name} share memory, and the op writes "
                                     f"{name if written else reach[1]}: pass separate tensors "
                                     f"(e.g. {name}.clone())")
            if end > reach_any[0]:
                reach_any = (end, name)
            if written and end > reach_written[0]:
                reach_written = (end, name)


def choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def contiguous(*tensors):
    """Contiguous copies of the tensors that need one (non-tensors pass through to be
    rejected by the checks). For loss inputs only: mutated arguments must already be
    contiguous, since a copy would not carry the result back."""
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in tensors)
