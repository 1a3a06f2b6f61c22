"""sparse_adamw_: one AdamW step on the masked entries of many parameters, one launch.

For each i: the entries of params[i] in masks[i] take an AdamW step (decoupled weight
decay, bias correction; amsgrad where max_exp_avg_sqs[i] is given) with the compact
state; every other entry of params[i] is left untouched, bit for bit. Math and order of
operations follow torch.optim.AdamW (see _adamw.py); the step is computed in the state
dtype and rounded once to the param dtype.

Shapes and dtypes (lists of equal length; all tensors on one device, contiguous):
  params          (any)    float16 / bfloat16 / float32 / float64; updated in place.
  masks           per param: int32 sorted unique indices in [0, params[i].numel()), or a
                  seat.masks mask in any encoding (see _encodings.py); every mask of one
                  call has the same encoding. Compact entry j is the mask's j-th entry.
  grads           (nnz_i,) float32 (float64 for float64 params): compact gradients; or
                  bfloat16 for float32 state (the lean bf16-gradient mode: 2 bytes per
                  entry instead of 4; upcast exactly to fp32 on load, the step is then
                  the fp32 step of the bf16-rounded gradient).
  exp_avgs        (nnz_i,) float32 (float64 for float64 params): the state dtype;
                  updated in place.
  exp_avg_sqs     (nnz_i,) state dtype; updated in place.
  masters         per param None or (nnz_i,) state dtype: full-precision copy of the
                  entries; when given, the step is taken on it and param gets its
                  rounded value. None (the whole list) = no masters.
  max_exp_avg_sqs per param None or (nnz_i,) state dtype: the amsgrad running maximum
                  (amsgrad for the params that have one). None (the whole list) = none.
  step            the step number after incrementing (1 for the first step).
  dense_state     False (default): exp_avgs, exp_avg_sqs, masters and max_exp_avg_sqs are
                  compact, (nnz_i,), entry j belonging to the mask's j-th entry. True: they
                  are full-size (params[i].numel() elements, any contiguous shape) and
                  indexed by position: the dense-mask mode, where the mask is re-drawn
                  during training and state must exist for every entry. grads stay compact.
  stochastic_rounding, seed
                  bf16 params without a master round the new value stochastically
                  (unbiased; random bits from (seed, step, i, position), see _adamw.py).
                  float16 params need a master for it; fp32/fp64 params do not round.

No tensor the step writes (params, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs) may
share memory with any other argument (one tensor as both moments, a master that is a
gradient, one param listed twice): refused with a ValueError naming both. Disjoint slices
of one buffer are separate tensors.

The torch op (torch.ops.seat.sparse_adamw_) takes an empty tensor where the Python API
takes None: torch's functionalization (torch.compile) cannot handle None entries in a
mutated tensor list. An entry with nnz_i == 0 changes nothing either way.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import _adamw, _checks, _encodings, _registry
from ._encodings import MaskArgs


def present(t: Optional[Tensor]) -> Optional[Tensor]:
    """None for an absent optional state (None or the op's empty-tensor stand-in)."""
    return None if t is None or t.numel() == 0 else t


def reference(params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr, beta1, beta2, eps,
              weight_decay, step, maximize, stochastic_rounding, seed, dense_state) -> None:
    scalars = _adamw.AdamWScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    key = _adamw.step_key(seed, step)
    for i, (param, mask, grad) in enumerate(zip(params, masks, grads)):
        flat = param.view(-1)
        pos, slot = _encodings.entries(mask, param.numel(), grad.numel())
        at = pos if dense_state else slot  # compact state is indexed like grads, full-size state by position
        full = [exp_avgs[i], exp_avg_sqs[i], present(masters[i]), present(max_exp_avg_sqs[i])]
        exp_avg, exp_avg_sq, master, max_exp_avg_sq = [None if t is None else t.view(-1)[at] for t in full]
        grad = grad[slot].to(exp_avg.dtype)  # a bf16 compact gradient is upcast exactly
        weight = master.clone() if master is not None else flat[pos].to(grad.dtype)
        weight = _adamw.adamw_update(weight, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, maximize)
        if master is not None:
            master.copy_(weight)
        for target, entries in zip(full, (exp_avg, exp_avg_sq, master, max_exp_avg_sq)):
            if target is not None:
                target.view(-1)[at] = entries
        stochastic = stochastic_rounding and master is None
        flat[pos] = _adamw.to_param_dtype(weight, param.dtype, stochastic, key, i, pos)


def _mask_lists(masks: list[MaskArgs]) -> dict:
    """The masks of one call as the kernels' list arguments (one encoding per call)."""
    return dict(encoding=masks[0].encoding if masks else _encodings.INDEX, mask_indices=[m.index for m in masks],
                mask_offsets=[m.offsets for m in masks], mask_ints=[int(v) for m in masks for v in m.ints])


def _native(params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr, beta1, beta2, eps,
            weight_decay, step, maximize, stochastic_rounding, seed, dense_state) -> None:
    s = _adamw.AdamWScalars.of(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    m = _mask_lists(masks)
    torch.ops.seat_C.sparse_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, m["encoding"], m["mask_indices"],
        m["mask_offsets"], m["mask_ints"], list(s.as_tuple()), maximize, stochastic_rounding,
        _adamw.step_key(seed, step), dense_state)


def _triton(params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, maximize,
            stochastic_rounding, seed, dense_state, step, **hyper) -> None:
    from seat_kernels.sparse_update import sparse_adamw_

    sparse_adamw_(params, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, **_mask_lists(masks),
                  scalars=_adamw.AdamWScalars.of(step=step, **hyper), maximize=maximize,
                  stochastic_rounding=stochastic_rounding, step_key=_adamw.step_key(seed, step),
                  dense_state=dense_state)


ENTRY = _registry.register("sparse_adamw_", reference, {"cpu": _native, "cuda": _native, "triton": _triton})

_OPTIONAL = ("masters", "max_exp_avg_sqs")


def check_hyper(lr, beta1, beta2, eps, weight_decay, step) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"lr must be >= 0; got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {beta}")
    _checks.positive("eps", eps)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    if isinstance(step, bool) or not (isinstance(step, int) and 1 <= step < 2**63):
        raise ValueError(f"step must be an int >= 1 and < 2**63 (the step number after incrementing); got {step!r}")


