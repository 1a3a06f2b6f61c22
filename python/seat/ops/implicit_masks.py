"""Implicit random masks: the sparse-update ops without an index array.

Element e of a parameter is in the mask iff

    mix32(key ^ mix32(e)) < threshold,    key = mask_key(seed, param_id),
                                          threshold = round(density * 2**32) in [0, 2**32]

(mix32: the 32-bit hash of stochastic rounding, _adamw.py; the same test in
csrc/include/seat/implicit_mask.h and seat_kernels/implicit_masks.py). Each element is a
member independently with probability threshold / 2**32, so nnz is Binomial(numel,
density), not a fixed count. Nothing per entry is stored: the parameter is cut into
blocks of `block` elements (a power of two, default 4096) and

    block_offsets  (n_blocks + 1,) int32, n_blocks = ceil(numel / block):
                   block_offsets[b] = members in elements [0, b * block); [-1] = nnz

(4 bytes per block, 0.001 bytes per element at block 4096) gives each block's first
slot in the compact arrays; kernels recompute membership inside a block and number its
members in order, so compact slot j holds the j-th member, exactly as with the sorted
indices `implicit_indices(...)` of the same mask. The ops:

  implicit_block_offsets_(block_offsets, *, numel, seed, param_id, threshold, block)
  masked_gather_implicit_(out, dense, block_offsets, *, seed, param_id, threshold, block)
  masked_swap_implicit_(param, block_offsets, values, *, seed, param_id, threshold, block)
  sparse_adamw_implicit_(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters,
                         max_exp_avg_sqs, *, seeds, param_ids, thresholds, blocks, lr, ...)

are masked_gather_ / masked_swap_ / sparse_adamw_ with the mask given by (seed,
param_id, threshold, block, block_offsets) instead of idx (sparse_adamw_implicit_: one
of each per param, as lists); shapes, dtypes and semantics
of the other arguments are theirs. Their references materialize the indices and run the
idx ops' references: the oracle of the kernels. seat.masks.ImplicitMask wraps one mask.
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

M32 = _adamw.M32
FULL_THRESHOLD = 2**32  # threshold of density 1: every element
DEFAULT_BLOCK = 4096
MIN_BLOCK, MAX_BLOCK = 256, 65536  # powers of two: whole warps / Triton tiles per block
_MASK_DOMAIN = 0x6D61736B  # "mask": separates mask keys from stochastic-rounding keys
_CHUNK = 1 << 20  # elements hashed at a time by the references (bounds their int64 scratch)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------- the hash


def mask_key(seed: int, param_id: int) -> int:
    """The 32-bit key of the mask of (seed, param_id): seed any int64, param_id in [0, 2**32)."""
    seed_key = _adamw.mix32((seed & M32) ^ _adamw.mix32((seed >> 32) & M32))
    return _adamw.mix32(_adamw.mix32(seed_key ^ _MASK_DOMAIN) ^ _adamw.mix32(param_id & M32))


def threshold_for(density: float) -> int:
    """round(density * 2**32): the membership threshold of a density in [0, 1]."""
    return int(round(float(density) * FULL_THRESHOLD))


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def members(key: int, start: int, stop: int, threshold: int, device=None) -> Tensor:
    """bool (stop - start,): membership of elements [start, stop)."""
    e = torch.arange(start, stop, dtype=torch.int64, device=device)
    return _adamw.mix32_tensor(key ^ _adamw.mix32_tensor(e & M32)) < threshold


def implicit_indices(numel: int, key: int, threshold: int, device=None) -> Tensor:
    """The mask as sorted int32 flat indices (what the idx ops take): the oracle."""
    parts = [members(key, s, min(numel, s + _CHUNK), threshold, device).nonzero().squeeze(1) + s
             for s in range(0, numel, _CHUNK)]
    if not parts:
        return torch.empty(0, dtype=torch.int32, device=device)
    return torch.cat(parts).to(torch.int32)


def _block_counts_reference(numel: int, key: int, threshold: int, block: int, device) -> Tensor:
    counts = []
    step = max(block, _CHUNK - _CHUNK % block)  # whole blocks per chunk
    for s in range(0, numel, step):
        hit = members(key, s, min(numel, s + step), threshold, device)
        pad = (-hit.numel()) % block
        if pad:
            hit = torch.cat([hit, hit.new_zeros(pad)])
        counts.append(hit.view(-1, block).sum(1, dtype=torch.int32))
    return torch.cat(counts) if counts else torch.empty(0, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------- checks

# block_offsets whose values were checked: (version, numel, block, nnz) by tensor identity.
_checked_offsets: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_mask_args(prefix: str, *, seed, param_id, threshold, block) -> None:
    """The scalars of a mask; `prefix` names them in errors (e.g. 'seeds[2]' -> 'seed')."""
    for name, value in (("seed", seed), ("param_id", param_id), ("threshold", threshold), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{prefix}{name} must be an int; got {type(value).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{prefix}seed must be in [-2**63, 2**63) (an int64); got {seed}")
    if not 0 <= param_id < 2**32:
        raise ValueError(f"{prefix}param_id must be in [0, 2**32); got {param_id}")
    if not 0 <= threshold <= FULL_THRESHOLD:
        raise ValueError(f"{prefix}threshold must be in [0, 2**32] (round(density * 2**32)); got {threshold}")
    if not (MIN_BLOCK <= block <= MAX_BLOCK and block & (block - 1) == 0):
        raise ValueError(f"{prefix}block must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}]; got {block}")


def check_offsets(name: str, block_offsets, numel: int, block: int, nnz: int | None, *, values: bool) -> None:
    """block_offsets: 1-D int32 of ceil(numel / block) + 1 entries; with values, also
    0 at [0], steps in [0, block], and [-1] == nnz (checked once per in-place version).
    nnz None: the compact arrays are not known (implicit_block_offsets_ fills them)."""
    _checks.tensor(name, block_offsets, dtypes=(torch.int32,), ndim=1)
    if numel > _INT32_MAX:
        raise ValueError(f"{name} belongs to a tensor of {numel} elements; implicit masks reach at most 2**31-1")
    expected = n_blocks(numel, block) + 1
    if block_offsets.numel() != expected:
        raise ValueError(f"{name} must have ceil(numel / block) + 1 = {expected} entries for {numel} elements in "
                         f"blocks of {block}; got {block_offsets.numel()} (build it with "
                         "seat.masks.ImplicitMask or implicit_block_offsets_)")
    if not values or nnz is None or _checks.is_fake(block_offsets):
        return
    key = (block_offsets._version, numel, block, nnz)
    if _checked_offsets.get(block_offsets) == key:
        return
    steps = block_offsets.diff()
    if int(block_offsets[0]) != 0 or int(block_offsets[-1]) != nnz or (
            steps.numel() and not bool(((steps >= 0) & (steps <= block)).all())):
        raise ValueError(f"{name} is not a prefix count of a mask with {nnz} entries (it must start at 0, grow by "
                         f"0..{block} per block and end at {nnz}); got [{int(block_offsets[0])}, ..., "
                         f"{int(block_offsets[-1])}]. Build it with implicit_block_offsets_ for the same mask")
    _checked_offsets[block_offsets] = key


# ----------------------------------------------------------------------------- implicit_block_offsets_


def _offsets_reference(block_offsets, *, numel, seed, param_id, threshold, block) -> None:
    counts = _block_counts_reference(numel, mask_key(seed, param_id), threshold, block, block_offsets.device)
    block_offsets[0] = 0
    torch.cumsum(counts, 0, dtype=torch.int32, out=block_offsets[1:])


def _offsets_native(block_offsets, *, numel, seed, param_id, threshold, block) -> None:
    counts = block_offsets.new_empty(n_blocks(numel, block))
    torch.ops.seat_C.implicit_block_counts_(counts, numel, mask_key(seed, param_id), threshold, block)
    block_offsets[0] = 0
    torch.cumsum(counts, 0, dtype=torch.int32, out=block_offsets[1:])


def _offsets_triton(block_offsets, *, numel, seed, param_id, threshold, block) -> None:
    from seat_kernels.implicit_masks import implicit_block_counts_

    counts = block_offsets.new_empty(n_blocks(numel, block))
    implicit_block_counts_(counts, numel, mask_key(seed, param_id), threshold, block)
    block_offsets[0] = 0
    torch.cumsum(counts, 0, dtype=torch.int32, out=block_offsets[1:])


OFFSETS = _registry.register("implicit_block_offsets_", _offsets_reference,
                             {"cpu": _offsets_native, "cuda": _offsets_native, "triton": _offsets_triton})


def _check_offsets_op(block_offsets, numel, seed, param_id, threshold, block):
    check_mask_args("", seed=seed, param_id=param_id, threshold=threshold, block=block)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0; got {numel!r}")
    check_offsets("block_offsets", block_offsets, numel, block, None, values=False)


@torch.library.custom_op("seat::implicit_block_offsets_", mutates_args=("block_offsets",))
def _offsets_op(block_offsets: Tensor, *, numel: int, seed: int, param_id: int, threshold: int,
                block: int) -> None:
    _check_offsets_op(block_offsets, numel, seed, param_id, threshold, block)
    OFFSETS.run(block_offsets.device, block_offsets, numel=numel, seed=seed, param_id=param_id,
                threshold=threshold, block=block)


@_offsets_op.register_fake
def _(block_offsets, *, numel, seed, param_id, threshold, block):
    _check_offsets_op(block_offsets, numel, seed, param_id, threshold, block)


def implicit_block_offsets_(block_offsets: Tensor, *, numel: int, seed: int, param_id: int = 0, threshold: int,
                            block: int = DEFAULT_BLOCK) -> Tensor:
    """Fill block_offsets ((ceil(numel / block) + 1,) int32) with the prefix counts of the
    mask of (seed, param_id, threshold) over a tensor of numel elements; returns it."""
    _check_offsets_op(block_offsets, numel, seed, param_id, threshold, block)
    torch.ops.seat.implicit_block_offsets_(block_offsets, numel=numel, seed=seed, param_id=param_id,
                                           threshold=threshold, block=block)
    return block_offsets


# ----------------------------------------------------------------------------- masked_gather_implicit_


def _materialize(numel, block_offsets, seed, param_id, threshold, nnz_name, nnz) -> Tensor:
    idx = implicit_indices(numel, mask_key(seed, param_id), threshold, block_offsets.device)
    if idx.numel() != nnz:
        raise ValueError(f"{nnz_name} has {nnz} entries but the mask of (seed={seed}, param_id={param_id}, "
                         f"threshold={threshold}) has {idx.numel()} members: block_offsets belong to another mask")
    return idx


def _gather_reference(out, dense, block_offsets, *, seed, param_id, threshold, block) -> None:
    idx = _materialize(dense.numel(), block_offsets, seed, param_id, threshold, "out", out.numel())
    _gather.reference(out, dense, idx)


def _gather_native(out, dense, block_offsets, *, seed, param_id, threshold, block) -> None:
    torch.ops.seat_C.masked_gather_implicit_(out, dense, block_offsets, mask_key(seed, param_id), threshold, block)


def _gather_triton(out, dense, block_offsets, *, seed, param_id, threshold, block) -> None:
    from seat_kernels.implicit_masks import masked_gather_implicit_ as kernel

    kernel(out, dense, block_offsets, mask_key(seed, param_id), threshold, block)


GATHER = _registry.register("masked_gather_implicit_", _gather_reference,
                            {"cpu": _gather_native, "cuda": _gather_native, "triton": _gather_triton})


def check_gather(out, dense, block_offsets, seed, param_id, threshold, block, *, values: bool = True) -> None:
    check_mask_args("", seed=seed, param_id=param_id, threshold=threshold, block=block)
    _checks.tensor("out", out, dtypes=_checks.ACCUM_DTYPES, ndim=1)
    _checks.tensor("dense", dense, dtypes=_checks.FLOAT_DTYPES)
    check_offsets("block_offsets", block_offsets, dense.numel(), block, out.numel(), values=False)
    _checks.same_device(dense=dense, out=out, block_offsets=block_offsets)
    if values:
        check_offsets("block_offsets", block_offsets, dense.numel(), block, out.numel(), values=True)


@torch.library.custom_op("seat::masked_gather_implicit_", mutates_args=("out",))
def _gather_op(out: Tensor, dense: Tensor, block_offsets: Tensor, *, seed: int, param_id: int, threshold: int,
               block: int) -> None:
    check_gather(out, dense, block_offsets, seed, param_id, threshold, block)
    GATHER.run(dense.device, out, dense, block_offsets, seed=seed, param_id=param_id, threshold=threshold,
               block=block)


@_gather_op.register_fake
def _(out, dense, block_offsets, *, seed, param_id, threshold, block):
    check_gather(out, dense, block_offsets, seed, param_id, threshold, block, values=False)


def masked_gather_implicit_(out: Tensor, dense: Tensor, block_offsets: Tensor, *, seed: int, param_id: int = 0,
                            threshold: int, block: int = DEFAULT_BLOCK) -> Tensor:
    """out += dense.view(-1)[members] in place (members in order); returns out.
    out: (nnz,) float32/float64; dense: any shape, float16/bfloat16/float32/float64."""
    check_gather(out, dense, block_offsets, seed, param_id, threshold, block, values=False)
    torch.ops.seat.masked_gather_implicit_(out, dense, block_offsets, seed=seed, param_id=param_id,
                                           threshold=threshold, block=block)
    return out


# ----------------------------------------------------------------------------- masked_swap_implicit_


def _swap_reference(param, block_offsets, values, *, seed, param_id, threshold, block) -> None:
    idx = _materialize(param.numel(), block_offsets, seed, param_id, threshold, "values", values.numel())
    _swap.reference(param, idx, values)


def _swap_native(param, block_offsets, values, *, seed, param_id, threshold, block) -> None:
    torch.ops.seat_C.masked_swap_implicit_(param, block_offsets, values, mask_key(seed, param_id), threshold, block)


def _swap_triton(param, block_offsets, values, *, seed, param_id, threshold, block) -> None:
    from seat_kernels.implicit_masks import masked_swap_implicit_ as kernel

    kernel(param, block_offsets, values, mask_key(seed, param_id), threshold, block)


SWAP = _registry.register("masked_swap_implicit_", _swap_reference,
                          {"cpu": _swap_native, "cuda": _swap_native, "triton": _swap_triton})


def check_swap(param, block_offsets, values, seed, param_id, threshold, block, *, values_check: bool = True) -> None:
    check_mask_args("", seed=seed, param_id=param_id, threshold=threshold, block=block)
    _checks.tensor("param", param)
    _checks.tensor("values", values, ndim=1)
    if values.dtype != param.dtype:
        raise TypeError(f"values must have param's dtype {param.dtype}; got {values.dtype}")
    check_offsets("block_offsets", block_offsets, param.numel(), block, values.numel(), values=False)
    _checks.same_device(param=param, block_offsets=block_offsets, values=values)
    if values_check:
        check_offsets("block_offsets", block_offsets, param.numel(), block, values.numel(), values=True)


@torch.library.custom_op("seat::masked_swap_implicit_", mutates_args=("param", "values"))
def _swap_op(param: Tensor, block_offsets: Tensor, values: Tensor, *, seed: int, param_id: int, threshold: int,
             block: int) -> None:
    check_swap(param, block_offsets, values, seed, param_id, threshold, block)
    SWAP.run(param.device, param, block_offsets, values, seed=seed, param_id=param_id, threshold=threshold,
             block=block)


@_swap_op.register_fake
def _(param, block_offsets, values, *, seed, param_id, threshold, block):
    check_swap(param, block_offsets, values, seed, param_id, threshold, block, values_check=False)


def masked_swap_implicit_(param: Tensor, block_offsets: Tensor, values: Tensor, *, seed: int, param_id: int = 0,
                          threshold: int, block: int = DEFAULT_BLOCK) -> None:
    """Exchange param.view(-1)[members] and values ((nnz,), param's dtype) in place, bit-exact."""
    check_swap(param, block_offsets, values, seed, param_id, threshold, block, values_check=False)
    torch.ops.seat.masked_swap_implicit_(param, block_offsets, values, seed=seed, param_id=param_id,
                                         threshold=threshold, block=block)


# ----------------------------------------------------------------------------- sparse_adamw_implicit_


def _adamw_reference(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, seeds,
                     param_ids, thresholds, blocks, **kwargs) -> None:
    idxs = [_materialize(p.numel(), o, s, i, t, f"grads[{n}]", g.numel())
            for n, (p, o, g, s, i, t) in enumerate(zip(params, block_offsets, grads, seeds, param_ids, thresholds))]
    _adamw_op.reference(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, **kwargs)


def _adamw_native(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, seeds,
                  param_ids, thresholds, blocks, lr, beta1, beta2, eps, weight_decay, step, maximize,
                  stochastic_rounding, seed, dense_state) -> None:
    s = _adamw.AdamWScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    torch.ops.seat_C.sparse_adamw_implicit_(
        params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
        [mask_key(a, b) for a, b in zip(seeds, param_ids)], list(thresholds), list(blocks),
        [s.decay, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps, s.step_size, s.bias_correction2_sqrt],
        maximize, stochastic_rounding, _adamw.step_key(seed, step), dense_state)


def _adamw_triton(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, seeds,
                  param_ids, thresholds, blocks, maximize, stochastic_rounding, seed, dense_state, step,
                  **hyper) -> None:
    from seat_kernels.implicit_masks import sparse_adamw_implicit_ as kernel

    kernel(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
           keys=[mask_key(a, b) for a, b in zip(seeds, param_ids)], thresholds=list(thresholds),
           blocks=list(blocks),
           scalars=_adamw.AdamWScalars.of(step=step, **hyper), maximize=maximize,
           stochastic_rounding=stochastic_rounding, step_key=_adamw.step_key(seed, step), dense_state=dense_state)


ADAMW = _registry.register("sparse_adamw_implicit_", _adamw_reference,
                           {"cpu": _adamw_native, "cuda": _adamw_native, "triton": _adamw_triton})


def check_adamw(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, seeds, param_ids,
                thresholds, blocks, lr, beta1, beta2, eps, weight_decay, step, stochastic_rounding=False,
                dense_state=False, values: bool = True):
    """Validate everything; returns the common device (None for empty lists)."""
    for name, value in (("block_offsets", block_offsets), ("seeds", seeds), ("param_ids", param_ids),
                        ("thresholds", thresholds), ("blocks", blocks)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        if isinstance(params, (list, tuple)) and len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} entries but params has {len(params)}; pass one per param")
    for i, (s, p, t, b) in enumerate(zip(seeds, param_ids, thresholds, blocks)):
        check_mask_args(f"the mask of params[{i}]: ", seed=s, param_id=p, threshold=t, block=b)
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "masters": masters, "max_exp_avg_sqs": max_exp_avg_sqs}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} tensors but params has {len(params)}; pass one per param")
    _adamw_op.check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    device = None
    for i in range(len(params)):
        param = _checks.tensor(f"params[{i}]", params[i], dtypes=_checks.FLOAT_DTYPES)
        grad = _checks.tensor(f"grads[{i}]", grads[i], ndim=1)  # its size is the mask's nnz
        _adamw_op.state_dtype_for(f"grads[{i}]", param, grad, grad=True)  # bf16 for fp32 state
        offsets = block_offsets[i]
        check_offsets(f"block_offsets[{i}]", offsets, param.numel(), blocks[i], grad.numel(), values=False)
        named = {f"params[{i}]": param, f"block_offsets[{i}]": offsets, f"grads[{i}]": grad}
        for name in ("exp_avgs", "exp_avg_sqs", *_adamw_op._OPTIONAL):
            state = lists[name][i]
            if name in _adamw_op._OPTIONAL and _adamw_op.present(state) is None:
                if state is not None:  # the op's empty stand-in: still a tensor of the right kind
                    _checks.tensor(f"{name}[{i}]", state, ndim=1)
                continue
            _checks.tensor(f"{name}[{i}]", state, ndim=None if dense_state else 1)
            _adamw_op.state_dtype_for(f"{name}[{i}]", param, state)
            if dense_state:
                if state.numel() != param.numel():
                    raise ValueError(f"{name}[{i}] must have params[{i}].numel() = {param.numel()} elements with "
                                     f"dense_state=True; got {state.numel()}")
            else:
                _checks.same_numel(f"{name}[{i}]", state, f"grads[{i}]", grad)
            named[f"{name}[{i}]"] = state
        if device is not None and param.device != device:
            raise ValueError(f"params[{i}] is on {param.device} but params[0] is on {device}; use one device")
        device = _checks.same_device(**named)
        if stochastic_rounding and param.dtype == torch.float16 and _adamw_op.present(masters[i]) is None:
            raise ValueError(f"stochastic_rounding supports bfloat16 params; params[{i}] is float16 without a "
                             "master copy: give it masters, or keep stochastic_rounding off")
        if values:
            check_offsets(f"block_offsets[{i}]", offsets, param.numel(), blocks[i], grad.numel(), values=True)
    return device


