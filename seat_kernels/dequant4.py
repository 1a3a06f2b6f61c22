"""Triton kernel of dequant4_delta: a bitsandbytes 4-bit weight dequantized, with a sparse
delta added at a mask's entries, in one pass (seat/dequant4.h and
python/seat/ops/dequant4_delta.py give the formula; the reference is the oracle).

One program per tile of TILE output elements (HASH: per mask block of MASK_BLOCK
elements, in tiles, a running member count carrying the slots across them). Each lane
dequantizes its element (nibble: the high one for an even element, bnb's layout; the fp32
product code[nibble] * scale, rounded once to the output dtype) and, if its position is
a mask entry, adds that entry's delta before the tile is stored:

  INDEX    the tile's slots [lo, hi) by two scalar binary searches of the sorted indices,
           then per lane a binary search of its position among them (log2(TILE) steps)
  BLOCK16  the same inside the tile's 65536-element block (block_starts, then offsets)
  HASH     members recomputed and numbered by a prefix sum from the block's first slot
  FULL     slot = position

NESTED (double quantization) is a constexpr: scale = nested_code[absmax[b]] *
nested_absmax[b // nested_blocksize] + offset. Launched with enable_fp_fusion=False: a
product followed by an add must round twice, as bitsandbytes computes it, not fuse into
one FMA. bf16 is rounded by hand (round_to_param: the interpreter truncates on .to()).

Bounds: lanes read packed, absmax and the tables only for positions < numel, the mask
tensors only inside their lengths, delta only at slots < nnz (clamped by the wrapper to
what the mask tensors hold); a lying mask can give a wrong sum, never touch other memory.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import round_to_param
from .sparse_update import BLOCK16, BLOCK16_SIZE, ENCODINGS, FULL, HASH, INDEX, hash_members, item_slots, mask_nnz

TILE = 1024
# binary-search steps: per lane over at most TILE slots (log2(TILE) + 1); of a tile's
# bounds among int32 indices (up to 2**31 entries) and among a block16 block's offsets
# (up to 65536 entries)
TILE_SEARCH = tl.constexpr(11)
INDEX_SEARCH = tl.constexpr(32)
OFFSET_SEARCH = tl.constexpr(17)
_AOT_MASK_BLOCK = 4096


@triton.jit
def _lower_bound(ptr, lo, hi, value, STEPS: tl.constexpr):
    """Scalar: the first j in [lo, hi) with ptr[j] >= value (hi if none); reads inside
    [lo, hi) only."""
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        key = tl.load(ptr + mid, mask=active, other=0).to(tl.int64)
        go_right = active & (key < value)
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(active & (key >= value), mid, hi)
    return lo


@triton.jit
def _lane_slots(ptr, lo, hi, target, live, base):
    """Per lane: the slot j in [lo, hi) with base + ptr[j] == target, and whether one
    exists (ptr sorted over [lo, hi), hi - lo <= TILE)."""
    a = tl.zeros_like(target) + lo
    b = tl.zeros_like(target) + hi
    for _ in tl.static_range(TILE_SEARCH):
        active = live & (a < b)
        mid = a + (b - a) // 2
        key = base + tl.load(ptr + mid, mask=active, other=0).to(tl.int64)
        a = tl.where(active & (key < target), mid + 1, a)
        b = tl.where(active & (key >= target), mid, b)
    found = live & (a < hi)
    key = base + tl.load(ptr + a, mask=found, other=0).to(tl.int64)
    return a, found & (key == target)


@triton.jit
def dequant4_delta_kernel(out_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, delta_ptr,
                          index_ptr, offsets_ptr, numel, nnz, index_len, key, threshold, blocksize,
                          nested_blocksize, offset, ENC: tl.constexpr, NESTED: tl.constexpr,
                          MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    item = tl.program_id(0)
    first, limit = item_slots(ENC, index_ptr, item, nnz, index_len)
    done = tl.zeros((), tl.int32)
    for tile in range(0, MASK_BLOCK if ENC == HASH else TILE, TILE):
        if ENC == HASH:
            begin = item.to(tl.int64) * MASK_BLOCK + tile
        else:
            begin = item.to(tl.int64) * TILE
        pos = begin + tl.arange(0, TILE)
        valid = pos < numel
        byte = tl.load(packed_ptr + pos // 2, mask=valid, other=0).to(tl.int32)
        nib = tl.where(pos % 2 == 0, byte >> 4, byte & 0xF)
        value = tl.load(code_ptr + nib, mask=valid, other=0.0)
        block = pos // blocksize
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
            scale = (tl.load(nested_code_ptr + q, mask=valid, other=0.0)
                     * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=valid, other=0.0)) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=valid, other=0.0)
        value = value * scale
        out_ty = out_ptr.dtype.element_ty
        dequant = round_to_param(value, pos, 0, out_ty, False)
        # the lanes that are mask entries, and their slots
        if ENC == HASH:
            member = hash_members(pos, numel, tl.cast(key, tl.uint32), threshold)
            ones = member.to(tl.int32)
            slot = (first + done + tl.cumsum(ones, 0) - ones).to(tl.int64)
            hit = member & (slot.to(tl.uint32) < limit.to(tl.uint32))
            done += tl.sum(ones, 0)
        elif ENC == FULL:
            slot = pos
            hit = valid & (pos < nnz)
        elif ENC == INDEX:
            end = tl.minimum(begin + TILE, numel)
            lo = _lower_bound(index_ptr, tl.zeros((), tl.int64), tl.cast(nnz, tl.int64), begin, INDEX_SEARCH)
            hi = _lower_bound(index_ptr, lo, tl.cast(nnz, tl.int64), end, INDEX_SEARCH)
            slot, hit = _lane_slots(index_ptr, lo, hi, pos, valid, 0)
        else:
            b16 = begin // BLOCK16_SIZE
            inside = b16 + 1 < index_len
            first16 = tl.maximum(tl.load(index_ptr + b16, mask=inside, other=0).to(tl.int64), 0)
            last16 = tl.minimum(tl.load(index_ptr + b16 + 1, mask=inside, other=0).to(tl.int64), tl.cast(nnz, tl.int64))
            last16 = tl.maximum(last16, first16)
            base = b16 * BLOCK16_SIZE
            end = tl.minimum(begin + TILE, numel)
            lo = _lower_bound(offsets_ptr, first16, last16, begin - base, OFFSET_SEARCH)
            hi = _lower_bound(offsets_ptr, lo, last16, end - base, OFFSET_SEARCH)
            slot, hit = _lane_slots(offsets_ptr, lo, hi, pos, valid, base)
        delta = tl.load(delta_ptr + slot, mask=hit, other=0.0)
        summed = round_to_param(dequant.to(tl.float32) + delta.to(tl.float32), pos, 0, out_ty, False)
        tl.store(out_ptr + pos, tl.where(hit, summed, dequant), mask=valid)


# ----------------------------------------------------------------------------- launch


def dequant4_delta_(out, packed, q, delta, encoding: int, mask_index, mask_offsets, mask_ints) -> None:
    """out (q.shape, dtype) = the dequantized weight + delta at the mask's entries (inputs
    validated by seat.ops)."""
    numel = out.numel()
    if numel == 0:
        return
    key, threshold, block = (int(v) for v in mask_ints)
    nnz = mask_nnz(encoding, delta.numel(), numel, mask_index, mask_offsets)
    if encoding == HASH.value:
        tile, mask_block, grid = min(TILE, block), block, triton.cdiv(numel, block)
    else:
        tile, mask_block, grid = TILE, 0, triton.cdiv(numel, TILE)
    nested = q.nested_absmax is not None
    dequant4_delta_kernel[(grid,)](
        out, packed, q.absmax, q.code, q.nested_absmax if nested else q.code, q.nested_code if nested else q.code,
        delta, mask_index, mask_offsets, numel, nnz, mask_index.numel(), key, threshold, q.blocksize,
        q.nested_blocksize if nested else 1, float(q.offset), ENC=encoding, NESTED=nested, MASK_BLOCK=mask_block,
        TILE=tile, enable_fp_fusion=False)


# ----------------------------------------------------------------------------- AOT specs


def _spec(enc_name: str, out: str, nested: bool) -> AotSpec:
    enc = ENCODINGS[enc_name]
    signature = {"out_ptr": f"*{out}", "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                 "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                 "delta_ptr": f"*{out}", "index_ptr": "*i32", "offsets_ptr": "*u16", "numel": "i64", "nnz": "i32",
                 "index_len": "i32", "key": "i64", "threshold": "i64", "blocksize": "i32", "nested_blocksize": "i32",
                 "offset": "fp32", "ENC": "constexpr", "NESTED": "constexpr", "MASK_BLOCK": "constexpr",
                 "TILE": "constexpr"}
    constexprs = {"ENC": enc, "NESTED": nested, "MASK_BLOCK": _AOT_MASK_BLOCK if enc == HASH.value else 0,
                  "TILE": TILE}
    return AotSpec(f"dequant4_delta_kernel[{enc_name}:{out}{'+nested' if nested else ''}]", dequant4_delta_kernel,
                   signature, constexprs, options={"enable_fp_fusion": False})


AOT_SPECS = [_spec(name, out, nested) for name in ENCODINGS for out in ("bf16", "fp16", "fp32")
             for nested in (False, True)]
