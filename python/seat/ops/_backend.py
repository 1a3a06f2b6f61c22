"""Which implementation of an op runs: reference, cpu (seat._C), triton or cuda (seat._C).

Default by device: CUDA tensors -> triton, else cuda; CPU tensors -> cpu. An op with no
kernel for a backend yet falls through to the next, and finally to the reference. Override
with the environment variable SEAT_BACKEND or, scoped, `seat.ops.use_backend(name)`.
With TRITON_INTERPRET=1, SEAT_BACKEND=triton routes CPU tensors to the Triton kernels
through the interpreter (how Triton kernels are tested without a GPU).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator

import torch

from . import _native

BACKENDS = ("reference", "cpu", "triton", "cuda")
NATIVE_BACKENDS = ("cpu", "cuda")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("seat_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a seat backend; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force `name` for every seat op called inside the block (None: back to default)."""
    if name is not None:
        _check_name(name, "backend")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def requested() -> str | None:
    """The forced backend (use_backend, else $SEAT_BACKEND), or None for the default."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("SEAT_BACKEND", "").strip()
    return _check_name(env, "SEAT_BACKEND") if env else None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); `pip install triton`"
    return None


def unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors on `device` (None when it can).

    For the native backends a missing/stale build is not reported here: it raises
    NativeBuildError on use, so it is never silently skipped."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if kind == "cpu" else f"the cpu backend runs on CPU tensors, these are on {device}"
    if backend == "cuda":
        if kind != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        module, _ = _native._load_cached()
        if module is not None and not module.with_cuda:
            return "seat._C was built without CUDA kernels (no nvcc or a CPU build of torch at build time)"
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return error
        if kind == "cuda" or (kind == "cpu" and triton_interpreting()):
            return None
        if kind == "cpu":
            return "Triton kernels run on CPU tensors only under the interpreter: set TRITON_INTERPRET=1"
        return f"no Triton kernels for {device}"
    raise ValueError(f"unknown backend {backend!r}")


def select(op_name: str, kernels: dict[str, Callable], device: torch.device) -> tuple[str, Callable | None]:
    """(backend, kernel) for op `op_name` on `device`; kernel None means the reference."""
    forced = requested()
    if forced is not None:
        if forced == "reference":
            return "reference", None
        if forced not in kernels:
            raise NotImplementedError(
                f"seat.ops.{op_name} has no {forced} kernel (it has: {', '.join(['reference', *kernels])}); "
                "unset SEAT_BACKEND or choose one of those"
            )
        why = unusable_reason(forced, device)
        if why is not None:
            raise ValueError(f"SEAT_BACKEND={forced} cannot run seat.ops.{op_name}: {why}")
        if forced in NATIVE_BACKENDS:
            _native.load()
        return forced, kernels[forced]
    for backend in _DEFAULT_ORDER.get(device.type, ("reference",)):
        if backend == "reference":
            return "reference", None
        if backend not in kernels or unusable_reason(backend, device) is not None:
            continue
        if backend in NATIVE_BACKENDS:
            _native.load()  # a missing build is an error, not a silent fallback
        return backend, kernels[backend]
    raise RuntimeError(f"seat.ops.{op_name}: no usable backend on {device}")  # pragma: no cover
