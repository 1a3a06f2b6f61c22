"""Triton kernels of the sparse-update family (masked_gather_, masked_swap_, sparse_adamw_,
implicit_block_counts_): one kernel per operation, the mask encoding a constexpr ENC.

Encodings (the `encoding` ids of the ops; csrc/include/seat/masks.h is the C++ twin):

  INDEX    mask_index = sorted unique int32 flat indices, one per compact entry
  BLOCK16  mask_index = block_starts (int32, n_blocks + 1: entries before element
           b * 65536), mask_offsets = uint16 per entry (its index minus 65536 * its block)
  HASH     element e is trained iff mix32(key ^ mix32(e)) < threshold; mask_index =
           block_offsets (int32, n_blocks + 1: members before each block of `block`
           elements); mask_ints = (key, threshold, block)
  FULL     every element: position = slot (a compact parameter trained whole);
           mask_index empty

Compact slot j is the j-th entry in increasing position order for every encoding, so
trajectories do not depend on the encoding. `entries` is the one place that decodes a
mask. A program's work item depends on ENC: TILE compact entries for INDEX / BLOCK16 (an
entry's position is looked up), one mask block of MASK_BLOCK elements for HASH (its
members are recomputed tile by tile and numbered by a prefix sum from the block's first
slot, a running count carrying across tiles). The kernels' tile loop therefore runs
MASK_BLOCK // TILE times for HASH and once otherwise.

Bounds: whatever the mask tensors hold, a kernel touches positions in [0, numel) and
slots in [0, nnz) only (an index outside them, a hash block's slots past the next
block's first slot, are skipped), and reads
mask tensors only inside their lengths (the wrappers pass nnz clamped to the entries
the mask tensors hold). A lying mask can make results wrong, never touch other memory.

Launch wrappers take tensors already validated by seat.ops (contiguous, matching sizes
and devices).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import load_scalars, mix32, round_to_param, update_entries

ENCODINGS = {"index": 0, "block16": 1, "hash": 2, "full": 3}  # the ops' encoding ids
INDEX = tl.constexpr(ENCODINGS["index"])
BLOCK16 = tl.constexpr(ENCODINGS["block16"])
HASH = tl.constexpr(ENCODINGS["hash"])
FULL = tl.constexpr(ENCODINGS["full"])

BLOCK16_SIZE = tl.constexpr(65536)
# Binary-search steps of a block16 position: 16 cover the at most 32768 blocks of a
# tensor of < 2**31 elements.
SEARCH_STEPS = tl.constexpr(16)

TILE = 1024
# sparse_adamw_ keeps ~10 live values per element; on a hash mask the prefix sum adds its
# own, and on a block16 mask the per-entry bounds check of a searched position does
# (1024 entries: 72 -> 96 registers on sm_90, 95 -> 146 with amsgrad), so a smaller tile
# there keeps registers per thread (and occupancy) where they were.
ADAMW_SMALL_TILE = 512
_AOT_MASK_BLOCK = 4096  # the default hash block, what the AOT specs compile

# sparse_adamw_'s pointer table: one int64 row per tensor, the same columns for every
# encoding (columns an encoding does not use hold 0).
COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_EXP_AVG = tl.constexpr(2)
COL_EXP_AVG_SQ = tl.constexpr(3)
COL_MASTER = tl.constexpr(4)  # 0 without masters
COL_MAX_EXP_AVG_SQ = tl.constexpr(5)  # 0 without amsgrad
COL_MASK_INDEX = tl.constexpr(6)
COL_MASK_OFFSETS = tl.constexpr(7)  # BLOCK16 only
COL_NUMEL = tl.constexpr(8)
COL_NNZ = tl.constexpr(9)  # compact entries, clamped to what the mask tensors hold
COL_INDEX_LEN = tl.constexpr(10)  # mask_index.numel()
COL_LIST_INDEX = tl.constexpr(11)  # i in the op's lists: keys stochastic rounding
COL_KEY = tl.constexpr(12)  # HASH only
COL_THRESHOLD = tl.constexpr(13)  # HASH only
N_COLS = tl.constexpr(14)

# masked_swap_ moves bits: tensors are viewed as unsigned-width integers of their size.
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


# ----------------------------------------------------------------------------- mask lookup


@triton.jit
def hash_members(pos, numel, key, threshold):
    """Whether flat positions pos (int64) are members of the hash mask (key uint32)."""
    return (pos < numel) & (mix32(key ^ mix32(pos.to(tl.uint32))).to(tl.int64) < threshold)


@triton.jit
def block16_positions(starts_ptr, offsets_ptr, j, live, n_blocks):
    """Flat positions of compact entries j: the largest b < n_blocks with starts[b] <= j,
    times 65536, plus offsets[j] (only in-range starts are read, whatever they hold)."""
    lo = tl.zeros_like(j)
    hi = tl.zeros_like(j) + n_blocks
    for _ in tl.static_range(SEARCH_STEPS):
        active = live & (hi - lo > 1)
        mid = (lo + hi) // 2
        start = tl.load(starts_ptr + mid, mask=active, other=0)
        lo = tl.where(active & (start <= j), mid, lo)
        hi = tl.where(active & (start > j), mid, hi)
    return lo * BLOCK16_SIZE + tl.load(offsets_ptr + j, mask=live, other=0).to(tl.int64)


@triton.jit
def item_slots(ENC: tl.constexpr, index_ptr, item, nnz, index_len):
    """HASH: the first slot of mask block `item` and the limit its slots stay below, in
    [0, nnz] (0 if first < 0: an empty block); unused by the other encodings."""
    if ENC == HASH:
        valid = item + 1 < index_len
        first = tl.load(index_ptr + item, mask=valid, other=0)
        limit = tl.minimum(tl.load(index_ptr + item + 1, mask=valid, other=0), tl.cast(nnz, tl.int32))
        return first, tl.where(first < 0, 0, tl.maximum(limit, 0))
    else:
        return tl.zeros((), tl.int32), tl.zeros((), tl.int32)


@triton.jit
def entries(ENC: tl.constexpr, index_ptr, offsets_ptr, item, tile, first, limit, numel, nnz, index_len, key,
            threshold, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """(position, slot, live, count) of tile `tile` of work item `item`: TILE lanes, each
    a flat position in the parameter and a slot in the compact arrays, valid where live;
    count = HASH members of the tile (the next tile's slots start at first + count).

    INDEX / BLOCK16 / FULL: item = TILE compact entries; a position outside [0, numel)
    is dead (the mask lied; FULL: position = slot).
    HASH: item = mask block (elements item * MASK_BLOCK + tile + lane), members numbered
    from `first`; a slot at or past `limit` is dead."""
    if ENC == HASH:
        pos = item.to(tl.int64) * MASK_BLOCK + tile + tl.arange(0, TILE)
        member = hash_members(pos, numel, key, threshold)
        ones = member.to(tl.int32)
        slot = first + tl.cumsum(ones, 0) - ones
        # unsigned: first >= 0 here (item_slots), so a slot past int32 (a lying first)
        # compares as >= 2**31, never below limit
        return pos, slot, member & (slot.to(tl.uint32) < limit.to(tl.uint32)), tl.sum(ones, 0)
    else:
        slot = item.to(tl.int64) * TILE + tl.arange(0, TILE)
        live = slot < nnz
        if ENC == FULL:
            return slot, slot, live & (slot < numel), 0
        elif ENC == INDEX:
            pos = tl.load(index_ptr + slot, mask=live, other=0)
            return pos, slot, live & (pos >= 0) & (pos < numel), 0
        else:
            # A block16 position is >= 0 by construction; one past the parameter (a mask
            # edited behind torch's back) is skipped, as on every backend.
            pos = block16_positions(index_ptr, offsets_ptr, slot, live, index_len - 1)
            return pos, slot, live & (pos < numel), 0


# ----------------------------------------------------------------------------- kernels


@triton.jit
def masked_gather_kernel(out_ptr, dense_ptr, index_ptr, offsets_ptr, numel, nnz, index_len, key, threshold,
                         ENC: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """out[slot] += dense[position] over the entries, accumulated in out's dtype; a bf16
    out (the lean compact gradient) sums in fp32 and rounds once to nearest-even bf16, by
    hand (round_to_param) so the interpreter and the GPU give the same bits."""
    item = tl.program_id(0)
    first, limit = item_slots(ENC, index_ptr, item, nnz, index_len)
    done = tl.zeros((), tl.int32)
    for tile in range(0, MASK_BLOCK if ENC == HASH else TILE, TILE):
        pos, slot, live, count = entries(ENC, index_ptr, offsets_ptr, item, tile, first + done, limit, numel, nnz,
                                         index_len, tl.cast(key, tl.uint32), threshold, MASK_BLOCK, TILE)
        value = tl.load(dense_ptr + pos, mask=live, other=0.0)
        acc = tl.load(out_ptr + slot, mask=live, other=0.0)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            total = acc.to(tl.float32) + value.to(tl.float32)
            tl.store(out_ptr + slot, round_to_param(total, pos, 0, tl.bfloat16, False), mask=live)
        else:
            tl.store(out_ptr + slot, acc + value.to(out_ptr.dtype.element_ty), mask=live)
        done += count


@triton.jit
def masked_swap_kernel(param_ptr, values_ptr, index_ptr, offsets_ptr, numel, nnz, index_len, key, threshold,
                       ENC: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """param[position] <-> values[slot] over the entries (integer views: bits, not numbers)."""
    item = tl.program_id(0)
    first, limit = item_slots(ENC, index_ptr, item, nnz, index_len)
    done = tl.zeros((), tl.int32)
    for tile in range(0, MASK_BLOCK if ENC == HASH else TILE, TILE):
        pos, slot, live, count = entries(ENC, index_ptr, offsets_ptr, item, tile, first + done, limit, numel, nnz,
                                         index_len, tl.cast(key, tl.uint32), threshold, MASK_BLOCK, TILE)
        held = tl.load(param_ptr + pos, mask=live)
        incoming = tl.load(values_ptr + slot, mask=live)
        tl.store(param_ptr + pos, incoming, mask=live)
        tl.store(values_ptr + slot, held, mask=live)
        done += count


@triton.jit
def sparse_adamw_kernel(table_ptr, scalars_ptr, step_key, ENC: tl.constexpr, PARAM_DT: tl.constexpr,
                        STATE_DT: tl.constexpr, GRAD_DT: tl.constexpr, HAS_MASTER: tl.constexpr,
                        AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, STOCHASTIC: tl.constexpr,
                        DENSE_STATE: tl.constexpr, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """AdamW on work item program_id(0) of tensor program_id(1) of the table; an item past
    its tensor's entries (a larger tensor sized the grid) is dead and moves no data."""
    row = table_ptr + tl.program_id(1) * N_COLS
    item = tl.program_id(0)
    numel = tl.load(row + COL_NUMEL)
    nnz = tl.load(row + COL_NNZ)
    index_len = tl.load(row + COL_INDEX_LEN)
    index = tl.load(row + COL_MASK_INDEX).to(tl.pointer_type(tl.int32))
    offsets = tl.load(row + COL_MASK_OFFSETS).to(tl.pointer_type(tl.uint16))
    mask_key = tl.load(row + COL_KEY).to(tl.uint32)
    threshold = tl.load(row + COL_THRESHOLD)
    param = tl.load(row + COL_PARAM).to(tl.pointer_type(PARAM_DT))
    grad = tl.load(row + COL_GRAD).to(tl.pointer_type(GRAD_DT))
    exp_avg = tl.load(row + COL_EXP_AVG).to(tl.pointer_type(STATE_DT))
    exp_avg_sq = tl.load(row + COL_EXP_AVG_SQ).to(tl.pointer_type(STATE_DT))
    key = mix32(tl.cast(step_key, tl.uint32) ^ mix32(tl.load(row + COL_LIST_INDEX).to(tl.uint32)))
    decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt = load_scalars(scalars_ptr, STATE_DT)
    first, limit = item_slots(ENC, index, item, nnz, index_len)
    done = tl.zeros((), tl.int32)
    for tile in range(0, MASK_BLOCK if ENC == HASH else TILE, TILE):
        pos, slot, live, count = entries(ENC, index, offsets, item, tile, first + done, limit, numel, nnz, index_len,
                                         mask_key, threshold, MASK_BLOCK, TILE)
        # compact state is indexed like the grads; full-size (dense_state) by position
        at = pos if DENSE_STATE else slot
        update_entries(row, param, grad, exp_avg, exp_avg_sq, pos, at, slot, live, key,
                       decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt, COL_MASTER, COL_MAX_EXP_AVG_SQ,
                       PARAM_DT, STATE_DT, HAS_MASTER, AMSGRAD, MAXIMIZE, STOCHASTIC)
        done += count


@triton.jit
def implicit_block_counts_kernel(counts_ptr, numel, key, threshold, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """counts[b] = members of hash-mask block b = program_id(0)."""
    b = tl.program_id(0)
    total = tl.zeros((), tl.int32)
    for tile in range(0, MASK_BLOCK, TILE):
        pos = b.to(tl.int64) * MASK_BLOCK + tile + tl.arange(0, TILE)
        total += tl.sum(hash_members(pos, numel, tl.cast(key, tl.uint32), threshold).to(tl.int32), 0)
    tl.store(counts_ptr + b, total)


# ----------------------------------------------------------------------------- launch


def mask_nnz(encoding: int, compact: int, numel: int, mask_index, mask_offsets) -> int:
    """The entries a kernel may visit: the compact entries, clamped to the entries the mask
    tensors hold (so no lane reads past them), and 0 for an empty parameter."""
    if numel == 0:
        return 0
    if encoding == INDEX.value:
        return min(compact, mask_index.numel())
    if encoding == BLOCK16.value:
        return min(compact, mask_offsets.numel())
    if encoding == FULL.value:
        return min(compact, numel)
    if encoding == HASH.value:
        return compact
    raise ValueError(f"unknown mask encoding {encoding}; expected one of {sorted(ENCODINGS.values())}")


def _mask_launch(encoding: int, compact: int, numel: int, mask_index, mask_offsets, mask_ints, tile: int):
    """(grid, nnz, (key, threshold), MASK_BLOCK, TILE) of one mask (nnz: mask_nnz)."""
    key, threshold, block = (int(v) for v in mask_ints)
    nnz = mask_nnz(encoding, compact, numel, mask_index, mask_offsets)
    if encoding == HASH.value:
        return triton.cdiv(numel, block), nnz, (key, threshold), block, min(tile, block)
    return triton.cdiv(nnz, tile), nnz, (0, 0), 0, tile


def masked_gather_(out, dense, encoding: int, mask_index, mask_offsets, mask_ints) -> None:
    items, nnz, (key, threshold), mask_block, tile = _mask_launch(encoding, out.numel(), dense.numel(), mask_index,
                                                                  mask_offsets, mask_ints, TILE)
    if nnz and items:
        masked_gather_kernel[(items,)](out, dense, mask_index, mask_offsets, dense.numel(), nnz, mask_index.numel(),
                                       key, threshold, ENC=encoding, MASK_BLOCK=mask_block, TILE=tile)


def masked_swap_(param, values, encoding: int, mask_index, mask_offsets, mask_ints) -> None:
    items, nnz, (key, threshold), mask_block, tile = _mask_launch(encoding, values.numel(), param.numel(), mask_index,
                                                                  mask_offsets, mask_ints, TILE)
    if nnz and items:
        bits = _BITS_DTYPE[param.element_size()]
        masked_swap_kernel[(items,)](param.view(bits), values.view(bits), mask_index, mask_offsets, param.numel(), nnz,
                                     mask_index.numel(), key, threshold, ENC=encoding, MASK_BLOCK=mask_block,
                                     TILE=tile)


_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16


def _table(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    """The int64 table of rows on device, cached by its contents (the tensors' addresses),
    so a training loop rebuilds it only if storage moves."""
    key = (device, tuple(rows))
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _TABLE_CACHE[key] = table
        if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    return table


def _ptr(t) -> int:
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, encoding, mask_indices,
                  mask_offsets, mask_ints, scalars, maximize, stochastic_rounding, step_key,
                  dense_state=False) -> None:
    """Launch over validated lists (masters / max_exp_avg_sqs entries empty when absent;
    mask_ints flattened, 3 per param). One launch per (dtypes, master, amsgrad, hash
    block); each row keeps its list index i, which keys stochastic rounding, so the
    grouping does not change the result."""
    groups: dict[tuple, tuple[list, int]] = {}
    for i, param in enumerate(params):
        ints = mask_ints[3 * i:3 * i + 3]
        items, nnz, (key, threshold), mask_block, tile = _mask_launch(
            encoding, grads[i].numel(), param.numel(), mask_indices[i], mask_offsets[i], ints,
            ADAMW_SMALL_TILE if encoding != INDEX.value else TILE)
        if nnz == 0 or items == 0:
            continue
        row = [0] * N_COLS.value
        row[COL_PARAM], row[COL_GRAD] = param.data_ptr(), grads[i].data_ptr()
        row[COL_EXP_AVG], row[COL_EXP_AVG_SQ] = exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr()
        row[COL_MASTER], row[COL_MAX_EXP_AVG_SQ] = _ptr(masters[i]), _ptr(max_exp_avg_sqs[i])
        row[COL_MASK_INDEX], row[COL_MASK_OFFSETS] = _ptr(mask_indices[i]), _ptr(mask_offsets[i])
        row[COL_NUMEL], row[COL_NNZ], row[COL_INDEX_LEN] = param.numel(), nnz, mask_indices[i].numel()
        row[COL_LIST_INDEX], row[COL_KEY], row[COL_THRESHOLD] = i, key, threshold
        group = (param.dtype, exp_avgs[i].dtype, grads[i].dtype, masters[i].numel() > 0,
                 max_exp_avg_sqs[i].numel() > 0, mask_block, tile)
        rows, most = groups.get(group, ([], 0))
        rows.append(tuple(row))
        groups[group] = (rows, max(most, items))
    if not groups:
        return
    device = params[0].device
    scalar_tensor = scalars.as_tensor(device)
    for (param_dtype, state_dtype, grad_dtype, has_master, amsgrad, mask_block, tile), (rows, items) in groups.items():
        sparse_adamw_kernel[(items, len(rows))](
            _table(rows, device), scalar_tensor, step_key, ENC=encoding, PARAM_DT=_TL_DTYPE[param_dtype],
            STATE_DT=_TL_DTYPE[state_dtype], GRAD_DT=_TL_DTYPE[grad_dtype], HAS_MASTER=has_master, AMSGRAD=amsgrad,
            MAXIMIZE=maximize, STOCHASTIC=stochastic_rounding and param_dtype == torch.bfloat16,
            DENSE_STATE=dense_state, MASK_BLOCK=mask_block, TILE=tile)


def implicit_block_counts_(counts, numel: int, key: int, threshold: int, block: int) -> None:
    """counts[b] = members of block b of the hash mask (key, threshold, block) of numel elements."""
    if counts.numel():
        implicit_block_counts_kernel[(counts.numel(),)](counts, numel, key, threshold, MASK_BLOCK=block,
                                                        TILE=min(TILE, block))


# ----------------------------------------------------------------------------- AOT specs

_MASK_SIG = {"index_ptr": "*i32", "offsets_ptr": "*u16", "numel": "i64", "nnz": "i32", "index_len": "i32",
             "key": "i64", "threshold": "i64", "ENC": "constexpr", "MASK_BLOCK": "constexpr", "TILE": "constexpr"}


def _mask_const(enc: int, tile: int = TILE) -> dict:
    return {"ENC": enc, "MASK_BLOCK": _AOT_MASK_BLOCK if enc == HASH.value else 0, "TILE": tile}


def _adamw_spec(enc_name: str, param: str, state: str, has_master: bool, amsgrad: bool, stochastic: bool,
                dense: bool = False, grad: str | None = None) -> AotSpec:
    enc = ENCODINGS[enc_name]
    flags = "".join(f for f, on in (("+master", has_master), ("+amsgrad", amsgrad), ("+sr", stochastic),
                                    ("+dense-state", dense), ("+bf16-grad", grad == "bfloat16")) if on)
    constexprs = {"PARAM_DT": _TL_DTYPE[getattr(torch, param)], "STATE_DT": _TL_DTYPE[getattr(torch, state)],
                  "GRAD_DT": _TL_DTYPE[getattr(torch, grad or state)], "HAS_MASTER": has_master,
                  "AMSGRAD": amsgrad, "MAXIMIZE": False, "STOCHASTIC": stochastic, "DENSE_STATE": dense,
                  **_mask_const(enc, ADAMW_SMALL_TILE if enc != INDEX.value else TILE)}
    return AotSpec(f"sparse_adamw_kernel[{enc_name}:{param}/{state}{flags}]", sparse_adamw_kernel,
                   {"table_ptr": "*i64", "scalars_ptr": "*fp64", "step_key": "i64",
                    **{name: "constexpr" for name in ("ENC", *constexprs)}}, constexprs)


_ADAMW_VARIANTS = (
    ("float32", "float32", False, False, False),
    ("bfloat16", "float32", False, False, False),
    ("bfloat16", "float32", False, False, True),
    ("bfloat16", "float32", True, False, False),
    ("float16", "float32", True, True, False),
    ("bfloat16", "float32", True, False, False, True),
    ("bfloat16", "float32", False, False, True, False, "bfloat16"),
    ("bfloat16", "float32", True, False, False, False, "bfloat16"),
)

AOT_SPECS = [
    AotSpec("implicit_block_counts_kernel", implicit_block_counts_kernel,
            {"counts_ptr": "*i32", "numel": "i64", "key": "i64", "threshold": "i64", "MASK_BLOCK": "constexpr",
             "TILE": "constexpr"}, {"MASK_BLOCK": _AOT_MASK_BLOCK, "TILE": TILE}),
    *(
        AotSpec(f"masked_gather_kernel[{name}:{src}->{dst}]", masked_gather_kernel,
                {"out_ptr": f"*{dst}", "dense_ptr": f"*{src}", **_MASK_SIG}, _mask_const(enc))
        for name, enc in ENCODINGS.items()
        for src, dst in (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp32", "bf16"))
    ),
    *(
        AotSpec(f"masked_swap_kernel[{name}:{bits}]", masked_swap_kernel,
                {"param_ptr": f"*{bits}", "values_ptr": f"*{bits}", **_MASK_SIG}, _mask_const(enc))
        for name, enc in ENCODINGS.items()
        for bits in ("i16", "i32")
    ),
    *(_adamw_spec(name, *variant) for name in ENCODINGS for variant in _ADAMW_VARIANTS),
]
