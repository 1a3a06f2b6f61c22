"""Triton kernels of the implicit-mask ops: one program per mask block (MASK_BLOCK
elements, the `block` of the mask), walked in tiles of TILE elements. In each tile the
members are recomputed (mix32(key ^ mix32(e)) < threshold, as in
csrc/include/seat/implicit_mask.h) and numbered by a prefix sum, starting at the block's
first slot block_offsets[b]; a running count carries across tiles.

Launch wrappers take tensors already validated by seat.ops.implicit_masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import load_scalars, mix32, update_entries
from .sparse_adamw import _TL_DTYPE, _table

TILE = 1024
# sparse_adamw_implicit_ keeps ~10 live values per element: a smaller tile halves its
# registers per thread (AOT: 150 -> fewer at 4 warps) for better occupancy.
ADAMW_TILE = 512
_AOT_BLOCK = 4096  # the default mask block, what the AOT specs compile
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def tile_members(e, numel, key, threshold):
    """(member, slot offset within the tile, members in the tile) of flat positions e."""
    h = mix32(key ^ mix32(e.to(tl.uint32)))
    member = (e < numel) & (h.to(tl.int64) < threshold)
    count = member.to(tl.int32)
    inclusive = tl.cumsum(count, 0)
    return member, inclusive - count, tl.sum(count, 0)


@triton.jit
def implicit_block_counts_kernel(counts_ptr, numel, key, threshold, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """counts[b] = members of block b."""
    b = tl.program_id(0)
    start = b.to(tl.int64) * MASK_BLOCK
    total = tl.zeros((), dtype=tl.int32)
    for t in tl.range(0, MASK_BLOCK, TILE):
        e = start + t + tl.arange(0, TILE)
        _, _, n = tile_members(e, numel, key.to(tl.uint32), threshold)
        total += n
    tl.store(counts_ptr + b, total)


@triton.jit
def masked_gather_implicit_kernel(out_ptr, dense_ptr, offsets_ptr, numel, key, threshold,
                                  MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """out[slot(e)] += dense[e] for the members e of block program_id(0)."""
    b = tl.program_id(0)
    start = b.to(tl.int64) * MASK_BLOCK
    first = tl.load(offsets_ptr + b)
    limit = tl.load(offsets_ptr + b + 1)  # slots past it belong to the next block: never written
    done = tl.zeros((), dtype=tl.int32)
    for t in tl.range(0, MASK_BLOCK, TILE):
        e = start + t + tl.arange(0, TILE)
        member, within, n = tile_members(e, numel, key.to(tl.uint32), threshold)
        slot = first + done + within
        member = member & (slot < limit)
        value = tl.load(dense_ptr + e, mask=member, other=0.0)
        acc = tl.load(out_ptr + slot, mask=member, other=0.0)
        tl.store(out_ptr + slot, acc + value.to(out_ptr.dtype.element_ty), mask=member)
        done += n


@triton.jit
def masked_swap_implicit_kernel(param_ptr, values_ptr, offsets_ptr, numel, key, threshold,
                                MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """param[e] <-> values[slot(e)] for the members e of block program_id(0) (integer views)."""
    b = tl.program_id(0)
    start = b.to(tl.int64) * MASK_BLOCK
    first = tl.load(offsets_ptr + b)
    limit = tl.load(offsets_ptr + b + 1)
    done = tl.zeros((), dtype=tl.int32)
    for t in tl.range(0, MASK_BLOCK, TILE):
        e = start + t + tl.arange(0, TILE)
        member, within, n = tile_members(e, numel, key.to(tl.uint32), threshold)
        slot = first + done + within
        member = member & (slot < limit)
        held = tl.load(param_ptr + e, mask=member)
        incoming = tl.load(values_ptr + slot, mask=member)
        tl.store(param_ptr + e, incoming, mask=member)
        tl.store(values_ptr + slot, held, mask=member)
        done += n


# table columns (int64): param, block_offsets, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, numel,
# list index, mask key, threshold
N_COLS = 11


@triton.jit
def sparse_adamw_implicit_kernel(table_ptr, scalars_ptr, step_key, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
                                 GRAD_DT: tl.constexpr,
                                 HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                                 STOCHASTIC: tl.constexpr, DENSE_STATE: tl.constexpr, MASK_BLOCK: tl.constexpr,
                                 TILE: tl.constexpr):
    """AdamW on the members of mask block program_id(0) of tensor program_id(1)."""
    row = table_ptr + tl.program_id(1) * 11
    numel = tl.load(row + 7)
    b = tl.program_id(0)
    start = b.to(tl.int64) * MASK_BLOCK
    in_tensor = start < numel  # blocks past this tensor's end (a larger tensor sized the grid)
    offsets = tl.load(row + 1).to(tl.pointer_type(tl.int32))
    first = tl.load(offsets + b, mask=in_tensor, other=0)
    limit = tl.load(offsets + b + 1, mask=in_tensor, other=0)
    param = tl.load(row + 0).to(tl.pointer_type(PARAM_DT))
    grad = tl.load(row + 2).to(tl.pointer_type(GRAD_DT))
    exp_avg = tl.load(row + 3).to(tl.pointer_type(STATE_DT))
    exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(STATE_DT))
    mask_key = tl.load(row + 9).to(tl.uint32)
    threshold = tl.load(row + 10)
    key = mix32(step_key.to(tl.uint32) ^ mix32(tl.load(row + 8).to(tl.uint32)))
    decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt = load_scalars(scalars_ptr, STATE_DT)
    done = tl.zeros((), dtype=tl.int32)
    for t in tl.range(0, MASK_BLOCK, TILE):
        pos = start + t + tl.arange(0, TILE)
        member, within, n = tile_members(pos, numel, mask_key, threshold)
        slot = first + done + within
        live = member & (slot < limit)
        # compact state is indexed like the grads; full-size (dense_state) by position
        at = pos if DENSE_STATE else slot.to(tl.int64)
        update_entries(row, param, grad, exp_avg, exp_avg_sq, pos, at, slot, live, key,
                       decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt, 5, 6, PARAM_DT, STATE_DT,
                       HAS_MASTER, AMSGRAD, MAXIMIZE, STOCHASTIC)
        done += n


def _tile(block: int, tile: int = TILE) -> int:
    return min(tile, block)


def implicit_block_counts_(counts: torch.Tensor, numel: int, key: int, threshold: int, block: int) -> None:
    if counts.numel():
        implicit_block_counts_kernel[(counts.numel(),)](counts, numel, key, threshold, MASK_BLOCK=block,
                                                        TILE=_tile(block))


def masked_gather_implicit_(out, dense, block_offsets, key: int, threshold: int, block: int) -> None:
    if out.numel():
        masked_gather_implicit_kernel[(block_offsets.numel() - 1,)](
            out, dense, block_offsets, dense.numel(), key, threshold, MASK_BLOCK=block, TILE=_tile(block))


def masked_swap_implicit_(param, block_offsets, values, key: int, threshold: int, block: int) -> None:
    if values.numel():
        bits = _BITS_DTYPE[param.element_size()]
        masked_swap_implicit_kernel[(block_offsets.numel() - 1,)](
            param.view(bits), values.view(bits), block_offsets, param.numel(), key, threshold, MASK_BLOCK=block,
            TILE=_tile(block))


def _ptr(t) -> int:
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def sparse_adamw_implicit_(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, keys,
                           thresholds, blocks, scalars, maximize, stochastic_rounding, step_key,
                           dense_state=False) -> None:
    """Launch over validated lists (masters / max_exp_avg_sqs entries empty when absent):
    one launch per (dtypes, master, amsgrad, mask block); each row keeps its list index i,
    which keys stochastic rounding, so the grouping does not change the result."""
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, param in enumerate(params):
        if grads[i].numel() == 0:
            continue
        has_master, amsgrad = masters[i].numel() > 0, max_exp_avg_sqs[i].numel() > 0
        row = (param.data_ptr(), block_offsets[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
               exp_avg_sqs[i].data_ptr(), _ptr(masters[i]), _ptr(max_exp_avg_sqs[i]), param.numel(), i, keys[i],
               thresholds[i])
        groups.setdefault((param.dtype, exp_avgs[i].dtype, grads[i].dtype, has_master, amsgrad, blocks[i]),
                         []).append(row)
    if not groups:
        return
    device = params[0].device
    scalar_tensor = scalars.as_tensor(device)
    for (param_dtype, state_dtype, grad_dtype, has_master, amsgrad, block), rows in groups.items():
        grid = (triton.cdiv(max(r[7] for r in rows), block), len(rows))
        sparse_adamw_implicit_kernel[grid](
            _table(rows, device), scalar_tensor, step_key, PARAM_DT=_TL_DTYPE[param_dtype],
            STATE_DT=_TL_DTYPE[state_dtype], GRAD_DT=_TL_DTYPE[grad_dtype], HAS_MASTER=has_master, AMSGRAD=amsgrad,
            MAXIMIZE=maximize,
            STOCHASTIC=stochastic_rounding and param_dtype == torch.bfloat16, DENSE_STATE=dense_state,
            MASK_BLOCK=block, TILE=_tile(block, ADAMW_TILE))


_MASK_SIG = {"numel": "i64", "key": "i64", "threshold": "i64", "MASK_BLOCK": "constexpr", "TILE": "constexpr"}
_MASK_CONST = {"MASK_BLOCK": _AOT_BLOCK, "TILE": TILE}


def _adamw_spec(param: str, state: str, has_master: bool, amsgrad: bool, stochastic: bool,
                dense: bool = False, grad: str | None = None) -> AotSpec:
    flags = "".join(f for f, on in (("+master", has_master), ("+amsgrad", amsgrad), ("+sr", stochastic),
                                    ("+dense-state", dense), ("+bf16-grad", grad == "bfloat16")) if on)
    return AotSpec(
        f"sparse_adamw_implicit_kernel[{param}/{state}{flags}]", sparse_adamw_implicit_kernel,
        {"table_ptr": "*i64", "scalars_ptr": "*fp64", "step_key": "i64", "PARAM_DT": "constexpr",
         "STATE_DT": "constexpr", "GRAD_DT": "constexpr", "HAS_MASTER": "constexpr", "AMSGRAD": "constexpr",
         "MAXIMIZE": "constexpr",
         "STOCHASTIC": "constexpr", "DENSE_STATE": "constexpr", "MASK_BLOCK": "constexpr", "TILE": "constexpr"},
        {"PARAM_DT": _TL_DTYPE[getattr(torch, param)], "STATE_DT": _TL_DTYPE[getattr(torch, state)],
         "GRAD_DT": _TL_DTYPE[getattr(torch, grad or state)], "HAS_MASTER": has_master, "AMSGRAD": amsgrad,
         "MAXIMIZE": False, "STOCHASTIC": stochastic,
         "DENSE_STATE": dense, **_MASK_CONST, "TILE": ADAMW_TILE})


AOT_SPECS = [
    AotSpec("implicit_block_counts_kernel", implicit_block_counts_kernel,
            {"counts_ptr": "*i32", **_MASK_SIG}, _MASK_CONST),
    *(
        AotSpec(f"masked_gather_implicit_kernel[{src}->fp32]", masked_gather_implicit_kernel,
                {"out_ptr": "*fp32", "dense_ptr": f"*{src}", "offsets_ptr": "*i32", **_MASK_SIG}, _MASK_CONST)
        for src in ("fp32", "fp16", "bf16")
    ),
    *(
        AotSpec(f"masked_swap_implicit_kernel[{bits}]", masked_swap_implicit_kernel,
                {"param_ptr": f"*{bits}", "values_ptr": f"*{bits}", "offsets_ptr": "*i32", **_MASK_SIG}, _MASK_CONST)
        for bits in ("i16", "i32")
    ),
    _adamw_spec("float32", "float32", False, False, False),
    _adamw_spec("bfloat16", "float32", False, False, False),
    _adamw_spec("bfloat16", "float32", False, False, True),
    _adamw_spec("bfloat16", "float32", True, False, False),
    _adamw_spec("float16", "float32", True, True, False),
    _adamw_spec("bfloat16", "float32", True, False, False, dense=True),
    _adamw_spec("bfloat16", "float32", False, False, True, grad="bfloat16"),
    _adamw_spec("bfloat16", "float32", True, False, False, grad="bfloat16"),
]
