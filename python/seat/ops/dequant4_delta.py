"""dequant4_delta(packed, quant state, mask, delta, dtype): a bitsandbytes 4-bit weight,
dequantized, with a sparse trained delta added at the mask's entries (QSEAT's effective
weight). The packed weight is only read.

For element i of the weight (flat, i < numel = prod(shape)):

  nib      = packed[i // 2] >> 4 if i is even else packed[i // 2] & 0xF   (bnb's packing:
             the even element in the high nibble)
  scale    = absmax[i // blocksize]                                       (fp32), or with
             double quantization (nested) nested_code[absmax[b]] * nested_absmax[b //
             nested_blocksize] + offset, in fp32 (bnb's dequantize_blockwise + offset)
  out[i]   = dtype(code[nib] * scale)                                     (fp32 product)
  and at each mask entry e:  out[position(e)] = dtype(float(out[position(e)]) + float(delta[slot(e)]))

exactly what ``out = bnb.functional.dequantize_4bit(packed, qs).to(dtype);
out.view(-1).index_add_(0, indices, delta)`` computes (tests/ops/test_dequant4_delta.py
checks every backend against bitsandbytes itself, bit for bit). nf4 / fp4 is data (the
16-entry `code` table), not a code path; nested is a compile-time flag of the kernels.

Arguments of the op (torch.ops.seat.dequant4_delta):
  packed         uint8, contiguous, ceil(numel / 2) elements (any shape: bnb's (n, 1))
  absmax         (ceil(numel / blocksize),) float32; uint8 when nested
  code           (16,) float32: the 4-bit value table (bnb's quant_state.code)
  blocksize      elements per absmax block: 32, 64, ..., 4096 (bnb's choices)
  shape          the weight's shape (quant_state.shape); out has it
  dtype          bfloat16, float16 or float32: out's dtype (and delta's)
  nested_absmax  None, or with double quantization (ceil(n_blocks / nested_blocksize),) float32
  nested_code    None, or (256,) float32 (quant_state.state2.code)
  nested_blocksize, offset   quant_state.state2.blocksize and float(quant_state.offset)
  mask_index, mask_offsets, encoding, mask_ints   a mask in any encoding over numel
                 elements (_encodings.py); None: no delta
  delta          (nnz,) dtype, contiguous: one value per mask entry (slot order); None
                 exactly when the mask is None
Returns a new contiguous tensor of `shape` in `dtype`.

``dequant4_delta(packed, quant_state, mask=None, delta=None, dtype=None)`` is the Python
entry: it unpacks a bitsandbytes QuantState into those arguments.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .._constants import INT32_MAX
from . import _checks, _encodings, _registry
from ._encodings import MaskArgs

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's 4-bit (and blockwise) block sizes
CODE_SIZE, NESTED_CODE_SIZE = 16, 256


class Quant4(NamedTuple):
    """The quantization state as the kernels take it; nested_absmax is None without
    double quantization (then nested_code, nested_blocksize and offset are unused)."""

    absmax: Tensor
    code: Tensor
    blocksize: int
    shape: tuple
    nested_absmax: Optional[Tensor] = None
    nested_code: Optional[Tensor] = None
    nested_blocksize: int = 0
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(shape)


# ----------------------------------------------------------------------------- reference


def scales(q: Quant4) -> Tensor:
    """(n_blocks,) float32: each absmax block's scale (bnb's nested absmax, dequantized)."""
    if not q.nested:
        return q.absmax
    blocks = torch.arange(q.absmax.numel(), device=q.absmax.device) // q.nested_blocksize
    return q.nested_code[q.absmax.long()] * q.nested_absmax[blocks] + torch.tensor(q.offset, dtype=torch.float32)


def reference(packed: Tensor, q: Quant4, mask: Optional[MaskArgs], delta: Optional[Tensor],
              dtype: torch.dtype) -> Tensor:
    """Pure torch, the formula of the module docstring (bnb's own dequantize_4bit compute)."""
    numel = numel_of(q.shape)
    flat = packed.reshape(-1)
    nib = torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1)[:numel].long()
    block = torch.arange(numel, device=packed.device) // q.blocksize
    out = (q.code[nib] * scales(q)[block]).to(dtype)
    if mask is not None:
        pos, slot = _encodings.entries(mask, numel, delta.numel())
        out.index_add_(0, pos, delta[slot])
    return out.reshape(q.shape)


def _native(packed: Tensor, q: Quant4, mask: Optional[MaskArgs], delta: Optional[Tensor],
            dtype: torch.dtype) -> Tensor:
    mask = mask if mask is not None else _no_mask(packed.device)
    delta = delta if delta is not None else torch.empty(0, dtype=dtype, device=packed.device)
    out = torch.empty(q.shape, dtype=dtype, device=packed.device)
    torch.ops.seat_C.dequant4_delta_(out, packed, q.absmax, q.code, q.blocksize, q.nested_absmax, q.nested_code,
                                     q.nested_blocksize, float(q.offset), delta, mask.encoding, mask.index,
                                     mask.offsets, list(mask.ints))
    return out


