"""Block16-encoded explicit masks: the sparse-update ops at 2 bytes per trained entry.

A mask chosen entry by entry (magnitude, importance) cannot be recomputed like an implicit
one, but it need not cost 4 bytes per entry: the parameter is cut into blocks of 65536
elements and the sorted flat indices idx are stored as

    block_starts  (n_blocks + 1,) int32, n_blocks = ceil(numel / 65536):
                  block_starts[b] = entries with idx < b * 65536 (the first compact slot of
                  block b); block_starts[-1] = nnz
    offsets       (nnz,) uint16: idx[j] - 65536 * (block of entry j)

(2 bytes per entry + 4 bytes per 65536 elements). Compact slot j is the same as in the
int32 form, so state and trajectories are identical. Kernels find entry j's block by a
binary search of block_starts (at most 15 steps: numel < 2**31), in
csrc/include/seat/block16.h and seat_kernels/block16_masks.py. The ops:

  masked_gather_block16_(out, dense, block_starts, offsets)
  masked_swap_block16_(param, block_starts, offsets, values)
  sparse_adamw_block16_(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs,
                        masters, max_exp_avg_sqs, *, lr, ...)

are masked_gather_ / masked_swap_ / sparse_adamw_ with (block_starts, offsets) for idx;
their references decode the indices and run the idx ops' references. encode_block16 /
decode_block16 convert; seat.masks.Block16Mask wraps one mask.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _adamw, _checks, _registry
from . import masked_gather as _gather
from . import masked_swap as _swap
from . import sparse_adamw as _adamw_op

BLOCK16 = 65536
_INT32_MAX = 2**31 - 1


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK16)


def encode_block16(idx: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Sorted unique int32 indices into a tensor of numel elements -> (block_starts int32
    (n_blocks + 1,), offsets uint16 (nnz,)), on idx's device."""
    _checks.index_tensor("idx", idx, numel)
    _checks.index_values("idx", idx, numel)
    pos = idx.long()
    bounds = torch.arange(n_blocks(numel) + 1, dtype=torch.int64, device=idx.device) * BLOCK16
    starts = torch.searchsorted(pos, bounds).to(torch.int32)
    offsets = (pos % BLOCK16).to(torch.int32).to(torch.uint16)  # via int32: values in [0, 65536)
    return starts, offsets


def decode_block16(block_starts: Tensor, offsets: Tensor) -> Tensor:
    """(block_starts, offsets) -> the sorted int32 indices."""
    counts = block_starts.diff().long()
    blocks = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
    return (blocks * BLOCK16 + offsets.to(torch.int32).long()).to(torch.int32)


# ----------------------------------------------------------------------------- checks

_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # offsets -> (versions, numel) once checked


def check_encoding(prefix: str, block_starts, offsets, numel: int, *, values: bool) -> None:
    """block_starts int32 (ceil(numel / 65536) + 1,), offsets uint16 1-D; with values,
    also: starts from 0, non-decreasing, ends at offsets.numel(), and the decoded indices
    strictly increasing and < numel (checked once per in-place version)."""
    _checks.tensor(f"{prefix}block_starts", block_starts, dtypes=(torch.int32,), ndim=1)
    _checks.tensor(f"{prefix}offsets", offsets, dtypes=(torch.uint16,), ndim=1)
    if numel > _INT32_MAX:
        raise ValueError(f"{prefix}block_starts belongs to a tensor of {numel} elements; masks reach at most 2**31-1")
    expected = n_blocks(numel) + 1
    if block_starts.numel() != expected:
        raise ValueError(f"{prefix}block_starts must have ceil(numel / 65536) + 1 = {expected} entries for {numel} "
                         f"elements; got {block_starts.numel()} (build it with encode_block16)")
    if block_starts.device != offsets.device:
        raise ValueError(f"{prefix}offsets is on {offsets.device} but {prefix}block_starts is on "
                         f"{block_starts.device}; move them to the same device")
    if not values or _checks.is_fake(offsets) or _checks.is_fake(block_starts):
        return
    key = (block_starts._version, offsets._version, numel)
    if _checked.get(offsets) == (id(block_starts), key):
        return
    nnz = offsets.numel()
    steps = block_starts.diff()
    if int(block_starts[0]) != 0 or int(block_starts[-1]) != nnz or (steps.numel() and not bool((steps >= 0).all())):
        raise ValueError(f"{prefix}block_starts must start at 0, never decrease and end at offsets.numel() = {nnz}; "
                         f"got [{int(block_starts[0])}, ..., {int(block_starts[-1])}] (build it with encode_block16)")
    idx = decode_block16(block_starts, offsets)
    if nnz > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(f"{prefix}offsets must be strictly increasing within each block (sorted, unique entries)")
    if nnz and int(idx[-1]) >= numel:
        raise ValueError(f"{prefix}offsets reach element {int(idx[-1])}, outside a tensor of {numel} elements")
    _checked[offsets] = (id(block_starts), key)


# ----------------------------------------------------------------------------- masked_gather_block16_


