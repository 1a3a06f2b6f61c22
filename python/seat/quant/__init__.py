"""QSEAT: SEAT on a frozen bitsandbytes 4-bit base (QLoRA's memory, SEAT's update).

A model loaded with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4" |
"fp4", bnb_4bit_compute_dtype=...)`` holds its decoder's linear layers as
``bitsandbytes.nn.Linear4bit``: a packed uint8 weight (two 4-bit codes per byte) and a
QuantState (absmax per block of ``blocksize`` elements, fp32, or 8-bit with an fp32
second level when double quantization is on). seat.patch turns each such target into a
QuantTarget:

  * the packed weight and its QuantState are never written;
  * a trained ``delta`` Parameter, (nnz,) in the layer's compute dtype, zeros at the
    start, one value per entry of the weight's mask (any mask kind and encoding);
  * the layer's forward (an instance attribute, removed again by revert) computes
    ``x @ (dequant(W) + scatter(delta))^T + bias`` through Dequant4DeltaLinear, which
    keeps no effective weight between forward and backward: backward recomputes it for
    the input gradient and gives ``delta.grad`` as the masked gather of the layer's
    dense weight gradient, both in block-aligned row chunks of at most
    seat._constants.QSEAT_CHUNK_BYTES (seat.quant._chunks): never a whole layer's;
  * the optimizer trains the delta Parameters (SparseAdamW over every entry of each, in
    every lean mode), and ``handle.reference()`` runs the same forward without the
    deltas: the frozen base, exactly, with no swap and no stored original values.

What seat changes on the model while it is patched, and undoes on revert: each target's
forward and ``seat_delta`` parameter, and bitsandbytes' CPU inference repacking, turned
off on every Linear4bit of the model (on a CPU with AVX512-BF16, an eval-mode forward
without gradients would otherwise repack the weights in place and round their absmax to
bfloat16, changing the base).

Nothing here imports bitsandbytes unless the model already did (a model cannot hold a
Linear4bit otherwise).
"""
from __future__ import annotations

import sys

import torch

from ._settings import QuantSettings, is_4bit_linear, refuse_cpu_packed, settings_of
from ._target import QuantTarget, effective_weight

__all__ = ["QuantSettings", "QuantTarget", "effective_weight", "is_4bit_linear", "settings_of", "linear4bit_modules",
           "disable_cpu_repacking", "restore_cpu_repacking"]

_REPACK_FLAG = "support_avx512bf16_for_cpu"  # Linear4bit's switch of its CPU inference repacking


def linear4bit_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every bitsandbytes Linear4bit in `model`; [] without bitsandbytes."""
    if "bitsandbytes" not in sys.modules:
        return []
    return [(n, m) for n, m in model.named_modules() if is_4bit_linear(m)]


def disable_cpu_repacking(model: torch.nn.Module) -> dict[str, object]:
    """Turn off bitsandbytes' in-place CPU repacking on every Linear4bit of `model` (see the
    module docstring) and refuse a model whose weights it already repacked. Returns the
    previous flags ({module name: value}) for restore_cpu_repacking."""
    modules = linear4bit_modules(model)
    for name, module in modules:
        refuse_cpu_packed(f"{name}.weight", module)
    saved = {}
    for name, module in modules:
        saved[name] = module.__dict__.get(_REPACK_FLAG, _MISSING)
        module.__dict__[_REPACK_FLAG] = False
    return saved


def restore_cpu_repacking(model: torch.nn.Module, saved: dict[str, object]) -> None:
    modules = dict(model.named_modules())
    for name, value in saved.items():
        module = modules.get(name)
        if module is None:
            continue
        if value is _MISSING:
            module.__dict__.pop(_REPACK_FLAG, None)
        else:
            module.__dict__[_REPACK_FLAG] = value


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
