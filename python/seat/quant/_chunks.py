"""A 4-bit weight in row chunks: QSEAT's forward and backward make one chunk of the
effective weight (and of the dense weight gradient) at a time, never a whole layer's.

Output rows [r0, r1) of an (out, in) weight are the flat elements [r0 * in, r1 * in): a
slice of the packed bytes, of absmax and (double quantization) of the nested absmax, when
r0 * in is a multiple of the quantization block (blocksize, times nested_blocksize when
nested: a nested absmax covers nested_blocksize absmax blocks). The delta's entries there
are a slot range [s0, s1) of the mask (Mask.slots_in) at positions Mask.positions_in
relative to the chunk: an int32 mask of the chunk. Each chunk's effective weight is
exactly the rows of the whole one (dequantization is elementwise).
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from .. import _constants
from ..ops.dequant4_delta import Quant4, quant4_of


class RowChunk(NamedTuple):
    """Rows [r0, r1) of a weight: its quantization state and the delta's entries there.

    packed: the chunk's packed bytes (uint8 view). q: its Quant4 (shape (r1 - r0, in)).
    s0, s1: the delta's slots there. positions: (s1 - s0,) int32 positions within the
    chunk (None when no delta is asked for)."""

    r0: int
    r1: int
    packed: Tensor
    q: Quant4
    s0: int
    s1: int
    positions: Tensor | None


def alignment(q: Quant4) -> int:
    """Elements a chunk boundary must be a multiple of (a whole absmax block, and a whole
    nested absmax block when double-quantized)."""
    return q.blocksize * (q.nested_blocksize if q.nested else 1)


def rows_per_chunk(out_features: int, in_features: int, align: int, itemsize: int,
                   budget: int | None = None) -> int:
    """Rows of one chunk: the most whole aligned row groups within `budget` bytes of
    itemsize (default seat._constants.QSEAT_CHUNK_BYTES, read at call time), at least one
    group; all of them when the weight fits."""
    budget = _constants.QSEAT_CHUNK_BYTES if budget is None else budget
    group = align // math.gcd(align, in_features)  # rows whose elements fill whole blocks
    rows = max(group, budget // max(1, in_features * itemsize) // group * group)
    return min(rows, out_features)


def row_chunks(weight: Tensor, quant_state, mask, dtype: torch.dtype, *, with_delta: bool) -> Iterator[RowChunk]:
    """The row chunks of a Linear4bit's packed weight (module docstring), in row order.
    mask: the delta's mask (a seat.masks mask or int32 indices) over the weight's elements;
    its positions are computed only when with_delta."""
    q = quant4_of(quant_state) if not isinstance(quant_state, Quant4) else quant_state
    if len(q.shape) != 2:
        raise ValueError(f"row chunks need a 2-D weight (a Linear4bit's); quant_state.shape is {q.shape}")
    out_features, in_features = q.shape
    packed = weight.data if weight.dtype == torch.uint8 else weight.data.view(torch.uint8)
    packed = packed.reshape(-1)
    m = _as_mask(mask, out_features * in_features) if with_delta else None
    step = max(1, rows_per_chunk(out_features, in_features, alignment(q), torch.empty(0, dtype=dtype).element_size()))
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        lo, hi = r0 * in_features, r1 * in_features
        b0, b1 = lo // q.blocksize, -(-hi // q.blocksize)
        nested = {}
        if q.nested:
            nb = q.nested_blocksize
            nested = dict(nested_absmax=q.nested_absmax[b0 // nb:-(-b1 // nb)])
        part = q._replace(absmax=q.absmax[b0:b1], shape=(r1 - r0, in_features), **nested)
        if m is None:
            s0 = s1 = 0
            positions = None
        else:
            s0, s1 = m.slots_in(lo, hi)
            positions = m.positions_in(lo, hi)
        yield RowChunk(r0, r1, packed[lo // 2:-(-hi // 2)], part, s0, s1, positions)


def n_chunks(quant_state, dtype: torch.dtype) -> int:
    """How many row chunks row_chunks gives for this weight (1 for a weight that is not
    2-D: worked on whole)."""
    q = quant4_of(quant_state) if not isinstance(quant_state, Quant4) else quant_state
    if len(q.shape) != 2:
        return 1
    out_features, in_features = q.shape
    step = rows_per_chunk(out_features, in_features, alignment(q), torch.empty(0, dtype=dtype).element_size())
    return -(-out_features // step) if out_features else 1


def _as_mask(mask, numel: int):
    """The target's mask as a seat.masks Mask (int32 indices were validated when the
    target was made: not again on every forward)."""
    if isinstance(mask, Tensor):
        from ..masks import IndexMask

        return IndexMask(mask, numel, _checked=True)
    return mask
