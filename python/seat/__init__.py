"""seat: fused kernels and a thin API for memory-efficient SEAT fine-tuning.

`import seat` stays light: it imports neither torch, triton nor transformers and loads no
native code. Names load on first attribute access (`seat.patch`, `seat.ops`, ...), and
the native extension `seat._C` loads on the first call of an op that needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# attribute -> (module, name in it); name None: the attribute is the module itself
_LAZY = {
    "ops": ("seat.ops", None),
    "info": ("seat.info", None),
    "masks": ("seat.masks", None),
    "optim": ("seat.optim", None),
    "memory": ("seat.memory", None),
    "quant": ("seat.quant", None),
    "patch": ("seat.patching", "patch"),
    "SeatConfig": ("seat.config", "SeatConfig"),
    "SeatHandle": ("seat.patching", "SeatHandle"),
    "load_delta": ("seat.delta", "load_delta"),
    "DeltaMismatchError": ("seat.delta", "DeltaMismatchError"),
    "ResumeMismatchError": ("seat.trainer_resume", "ResumeMismatchError"),
    "PairedCollator": ("seat.data", "PairedCollator"),
    "SeatTrainer": ("seat.trainer", "SeatTrainer"),
}

if TYPE_CHECKING:  # pragma: no cover
    from . import info, masks, memory, ops, optim, quant  # noqa: F401
    from .config import SeatConfig  # noqa: F401
    from .data import PairedCollator  # noqa: F401
    from .delta import DeltaMismatchError, load_delta  # noqa: F401
    from .patching import SeatHandle, patch  # noqa: F401
    from .trainer import SeatTrainer  # noqa: F401
    from .trainer_resume import ResumeMismatchError  # noqa: F401

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module 'seat' has no attribute {name!r}")
    module = importlib.import_module(entry[0])
    value = module if entry[1] is None else getattr(module, entry[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