def state_dtype_for(name: str, param: Tensor, state: Tensor, *, grad: bool = False) -> None:
    """Compact state is float32, or float64 for float64 params (the oracle tests); a
    compact gradient may also be bfloat16 when the state is float32."""
    allowed = (torch.float64,) if param.dtype == torch.float64 else (torch.float32,)
    if grad and param.dtype != torch.float64:
        allowed = (torch.float32, torch.bfloat16)
    if state.dtype not in allowed:
        raise TypeError(f"{name} must be {' or '.join(str(a).replace('torch.', '') for a in allowed)} for a "
                        f"{str(param.dtype).replace('torch.', '')} param; got {str(state.dtype).replace('torch.', '')}")


def check(params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, lr, beta1, beta2, eps,
          weight_decay, step, stochastic_rounding=False, dense_state=False, values: bool = True):
    """Validate everything (masks: MaskArgs); returns the common device (None for empty lists)."""
    lists = {"params": params, "masks": masks, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "masters": masters, "max_exp_avg_sqs": max_exp_avg_sqs}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} tensors but params has {len(params)}; pass one per param")
    check_hyper(lr, beta1, beta2, eps, weight_decay, step)
    encodings = {m.encoding for m in masks}
    if len(encodings) > 1:
        raise ValueError(f"masks mix encodings ({', '.join(_encodings.NAMES.get(e, str(e)) for e in sorted(encodings))}); "
                         "one call steps masks of one encoding: call sparse_adamw_ once per encoding")
    device = None
    spans = []  # (name, tensor, written) of every tensor argument: no written one may share memory
    for i in range(len(params)):
        param = _checks.tensor(f"params[{i}]", params[i], dtypes=_checks.FLOAT_DTYPES)
        grad = _checks.tensor(f"grads[{i}]", grads[i], ndim=1)
        _encodings.check(f"masks[{i}]", masks[i], param.numel(), f"grads[{i}]", grad, values=False)
        named = {f"params[{i}]": param, f"masks[{i}]": masks[i].index, f"masks[{i}].offsets": masks[i].offsets}
        for name in ("grads", "exp_avgs", "exp_avg_sqs", *_OPTIONAL):
            state = lists[name][i]
            if name in _OPTIONAL and present(state) is None:
                if state is not None:  # the op's empty stand-in: still a tensor of the right kind
                    _checks.tensor(f"{name}[{i}]", state, ndim=1)
                continue
            full_size = dense_state and name != "grads"
            _checks.tensor(f"{name}[{i}]", state, ndim=None if full_size else 1)
            state_dtype_for(f"{name}[{i}]", param, state, grad=name == "grads")
            if full_size:
                if state.numel() != param.numel():
                    raise ValueError(f"{name}[{i}] must have params[{i}].numel() = {param.numel()} elements with "
                                     f"dense_state=True; got {state.numel()}")
            else:
                _checks.same_numel(f"{name}[{i}]", state, f"grads[{i}]", grad)
            named[f"{name}[{i}]"] = state
        if device is not None and param.device != device:
            raise ValueError(f"params[{i}] is on {param.device} but params[0] is on {device}; use one device")
        device = _checks.same_device(**named)
        spans += [(name, t, not (name.startswith(("grads", "masks")))) for name, t in named.items()]
        if stochastic_rounding and param.dtype == torch.float16 and present(masters[i]) is None:
            raise ValueError(f"stochastic_rounding supports bfloat16 params; params[{i}] is float16 without a "
                             "master copy: give it masters, or keep stochastic_rounding off")
        if values:
            _encodings.check(f"masks[{i}]", masks[i], param.numel(), f"grads[{i}]", grad, values=True)
    if values:
        _checks.no_aliasing(spans)
    return device