@torch.library.custom_op(
    "seat::sparse_adamw_implicit_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs")
)
def _adamw_op_impl(
    params: List[Tensor], block_offsets: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor], masters: List[Tensor], max_exp_avg_sqs: List[Tensor], *, seeds: List[int],
    param_ids: List[int], thresholds: List[int], blocks: List[int], lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, step: int, maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0,
    dense_state: bool = False,
) -> None:
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    device = check_adamw(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, seeds=seeds,
                         param_ids=param_ids, thresholds=thresholds, blocks=blocks,
                         stochastic_rounding=stochastic_rounding, dense_state=dense_state, **hyper)
    if device is None:
        return
    ADAMW.run(device, params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, seeds=seeds,
              param_ids=param_ids, thresholds=thresholds, blocks=blocks, maximize=maximize,
              stochastic_rounding=stochastic_rounding, seed=seed, dense_state=dense_state, **hyper)


@_adamw_op_impl.register_fake
def _(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, seeds, param_ids, thresholds,
      blocks, lr, beta1, beta2, eps, weight_decay, step, maximize=False, stochastic_rounding=False, seed=0,
      dense_state=False):
    check_adamw(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, seeds=seeds,
                param_ids=param_ids, thresholds=thresholds, blocks=blocks, values=False, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, stochastic_rounding=stochastic_rounding,
                dense_state=dense_state)