def _triton(packed: Tensor, q: Quant4, mask: Optional[MaskArgs], delta: Optional[Tensor],
            dtype: torch.dtype) -> Tensor:
    from seat_kernels.dequant4 import dequant4_delta_

    mask = mask if mask is not None else _no_mask(packed.device)
    delta = delta if delta is not None else torch.empty(0, dtype=dtype, device=packed.device)
    out = torch.empty(q.shape, dtype=dtype, device=packed.device)
    dequant4_delta_(out, packed, q, delta, mask.encoding, mask.index, mask.offsets, list(mask.ints))
    return out


def _no_mask(device) -> MaskArgs:
    return MaskArgs(_encodings.INDEX, torch.empty(0, dtype=torch.int32, device=device),
                    _encodings.no_offsets(device), _encodings.NO_INTS)


ENTRY = _registry.register("dequant4_delta", reference, {"cpu": _native, "cuda": _native, "triton": _triton})


# ----------------------------------------------------------------------------- validation


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    return value


def check(packed, q: Quant4, mask: Optional[MaskArgs], delta, dtype, *, values: bool = True) -> int:
    """Validate every argument (before any kernel runs); returns numel."""
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32 (the dequantized weight's); got {dtype}")
    if not isinstance(q.shape, tuple) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                 for s in q.shape):
        raise ValueError(f"shape must be a sequence of non-negative ints (quant_state.shape); got {q.shape!r}")
    numel = numel_of(q.shape)
    if numel > INT32_MAX:
        raise ValueError(f"shape {q.shape} has {numel} elements; dequant4_delta handles at most 2**31-1")
    _checks.tensor("packed", packed, dtypes=(torch.uint8,))
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must hold ceil(numel / 2) = {(numel + 1) // 2} bytes (two 4-bit values each) for "
                         f"shape {q.shape}; got {packed.numel()}: pass the Linear4bit's weight with its own "
                         "quant_state")
    blocksize = _int("blocksize", q.blocksize)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes); got {blocksize}")
    n_blocks = _encodings.n_blocks(numel, blocksize)
    _checks.tensor("absmax", q.absmax, dtypes=(torch.uint8,) if q.nested else (torch.float32,), ndim=1)
    if q.absmax.numel() != n_blocks:
        raise ValueError(f"absmax must have ceil(numel / blocksize) = {n_blocks} entries for shape {q.shape} and "
                         f"blocksize {blocksize}; got {q.absmax.numel()} (a quant_state of another weight?)")
    _checks.tensor("code", q.code, dtypes=(torch.float32,), ndim=1)
    if q.code.numel() != CODE_SIZE:
        raise ValueError(f"code must be the {CODE_SIZE}-entry 4-bit table (quant_state.code); got "
                         f"{q.code.numel()} entries")
    if q.nested:
        nested_blocksize = _int("nested_blocksize", q.nested_blocksize)
        if nested_blocksize not in BLOCKSIZES:
            raise ValueError(f"nested_blocksize must be one of {BLOCKSIZES} (quant_state.state2.blocksize); got "
                             f"{nested_blocksize}")
        _checks.tensor("nested_absmax", q.nested_absmax, dtypes=(torch.float32,), ndim=1)
        expected = _encodings.n_blocks(n_blocks, nested_blocksize)
        if q.nested_absmax.numel() != expected:
            raise ValueError(f"nested_absmax must have ceil(absmax.numel() / nested_blocksize) = {expected} entries; "
                             f"got {q.nested_absmax.numel()} (quant_state.state2.absmax)")
        if not isinstance(q.nested_code, Tensor):
            raise TypeError("nested_code must be a torch.Tensor (quant_state.state2.code) when nested_absmax is "
                            f"given; got {type(q.nested_code).__name__}")
        _checks.tensor("nested_code", q.nested_code, dtypes=(torch.float32,), ndim=1)
        if q.nested_code.numel() != NESTED_CODE_SIZE:
            raise ValueError(f"nested_code must be the {NESTED_CODE_SIZE}-entry 8-bit table "
                             f"(quant_state.state2.code); got {q.nested_code.numel()} entries")
        if not isinstance(q.offset, (int, float)) or isinstance(q.offset, bool) or not math.isfinite(q.offset):
            raise ValueError(f"offset must be a finite float (quant_state.offset); got {q.offset!r}")
    elif q.nested_code is not None:
        raise ValueError("nested_code was given without nested_absmax: pass both (double quantization) or neither")
    if (mask is None) != (delta is None):
        raise ValueError("mask and delta go together: pass both (a delta of one value per mask entry) or neither "
                         f"(got mask={'None' if mask is None else 'a mask'}, "
                         f"delta={'None' if delta is None else 'a tensor'})")
    device_args = dict(packed=packed, absmax=q.absmax, code=q.code, nested_absmax=q.nested_absmax,
                       nested_code=q.nested_code)
    if mask is not None:
        _checks.tensor("delta", delta, ndim=1)
        if delta.dtype != dtype:
            raise TypeError(f"delta must have the output dtype {dtype}; got {delta.dtype} (pass delta.to({dtype}))")
        _encodings.check("mask", mask, numel, "delta", delta, values=values)
        device_args.update(mask=mask.index, mask_offsets=mask.offsets, delta=delta)
    _checks.same_device(**device_args)
    return numel


