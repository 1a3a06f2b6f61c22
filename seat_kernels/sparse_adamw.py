"""Triton kernel of sparse_adamw_: multi-tensor AdamW over compact state.

One launch per group of tensors sharing (param dtype, state dtype, grad dtype, master?,
amsgrad?); grads are the state dtype or, for fp32 state, bf16 (upcast on load),
over a table of pointers: grid = (chunks of BLOCK entries of the largest tensor, tensors);
a program whose chunk lies past its tensor's nnz does no memory traffic. The table is
cached by the tensors' addresses, so a training loop rebuilds it only if storage moves.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._spec import AotSpec
from .adamw_math import load_scalars, mix32, update_entries

BLOCK = 1024
# table columns (int64): param, idx, grad, exp_avg, exp_avg_sq, master, max_exp_avg_sq, nnz, list index
N_COLS = 9


@triton.jit
def sparse_adamw_kernel(table_ptr, scalars_ptr, step_key, PARAM_DT: tl.constexpr, STATE_DT: tl.constexpr,
                        GRAD_DT: tl.constexpr, HAS_MASTER: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                        STOCHASTIC: tl.constexpr, DENSE_STATE: tl.constexpr, BLOCK: tl.constexpr):
    row = table_ptr + tl.program_id(1) * 9
    nnz = tl.load(row + 7)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < nnz
    param = tl.load(row + 0).to(tl.pointer_type(PARAM_DT))
    idx = tl.load(row + 1).to(tl.pointer_type(tl.int32))
    grad = tl.load(row + 2).to(tl.pointer_type(GRAD_DT))
    exp_avg = tl.load(row + 3).to(tl.pointer_type(STATE_DT))
    exp_avg_sq = tl.load(row + 4).to(tl.pointer_type(STATE_DT))
    decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt = load_scalars(scalars_ptr, STATE_DT)

    pos = tl.load(idx + offs, mask=live, other=0)
    # compact state is indexed like the grads; full-size (dense-mask mode) by position
    at = pos if DENSE_STATE else offs
    key = mix32(step_key.to(tl.uint32) ^ mix32(tl.load(row + 8).to(tl.uint32)))
    update_entries(row, param, grad, exp_avg, exp_avg_sq, pos, at, offs, live, key,
                   decay, omb1, beta2, omb2, eps, step_size, bc2_sqrt, 5, 6, PARAM_DT, STATE_DT,
                   HAS_MASTER, AMSGRAD, MAXIMIZE, STOCHASTIC)


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16


def _table(rows: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
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


def sparse_adamw_(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, scalars, maximize,
                  stochastic_rounding, step_key, dense_state=False) -> None:
    """Launch over validated lists (masters / max_exp_avg_sqs entries empty when absent)."""
    groups: dict[tuple, list[tuple[int, ...]]] = {}
    for i, param in enumerate(params):
        nnz = idxs[i].numel()
        if nnz == 0:
            continue
        has_master, amsgrad = masters[i].numel() > 0, max_exp_avg_sqs[i].numel() > 0
        row = (param.data_ptr(), idxs[i].data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(),
               exp_avg_sqs[i].data_ptr(), _ptr(masters[i]), _ptr(max_exp_avg_sqs[i]), nnz, i)
        groups.setdefault((param.dtype, exp_avgs[i].dtype, grads[i].dtype, has_master, amsgrad), []).append(row)
    if not groups:
        return
    device = params[0].device
    scalar_tensor = scalars.as_tensor(device)
    for (param_dtype, state_dtype, grad_dtype, has_master, amsgrad), rows in groups.items():
        grid = (triton.cdiv(max(r[7] for r in rows), BLOCK), len(rows))
        sparse_adamw_kernel[grid](
            _table(rows, device), scalar_tensor, step_key, PARAM_DT=_TL_DTYPE[param_dtype],
            STATE_DT=_TL_DTYPE[state_dtype], GRAD_DT=_TL_DTYPE[grad_dtype], HAS_MASTER=has_master, AMSGRAD=amsgrad, MAXIMIZE=maximize,
            STOCHASTIC=stochastic_rounding and param_dtype == torch.bfloat16, DENSE_STATE=dense_state, BLOCK=BLOCK)


def _spec(param: str, state: str, has_master: bool, amsgrad: bool, stochastic: bool, dense: bool = False,
          grad: str | None = None) -> AotSpec:
    flags = "".join(f for f, on in (("+master", has_master), ("+amsgrad", amsgrad), ("+sr", stochastic),
                                    ("+dense-state", dense), ("+bf16-grad", grad == "bfloat16")) if on)
    return AotSpec(
        f"sparse_adamw_kernel[{param}/{state}{flags}]", sparse_adamw_kernel,
        {"table_ptr": "*i64", "scalars_ptr": "*fp64", "step_key": "i64", "PARAM_DT": "constexpr",
         "STATE_DT": "constexpr", "GRAD_DT": "constexpr", "HAS_MASTER": "constexpr", "AMSGRAD": "constexpr", "MAXIMIZE": "constexpr",
         "STOCHASTIC": "constexpr", "DENSE_STATE": "constexpr", "BLOCK": "constexpr"},
        {"PARAM_DT": _TL_DTYPE[getattr(torch, param)], "STATE_DT": _TL_DTYPE[getattr(torch, state)],
         "GRAD_DT": _TL_DTYPE[getattr(torch, grad or state)],
         "HAS_MASTER": has_master, "AMSGRAD": amsgrad, "MAXIMIZE": False, "STOCHASTIC": stochastic,
         "DENSE_STATE": dense, "BLOCK": BLOCK})


AOT_SPECS = [
    _spec("float32", "float32", False, False, False),
    _spec("bfloat16", "float32", False, False, False),
    _spec("bfloat16", "float32", False, False, True),
    _spec("bfloat16", "float32", True, False, False),
    _spec("float16", "float32", True, True, False),
    _spec("bfloat16", "float32", True, False, False, dense=True),
    _spec("bfloat16", "float32", False, False, True, grad="bfloat16"),
    _spec("bfloat16", "float32", True, False, False, grad="bfloat16"),
]
