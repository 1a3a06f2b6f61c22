"""Loading of the native extension seat._C, with checks that it matches this package.

Nothing here runs at import: `load()` is called on the first use of an op that needs a
native kernel. A missing, mismatched or stale build raises NativeBuildError saying how
to rebuild; the result (module or error) is cached for the process.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path

REBUILD_HINT = (
    "Rebuild it from the source tree with `pip install --no-build-isolation -e .` "
    "(or `make build`); for a non-editable install, `pip install --no-build-isolation .`."
)

# Native kernels seat._C must provide (namespace seat_C); a build without one is stale.
NATIVE_OPS = ("masked_gather_", "masked_swap_", "sparse_adamw_", "paired_rows", "implicit_block_counts_",
              "dequant4_delta_")


class NativeBuildError(RuntimeError):
    """seat._C is missing, was built for another torch or seat version, or is stale."""


def source_tree() -> Path | None:
    """The repository root when seat is imported from a source checkout (editable)."""
    root = Path(__file__).resolve().parents[3]
    if (root / "setup.py").is_file() and (root / "csrc").is_dir() and (root / "python" / "seat").is_dir():
        return root
    return None


def stale_reasons(module) -> list[str]:
    """Why a loaded seat._C does not match this package and torch ([] when it does)."""
    import torch

    from .._version import __version__

    reasons = []
    if getattr(module, "__version__", None) != __version__:
        reasons.append(f"it was built for seat {getattr(module, '__version__', '?')}, this is seat {__version__}")
    if getattr(module, "torch_version", None) != torch.__version__:
        reasons.append(
            f"it was built against torch {getattr(module, 'torch_version', '?')}, "
            f"this process runs torch {torch.__version__}"
        )
    root = source_tree()
    if root is not None:
        from .._srchash import native_source_hash

        current = native_source_hash(root)
        if getattr(module, "source_hash", None) != current:
            reasons.append(f"csrc/ changed since it was built (built {module.source_hash}, now {current})")
    missing = [name for name in NATIVE_OPS if not hasattr(torch.ops.seat_C, name)]
    if missing:
        reasons.append(f"it lacks the native ops {missing}")
    return reasons


@functools.cache
def _load_cached():
    try:
        module = importlib.import_module("seat._C")
    except ImportError as exc:
        return None, NativeBuildError(f"seat._C, the native extension, could not be loaded ({exc}). {REBUILD_HINT}")
    reasons = stale_reasons(module)
    if reasons:
        return None, NativeBuildError("seat._C is stale: " + "; ".join(reasons) + ". " + REBUILD_HINT)
    return module, None


def load():
    """Import seat._C (once) and return it; raise NativeBuildError if it is unusable."""
    module, error = _load_cached()
    if error is not None:
        raise error
    return module


def status() -> tuple[bool, str]:
    """(usable, one-line description) of the native build, for `python -m seat.info`."""
    module, error = _load_cached()
    if error is not None:
        return False, str(error)
    cuda = f"CUDA archs {module.cuda_archs}" if module.with_cuda else "built without CUDA"
    return True, f"seat._C {module.__version__} (sources {module.source_hash}, torch {module.torch_version}, {cuda})"