def _masks(mask_indices, mask_offsets, encoding, mask_ints) -> list[MaskArgs]:
    """The op's mask lists as MaskArgs."""
    n = len(mask_indices)
    if len(mask_offsets) != n or len(mask_ints) != _encodings.MASK_INTS * n:
        raise ValueError(f"mask_offsets must have one tensor and mask_ints {_encodings.MASK_INTS} ints per mask "
                         f"({n} masks); got {len(mask_offsets)} and {len(mask_ints)}")
    k = _encodings.MASK_INTS
    return [MaskArgs(encoding, idx, off, tuple(mask_ints[k * i:k * i + k]))
            for i, (idx, off) in enumerate(zip(mask_indices, mask_offsets))]


@torch.library.custom_op(
    "seat::sparse_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs")
)
def _sparse_adamw_op(
    params: List[Tensor], mask_indices: List[Tensor], mask_offsets: List[Tensor], grads: List[Tensor],
    exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], masters: List[Tensor], max_exp_avg_sqs: List[Tensor], *,
    encoding: int, mask_ints: List[int], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0, dense_state: bool = False,
) -> None:
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    masks = _masks(mask_indices, mask_offsets, encoding, mask_ints)
    device = check(params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
                   stochastic_rounding=stochastic_rounding, dense_state=dense_state, **hyper)
    if device is None:  # no parameters: nothing to do
        return
    ENTRY.run(device, params, masks, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, maximize=maximize,
              stochastic_rounding=stochastic_rounding, seed=seed, dense_state=dense_state, **hyper)


@_sparse_adamw_op.register_fake
def _(params, mask_indices, mask_offsets, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *, encoding,
      mask_ints, lr, beta1, beta2, eps, weight_decay, step, maximize=False, stochastic_rounding=False, seed=0,
      dense_state=False):
    check(params, _masks(mask_indices, mask_offsets, encoding, mask_ints), grads, exp_avgs, exp_avg_sqs, masters,
          max_exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
          stochastic_rounding=stochastic_rounding, dense_state=dense_state, values=False)


def absent_as_empty(states, like):
    """None entries -> empty tensors (the op's stand-in); a None list -> all empty."""
    if states is None:
        states = [None] * len(like)
    if not isinstance(states, (list, tuple)):
        return states  # rejected by check() with the argument's name
    return [g.new_empty(0) if t is None else t for t, g in zip(states, like)] + list(states[len(like):])


def sparse_adamw_(
    params, masks, grads, exp_avgs, exp_avg_sqs, masters=None, max_exp_avg_sqs=None, *, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, step: int,
    maximize: bool = False, stochastic_rounding: bool = False, seed: int = 0, dense_state: bool = False,
) -> None:
    """One AdamW step on the masked entries of every param. See the module docstring."""
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)
    if isinstance(grads, (list, tuple)):
        masters = absent_as_empty(masters, grads)
        max_exp_avg_sqs = absent_as_empty(max_exp_avg_sqs, grads)
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"masks must be a list of masks (one per param), got {type(masks).__name__}")
    numels = [p.numel() if isinstance(p, Tensor) else None for p in params] if isinstance(params, (list, tuple)) else []
    args = [_encodings.as_mask_args(f"masks[{i}]", m, numels[i] if i < len(numels) else None)
            for i, m in enumerate(masks)]
    check(params, args, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
          stochastic_rounding=bool(stochastic_rounding), dense_state=bool(dense_state), values=False, **hyper)
    lists = _mask_lists(args)
    torch.ops.seat.sparse_adamw_(list(params), lists["mask_indices"], lists["mask_offsets"], list(grads),
                                 list(exp_avgs), list(exp_avg_sqs), list(masters), list(max_exp_avg_sqs),
                                 encoding=lists["encoding"], mask_ints=lists["mask_ints"], maximize=bool(maximize),
                                 stochastic_rounding=bool(stochastic_rounding), seed=int(seed),
                                 dense_state=bool(dense_state), **hyper)