def _gather_reference(out, dense, block_starts, offsets) -> None:
    _gather.reference(out, dense, decode_block16(block_starts, offsets))


def _gather_native(out, dense, block_starts, offsets) -> None:
    torch.ops.seat_C.masked_gather_block16_(out, dense, block_starts, offsets)


def _gather_triton(out, dense, block_starts, offsets) -> None:
    from seat_kernels.block16_masks import masked_gather_block16_ as kernel

    kernel(out, dense, block_starts, offsets)


GATHER = _registry.register("masked_gather_block16_", _gather_reference,
                            {"cpu": _gather_native, "cuda": _gather_native, "triton": _gather_triton})


def check_gather(out, dense, block_starts, offsets, *, values: bool = True) -> None:
    _checks.tensor("out", out, dtypes=_checks.ACCUM_DTYPES, ndim=1)
    _checks.tensor("dense", dense, dtypes=_checks.FLOAT_DTYPES)
    check_encoding("", block_starts, offsets, dense.numel(), values=False)
    _checks.same_numel("out", out, "offsets", offsets)
    _checks.same_device(dense=dense, out=out, block_starts=block_starts)
    if values:
        check_encoding("", block_starts, offsets, dense.numel(), values=True)


@torch.library.custom_op("seat::masked_gather_block16_", mutates_args=("out",))
def _gather_op(out: Tensor, dense: Tensor, block_starts: Tensor, offsets: Tensor) -> None:
    check_gather(out, dense, block_starts, offsets)
    GATHER.run(dense.device, out, dense, block_starts, offsets)


@_gather_op.register_fake
def _(out, dense, block_starts, offsets):
    check_gather(out, dense, block_starts, offsets, values=False)


def masked_gather_block16_(out: Tensor, dense: Tensor, block_starts: Tensor, offsets: Tensor) -> Tensor:
    """out += dense.view(-1)[decode_block16(block_starts, offsets)] in place; returns out.
    out: (nnz,) float32/float64; dense: any shape, float16/bfloat16/float32/float64."""
    check_gather(out, dense, block_starts, offsets, values=False)
    torch.ops.seat.masked_gather_block16_(out, dense, block_starts, offsets)
    return out


# ----------------------------------------------------------------------------- masked_swap_block16_


def _swap_reference(param, block_starts, offsets, values) -> None:
    _swap.reference(param, decode_block16(block_starts, offsets), values)


def _swap_native(param, block_starts, offsets, values) -> None:
    torch.ops.seat_C.masked_swap_block16_(param, block_starts, offsets, values)


def _swap_triton(param, block_starts, offsets, values) -> None:
    from seat_kernels.block16_masks import masked_swap_block16_ as kernel

    kernel(param, block_starts, offsets, values)


SWAP = _registry.register("masked_swap_block16_", _swap_reference,
                          {"cpu": _swap_native, "cuda": _swap_native, "triton": _swap_triton})


def check_swap(param, block_starts, offsets, values, *, values_check: bool = True) -> None:
    _checks.tensor("param", param)
    _checks.tensor("values", values, ndim=1)
    if values.dtype != param.dtype:
        raise TypeError(f"values must have param's dtype {param.dtype}; got {values.dtype}")
    check_encoding("", block_starts, offsets, param.numel(), values=False)
    _checks.same_numel("values", values, "offsets", offsets)
    _checks.same_device(param=param, block_starts=block_starts, values=values)
    if values_check:
        check_encoding("", block_starts, offsets, param.numel(), values=True)


@torch.library.custom_op("seat::masked_swap_block16_", mutates_args=("param", "values"))
def _swap_op(param: Tensor, block_starts: Tensor, offsets: Tensor, values: Tensor) -> None:
    check_swap(param, block_starts, offsets, values)
    SWAP.run(param.device, param, block_starts, offsets, values)


@_swap_op.register_fake
def _(param, block_starts, offsets, values):
    check_swap(param, block_starts, offsets, values, values_check=False)


def masked_swap_block16_(param: Tensor, block_starts: Tensor, offsets: Tensor, values: Tensor) -> None:
    """Exchange param.view(-1)[decoded indices] and values ((nnz,), param's dtype), bit-exact."""
    check_swap(param, block_starts, offsets, values, values_check=False)
    torch.ops.seat.masked_swap_block16_(param, block_starts, offsets, values)


# ----------------------------------------------------------------------------- sparse_adamw_block16_


def _adamw_reference(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
                     **kwargs) -> None:
    idxs = [decode_block16(s, o) for s, o in zip(block_starts, offsets)]
    _adamw_op.reference(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, **kwargs)


def _adamw_native(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr,
                  beta1, beta2, eps, weight_decay, step, maximize, stochastic_rounding, seed, dense_state) -> None:
    s = _adamw.AdamWScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    torch.ops.seat_C.sparse_adamw_block16_(
        params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
        [s.decay, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.step_size, s.bias_correction2_sqrt],
        maximize, stochastic_rounding, _adamw.step_key(seed, step), dense_state)


