"""seat: fused kernels and a thin API for memory-efficient SEAT fine-tuning.

`import seat` stays light: it imports neither torch, triton nor transformers and loads no
native code. Submodules load on first attribute access (`seat.ops`, `seat.info`), and the
native extension `seat._C` loads on the first call of an op that needs it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

# attribute -> module that defines it (loaded on first access, PEP 562)
_LAZY_MODULES = {"ops": "seat.ops", "info": "seat.info", "masks": "seat.masks", "optim": "seat.optim"}

if TYPE_CHECKING:  # pragma: no cover
    from . import info, masks, ops, optim  # noqa: F401

__all__ = ["__version__", *_LAZY_MODULES]


def __getattr__(name: str):
    module = _LAZY_MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'seat' has no attribute {name!r}")
    value = importlib.import_module(module)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
