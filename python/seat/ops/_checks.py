"""Input validation shared by the ops: every op checks before any kernel runs.

Errors name the argument and say what to do: TypeError for a wrong type or dtype,
ValueError for a wrong shape, device, layout or value.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._constants import INT32_MAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ACCUM_DTYPES = (torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")

# idx tensors whose values were already checked, keyed weakly by identity, with the
# tensor version and the bound they were checked against: a mask is checked once, not
# on every optimizer step, and re-checked if it is modified in place.
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


def index_values(name: str, idx: torch.Tensor, bound: int) -> None:
    """idx values sorted, unique and in [0, bound). Data-dependent (one pass, and a host
    sync on GPU), so a tensor is checked once per in-place version and then remembered."""
    if idx.numel() == 0 or is_fake(idx):
        return
    seen = _checked_indices.get(idx)
    if seen is not None and seen == (idx._version, bound):
        return
    lo, hi = int(idx[0]), int(idx[-1])
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{name} must be sorted and unique (strictly increasing); use torch.unique(sorted=True)")
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {bound}) for a tensor of {bound} elements")
    _checked_indices[idx] = (idx._version, bound)


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
