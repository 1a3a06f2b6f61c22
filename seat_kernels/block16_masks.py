"""Triton kernels of the block16-mask ops: one program per BLOCK compact entries, each
entry's flat position decoded as b * 65536 + offsets[j], where b (its block) is found by a
binary search of block_starts (as csrc/include/seat/block16.h; SEARCH_STEPS = 16 covers
the at most 32768 blocks of a tensor of < 2**31 elements).

Launch wrappers take tensors already validated by seat.ops.block16_masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import load_scalars, mix32, update_entries
from .sparse_adamw import _TL_DTYPE, _table

BLOCK = 1024
BLOCK16 = 65536
SEARCH_STEPS = 16
_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def block16_positions(starts_ptr, offsets_ptr, j, live, n_blocks, SEARCH_STEPS: tl.constexpr):
    """Flat positions of compact entries j (int64): the largest b with starts[b] <= j, times
    65536, plus offsets[j]."""
    lo = tl.zeros_like(j)
    hi = tl.zeros_like(j) + n_blocks
    for _ in tl.static_range(SEARCH_STEPS):
        active = live & (hi - lo > 1)
        mid = (lo + hi) // 2
        start = tl.load(starts_ptr + mid, mask=active, other=0)
        lo = tl.where(active & (start <= j), mid, lo)
        hi = tl.where(active & (start > j), mid, hi)
    offset = tl.load(offsets_ptr + j, mask=live, other=0)
    return lo * 65536 + offset.to(tl.int64)


@triton.jit
def masked_gather_block16_kernel(out_ptr, dense_ptr, starts_ptr, offsets_ptr, nnz, n_blocks,
                                 SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """out[j] += dense[position(j)] for j < nnz, accumulated in out's dtype."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = j < nnz
    pos = block16_positions(starts_ptr, offsets_ptr, j, live, n_blocks, SEARCH_STEPS)
    value = tl.load(dense_ptr + pos, mask=live, other=0.0)
    acc = tl.load(out_ptr + j, mask=live, other=0.0)
    tl.store(out_ptr + j, acc + value.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def masked_swap_block16_kernel(param_ptr, values_ptr, starts_ptr, offsets_ptr, nnz, n_blocks,
                               SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """param[position(j)] <-> values[j] for j < nnz (integer views: bits, not numbers)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = j < nnz
    pos = block16_positions(starts_ptr, offsets_ptr, j, live, n_blocks, SEARCH_STEPS)
    held = tl.load(param_ptr + pos, mask=live)
    incoming = tl.load(values_ptr + j, mask=live)
    tl.store(param_ptr + pos, incoming, mask=live)
    tl.store(values_ptr + j, held, mask=live)


# table columns (int64): param, block_starts, offsets, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, nnz,
# list index, n_blocks
N_COLS = 11


@triton.jit
def sparse_adamw_block16_kernel(table_ptr, scalars_ptr, step_key, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
                                GRAD_DT: tl.constexpr,
                                HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                                STOCHASTIC: tl.constexpr, DENSE_STATE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                                BLOCK: tl.constexpr):
    row = table_ptr + tl.program_id(1) * 11
    nnz = tl.load(row + 8)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < nnz
    param = tl.load(row + 0).to(tl.pointer_type(PARAM_DT))
    starts = tl.load(row + 1).to(tl.pointer_type(tl.int32))
    offsets = tl.load(row + 2).to(tl.pointer_type(tl.uint16))
    grad = tl.load(row + 3).to(tl.pointer_type(GRAD_DT))
    exp_avg = tl.load(row + 4).to(tl.pointer_type(STATE_DT))
    exp_avg_sq = tl.load(row + 5).to(tl.pointer_type(STATE_DT))
    decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt = load_scalars(scalars_ptr, STATE_DT)

    pos = block16_positions(starts, offsets, offs, live, tl.load(row + 10), SEARCH_STEPS)
    # compact state is indexed like the grads; full-size (dense-mask mode) by position
    at = pos if DENSE_STATE else offs
    key = mix32(step_key.to(tl.uint32) ^ mix32(tl.load(row + 9).to(tl.uint32)))
    update_entries(row, param, grad, exp_avg, exp_avg_sq, pos, at, offs, live, key,
                   decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt, 6, 7, PARAM_DT, STATE_DT,
                   HAS_MASTER, AMSGRAD, MAXIMIZE, STOCHASTIC)


def _grid(nnz: int):
    return (triton.cdiv(nnz, BLOCK),)


def masked_gather_block16_(out, dense, block_starts, offsets) -> None:
    nnz = offsets.numel()
    if nnz:
        masked_gather_block16_kernel[_grid(nnz)](out, dense, block_starts, offsets, nnz, block_starts.numel() - 1,
                                                 SEARCH_STEPS=SEARCH_STEPS, BLOCK=BLOCK)


def masked_swap_block16_(param, block_starts, offsets, values) -> None:
    nnz = offsets.numel()
    if nnz:
        bits = _BITS_DTYPE[param.element_size()]
        masked_swap_block16_kernel[_grid(nnz)](param.view(bits), values.view(bits), block_starts, offsets, nnz,
                                               block_starts.numel() - 1, SEARCH_STEPS=SEARCH_STEPS, BLOCK=BLOCK)


def _ptr(t) -> int:
    return t.data_ptr() if t is not None and t.numel() > 0 else 0


def sparse_adamw_block16_(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *,
                          scalars, maximize, stochastic_rounding, step_key, dense_state=False) -> None:
    """Launch over validated lists (masters / max_exp_avg_sqs entries empty when absent)."""
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, param in enumerate(params):
        nnz = offsets[i].numel()
        if nnz == 0:
            continue
        has_master, amsgrad = masters[i].numel() > 0, max_exp_avg_sqs[i].numel() > 0
        row = (param.data_ptr(), block_starts[i].data_ptr(), offsets[i].data_ptr(), grads[i].data_ptr(),
               exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(), _ptr(masters[i]), _ptr(max_exp_avg_sqs[i]), nnz, i,
               block_starts[i].numel() - 1)
        groups.setdefault((param.dtype, exp_avgs[i].dtype, grads[i].dtype, has_master, amsgrad), []).append(row)
    if not groups:
        return
    device = params[0].device
    scalar_tensor = scalars.as_tensor(device)
    for (param_dtype, state_dtype, grad_dtype, has_master, amsgrad), rows in groups.items():
        grid = (triton.cdiv(max(r[8] for r in rows), BLOCK), len(rows))
        sparse_adamw_block16_kernel[grid](
            _table(rows, device), scalar_tensor, step_key, PARAM_DT=_TL_DTYPE[param_dtype],
            STATE_DT=_TL_DTYPE[state_dtype], GRAD_DT=_TL_DTYPE[grad_dtype], HAS_MASTER=has_master, AMSGRAD=amsgrad,
            MAXIMIZE=maximize,
            STOCHASTIC=stochastic_rounding and param_dtype == torch.bfloat16, DENSE_STATE=dense_state,
            SEARCH_STEPS=SEARCH_STEPS, BLOCK=BLOCK)


_CONST = {"SEARCH_STEPS": SEARCH_STEPS, "BLOCK": BLOCK}
_SIG = {"starts_ptr": "*i32", "offsets_ptr": "*u16", "nnz": "i32", "n_blocks": "i32", "SEARCH_STEPS": "constexpr",
        "BLOCK": "constexpr"}


def _adamw_spec(param: str, state: str, has_master: bool, amsgrad: bool, stochastic: bool,
                dense: bool = False, grad: str | None = None) -> AotSpec:
    flags = "".join(f for f, on in (("+master", has_master), ("+amsgrad", amsgrad), ("+sr", stochastic),
                                    ("+dense-state", dense), ("+bf16-grad", grad == "bfloat16")) if on)
    return AotSpec(
        f"sparse_adamw_block16_kernel[{param}/{state}{flags}]", sparse_adamw_block16_kernel,
        {"table_ptr": "*i64", "scalars_ptr": "*fp64", "step_key": "i64", "PARAM_DT": "constexpr",
         "STATE_DT": "constexpr", "GRAD_DT": "constexpr", "HAS_MASTER": "constexpr", "AMSGRAD": "constexpr",
         "MAXIMIZE": "constexpr",
         "STOCHASTIC": "constexpr", "DENSE_STATE": "constexpr", "SEARCH_STEPS": "constexpr", "BLOCK": "constexpr"},
        {"PARAM_DT": _TL_DTYPE[getattr(torch, param)], "STATE_DT": _TL_DTYPE[getattr(torch, state)],
         "GRAD_DT": _TL_DTYPE[getattr(torch, grad or state)], "HAS_MASTER": has_master, "AMSGRAD": amsgrad,
         "MAXIMIZE": False, "STOCHASTIC": stochastic,
         "DENSE_STATE": dense, **_CONST})


AOT_SPECS = [
    *(
        AotSpec(f"masked_gather_block16_kernel[{src}->fp32]", masked_gather_block16_kernel,
                {"out_ptr": "*fp32", "dense_ptr": f"*{src}", **_SIG}, _CONST)
        for src in ("fp32", "fp16", "bf16")
    ),
    *(
        AotSpec(f"masked_swap_block16_kernel[{bits}]", masked_swap_block16_kernel,
                {"param_ptr": f"*{bits}", "values_ptr": f"*{bits}", **_SIG}, _CONST)
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