# ----------------------------------------------------------------------------- the op


def _quant4(absmax, code, blocksize, shape, nested_absmax, nested_code, nested_blocksize, offset) -> Quant4:
    return Quant4(absmax, code, blocksize, tuple(shape), nested_absmax, nested_code, nested_blocksize, offset)


def _mask(mask_index, mask_offsets, encoding, mask_ints) -> Optional[MaskArgs]:
    return None if mask_index is None else _encodings.from_op_args(mask_index, mask_offsets, encoding, mask_ints)


@torch.library.custom_op("seat::dequant4_delta", mutates_args=())
def _dequant4_delta_op(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: List[int],
                       dtype: torch.dtype, nested_absmax: Optional[Tensor] = None,
                       nested_code: Optional[Tensor] = None, nested_blocksize: int = 0, offset: float = 0.0,
                       mask_index: Optional[Tensor] = None, delta: Optional[Tensor] = None,
                       mask_offsets: Optional[Tensor] = None, encoding: int = _encodings.INDEX,
                       mask_ints: Optional[List[int]] = None) -> Tensor:
    q = _quant4(absmax, code, blocksize, shape, nested_absmax, nested_code, nested_blocksize, offset)
    mask = _mask(mask_index, mask_offsets, encoding, mask_ints)
    check(packed, q, mask, delta, dtype)
    return ENTRY.run(packed.device, packed, q, mask, delta, dtype)


@_dequant4_delta_op.register_fake
def _(packed, absmax, code, blocksize, shape, dtype, nested_absmax=None, nested_code=None, nested_blocksize=0,
      offset=0.0, mask_index=None, delta=None, mask_offsets=None, encoding=_encodings.INDEX, mask_ints=None):
    q = _quant4(absmax, code, blocksize, shape, nested_absmax, nested_code, nested_blocksize, offset)
    check(packed, q, _mask(mask_index, mask_offsets, encoding, mask_ints), delta, dtype, values=False)
    return packed.new_empty(tuple(shape), dtype=dtype)


def quant4_of(quant_state) -> Quant4:
    """A bitsandbytes QuantState (4-bit, nested or not) as a Quant4 of tensors and ints."""
    for attr in ("absmax", "code", "blocksize", "shape"):
        if not hasattr(quant_state, attr):
            raise TypeError(f"quant_state must be a bitsandbytes QuantState (the weight's .quant_state); "
                            f"{type(quant_state).__name__} has no {attr!r}")
    shape = tuple(int(s) for s in quant_state.shape)
    if getattr(quant_state, "nested", False):
        state2 = quant_state.state2
        offset = quant_state.offset
        offset = float(offset.item() if isinstance(offset, Tensor) else offset)
        return Quant4(quant_state.absmax, quant_state.code, quant_state.blocksize, shape, state2.absmax, state2.code,
                      state2.blocksize, offset)
    return Quant4(quant_state.absmax, quant_state.code, quant_state.blocksize, shape)


def dequant4_delta(packed: Tensor, quant_state, mask=None, delta: Optional[Tensor] = None, *,
                   dtype: Optional[torch.dtype] = None) -> Tensor:
    """dequantize_4bit(packed, quant_state).to(dtype) with delta added at the mask's entries.

    Args:
        packed: the Linear4bit's packed weight (``weight.data``; uint8, or a quant_storage
            dtype viewed as uint8).
        quant_state: its bitsandbytes QuantState (nf4 or fp4, double-quantized or not),
            or a Quant4.
        mask: None, int32 sorted flat indices, or a seat.masks mask over the weight's
            elements.
        delta: None (with mask None), else (nnz,) in `dtype`.
        dtype: the output dtype (default quant_state.dtype): bfloat16, float16 or float32.
    Returns: (quant_state.shape) tensor in dtype. See the module docstring.
    """
    q = quant_state if isinstance(quant_state, Quant4) else quant4_of(quant_state)
    if dtype is None:
        dtype = getattr(quant_state, "dtype", None)
        if dtype is None:
            raise TypeError("dtype is required when quant_state has no dtype")
    if isinstance(packed, Tensor) and packed.dtype != torch.uint8 and packed.is_contiguous():
        packed = packed.view(torch.uint8)  # bnb's quant_storage: bytes held in another dtype
    numel = numel_of(q.shape) if isinstance(q.shape, tuple) else None
    args = None if mask is None else _encodings.as_mask_args("mask", mask, numel)
    check(packed, q, args, delta, dtype, values=False)  # type errors before the dispatcher sees the call
    if args is None:
        return torch.ops.seat.dequant4_delta(packed, q.absmax, q.code, q.blocksize, list(q.shape), dtype,
                                             q.nested_absmax, q.nested_code, q.nested_blocksize, float(q.offset))
    return torch.ops.seat.dequant4_delta(packed, q.absmax, q.code, q.blocksize, list(q.shape), dtype,
                                         q.nested_absmax, q.nested_code, q.nested_blocksize, float(q.offset),
                                         args.index, delta, args.offsets, args.encoding, list(args.ints))