def sparse_adamw_implicit_(
    params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters=None, max_exp_avg_sqs=None, *, seeds, param_ids,
    thresholds, blocks=None, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, step: int, maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0,
    dense_state: bool = False,
) -> None:
    """sparse_adamw_ with implicit masks: params[i]'s mask is (seeds[i], param_ids[i],
    thresholds[i], blocks[i], block_offsets[i]); compact arrays hold its members in order.
    blocks None: DEFAULT_BLOCK for every param."""
    if blocks is None and isinstance(params, (list, tuple)):
        blocks = [DEFAULT_BLOCK] * len(params)
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)
    if isinstance(grads, (list, tuple)):
        masters = _adamw_op.absent_as_empty(masters, grads)
        max_exp_avg_sqs = _adamw_op.absent_as_empty(max_exp_avg_sqs, grads)
    check_adamw(params, block_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, seeds=seeds,
                param_ids=param_ids, thresholds=thresholds, blocks=blocks, values=False,
                stochastic_rounding=bool(stochastic_rounding), dense_state=bool(dense_state), **hyper)
    torch.ops.seat.sparse_adamw_implicit_(
        list(params), list(block_offsets), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masters),
        list(max_exp_avg_sqs), seeds=[int(s) for s in seeds], param_ids=[int(p) for p in param_ids],
        thresholds=[int(t) for t in thresholds], blocks=[int(b) for b in blocks], maximize=bool(maximize),
        stochastic_rounding=bool(stochastic_rounding), seed=int(seed), dense_state=bool(dense_state), **hyper)