def _adamw_triton(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *,
                  maximize, stochastic_rounding, seed, dense_state, step, **hyper) -> None:
    from seat_kernels.block16_masks import sparse_adamw_block16_ as kernel

    kernel(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
           scalars=_adamw.AdamWScalars.of(step=step, **hyper), maximize=maximize,
           stochastic_rounding=stochastic_rounding, step_key=_adamw.step_key(seed, step), dense_state=dense_state)


ADAMW = _registry.register("sparse_adamw_block16_", _adamw_reference,
                           {"cpu": _adamw_native, "cuda": _adamw_native, "triton": _adamw_triton})


def check_adamw(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr, beta1,
                beta2, eps, weight_decay, step, stochastic_rounding=False, dense_state=False, values: bool = True):
    """Validate everything; returns the common device (None for empty lists)."""
    lists = {"params": params, "block_starts": block_starts, "offsets": offsets, "grads": grads,
             "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "masters": masters,
             "max_exp_avg_sqs": max_exp_avg_sqs}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} tensors but params has {len(params)}; pass one per param")
    _adamw_op.check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    device = None
    for i in range(len(params)):
        param = _checks.tensor(f"params[{i}]", params[i], dtypes=_checks.FLOAT_DTYPES)
        check_encoding(f"[{i}] ", block_starts[i], offsets[i], param.numel(), values=False)
        named = {f"params[{i}]": param, f"block_starts[{i}]": block_starts[i]}
        for name in ("grads", "exp_avgs", "exp_avg_sqs", *_adamw_op._OPTIONAL):
            state = lists[name][i]
            if name in _adamw_op._OPTIONAL and _adamw_op.present(state) is None:
                if state is not None:  # the op's empty stand-in: still a tensor of the right kind
                    _checks.tensor(f"{name}[{i}]", state, ndim=1)
                continue
            full_size = dense_state and name != "grads"
            _checks.tensor(f"{name}[{i}]", state, ndim=None if full_size else 1)
            _adamw_op.state_dtype_for(f"{name}[{i}]", param, state, grad=name == "grads")
            if full_size:
                if state.numel() != param.numel():
                    raise ValueError(f"{name}[{i}] must have params[{i}].numel() = {param.numel()} elements with "
                                     f"dense_state=True; got {state.numel()}")
            else:
                _checks.same_numel(f"{name}[{i}]", state, f"offsets[{i}]", offsets[i])
            named[f"{name}[{i}]"] = state
        if device is not None and param.device != device:
            raise ValueError(f"params[{i}] is on {param.device} but params[0] is on {device}; use one device")
        device = _checks.same_device(**named)
        if stochastic_rounding and param.dtype == torch.float16 and _adamw_op.present(masters[i]) is None:
            raise ValueError(f"stochastic_rounding supports bfloat16 params; params[{i}] is float16 without a "
                             "master copy: give it masters, or keep stochastic_rounding off")
        if values:
            check_encoding(f"[{i}] ", block_starts[i], offsets[i], param.numel(), values=True)
    return device


@torch.library.custom_op(
    "seat::sparse_adamw_block16_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs")
)
def _adamw_op_impl(
    params: List[Tensor], block_starts: List[Tensor], offsets: List[Tensor], grads: List[Tensor],
    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], masters: List[Tensor], max_exp_avg_sqs: List[Tensor], *,
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
    stochastic_rounding: bool = False, seed: int = 0, dense_state: bool = False,
) -> None:
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    device = check_adamw(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
                         stochastic_rounding=stochastic_rounding, dense_state=dense_state, **hyper)
    if device is None:
        return
    ADAMW.run(device, params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
              maximize=maximize, stochastic_rounding=stochastic_rounding, seed=seed, dense_state=dense_state, **hyper)


@_adamw_op_impl.register_fake
def _(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr, beta1, beta2,
      eps, weight_decay, step, maximize=False, stochastic_rounding=False, seed=0, dense_state=False):
    check_adamw(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                stochastic_rounding=stochastic_rounding, dense_state=dense_state, values=False)


def sparse_adamw_block16_(
    params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters=None, max_exp_avg_sqs=None, *, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, step: int,
    maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0, dense_state: bool = False,
) -> None:
    """sparse_adamw_ with block16 masks: params[i]'s mask is (block_starts[i], offsets[i])."""
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)
    if isinstance(grads, (list, tuple)):
        masters = _adamw_op.absent_as_empty(masters, grads)
        max_exp_avg_sqs = _adamw_op.absent_as_empty(max_exp_avg_sqs, grads)
    check_adamw(params, block_starts, offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
                stochastic_rounding=bool(stochastic_rounding), dense_state=bool(dense_state), values=False, **hyper)
    torch.ops.seat.sparse_adamw_block16_(
        list(params), list(block_starts), list(offsets), list(grads), list(exp_avgs), list(exp_avg_sqs),
        list(masters), list(max_exp_avg_sqs), maximize=bool(maximize), stochastic_rounding=bool(stochastic_rounding),
        seed=int(seed), dense_state=bool(dense_state), **hyper)
