"""sparse_adamw_: one AdamW step on the masked entries of many parameters.

For each i: the entries param_i.view(-1)[idx_i] take an AdamW step (decoupled weight
decay, bias correction; amsgrad when max_exp_avg_sqs is given) with the compact state;
every other entry of param_i is left untouched, bit for bit. Math and order of
operations follow torch.optim.AdamW's single-tensor path.

Shapes and dtypes (lists of equal length; all tensors on one device, contiguous):
  params          (any)    float16 / bfloat16 / float32 / float64; updated in place.
  idxs            (nnz_i,) int32, sorted, unique, in [0, params[i].numel()).
  grads           (nnz_i,) float32 (float64 in tests): compact gradients.
  exp_avgs        (nnz_i,) grads' dtype; updated in place.
  exp_avg_sqs     (nnz_i,) grads' dtype; updated in place.
  masters         per param None or (nnz_i,) grads' dtype: full-precision copy of the
                  entries; when given, the step is taken on it and param gets its
                  rounded value. None (the whole list) = no masters.
  max_exp_avg_sqs per param None or (nnz_i,) grads' dtype: the amsgrad running maximum
                  (amsgrad for the params that have one). None (the whole list) = none.
The torch op (torch.ops.seat.sparse_adamw_) takes an empty tensor where the Python API
takes None: torch's functionalization (torch.compile) cannot handle None entries in a
mutated tensor list. An entry with nnz_i == 0 changes nothing either way.
  step            the step number after incrementing (1 for the first step).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import _checks, _registry


def _present(t: Optional[Tensor]) -> Optional[Tensor]:
    """None for an absent optional state (None or the op's empty-tensor stand-in)."""
    return None if t is None or t.numel() == 0 else t


def reference(
    params: List[Tensor], idxs: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor], masters: List[Tensor], max_exp_avg_sqs: List[Tensor],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, maximize: bool,
) -> None:
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    step_size = lr / bias_correction1
    for i, (param, idx, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, idxs, grads, exp_avgs, exp_avg_sqs)):
        flat, index = param.view(-1), idx.long()
        master, max_exp_avg_sq = _present(masters[i]), _present(max_exp_avg_sqs[i])
        weight = master.clone() if master is not None else flat[index].to(grad.dtype)
        g = -grad if maximize else grad
        weight.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if max_exp_avg_sq is not None:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-step_size)
        if master is not None:
            master.copy_(weight)
        flat[index] = weight.to(param.dtype)


ENTRY = _registry.register("sparse_adamw_", reference, {})


def check(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *,
          lr, beta1, beta2, eps, weight_decay, step, values: bool = True) -> None:
    lists = {"params": params, "idxs": idxs, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "masters": masters, "max_exp_avg_sqs": max_exp_avg_sqs}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} tensors but params has {len(params)}; pass one per param")
    if not 0.0 <= lr:
        raise ValueError(f"lr must be >= 0; got {lr}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {beta}")
    _checks.positive("eps", eps)
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"step must be an int >= 1 (the step number after incrementing); got {step!r}")
    device = None
    for i in range(len(params)):
        param = _checks.tensor(f"params[{i}]", params[i], dtypes=_checks.FLOAT_DTYPES)
        idx = _checks.index_tensor(f"idxs[{i}]", idxs[i], param.numel())
        grad = _checks.tensor(f"grads[{i}]", grads[i], dtypes=_checks.ACCUM_DTYPES, ndim=1)
        _checks.same_numel(f"grads[{i}]", grad, f"idxs[{i}]", idx)
        states = {}
        for name in ("exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs"):
            if name in ("masters", "max_exp_avg_sqs") and _present(lists[name][i]) is None:
                if lists[name][i] is not None:
                    _checks.tensor(f"{name}[{i}]", lists[name][i], dtypes=(grad.dtype,), ndim=1)
                continue  # optional per param
            state = _checks.tensor(f"{name}[{i}]", lists[name][i], dtypes=(grad.dtype,), ndim=1)
            _checks.same_numel(f"{name}[{i}]", state, f"idxs[{i}]", idx)
            states[f"{name}[{i}]"] = state
        device = _checks.same_device(**{"params[0]": params[0], f"params[{i}]": param, f"idxs[{i}]": idx,
                                        f"grads[{i}]": grad, **states})
        if values:
            _checks.index_values(f"idxs[{i}]", idx, param.numel())
    return device


@torch.library.custom_op(
    "seat::sparse_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters", "max_exp_avg_sqs")
)
def _sparse_adamw_op(
    params: List[Tensor], idxs: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor], masters: List[Tensor], max_exp_avg_sqs: List[Tensor],
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int, maximize: bool = False,
) -> None:
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    device = check(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, **hyper)
    if device is None:  # no parameters: nothing to do
        return
    ENTRY.run(device, params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs,
              maximize=maximize, **hyper)


@_sparse_adamw_op.register_fake
def _(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, *,
      lr, beta1, beta2, eps, weight_decay, step, maximize=False):
    check(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, lr=lr, beta1=beta1,
          beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, values=False)


def sparse_adamw_(
    params, idxs, grads, exp_avgs, exp_avg_sqs, masters=None, max_exp_avg_sqs=None, *,
    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    step: int, maximize: bool = False,
) -> None:
    """One AdamW step on the masked entries of every param. See the module docstring."""
    hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                 weight_decay=float(weight_decay), step=step)
    no_entries = [None] * len(params) if isinstance(params, (list, tuple)) else None
    masters = no_entries if masters is None else masters
    max_exp_avg_sqs = no_entries if max_exp_avg_sqs is None else max_exp_avg_sqs
    check(params, idxs, grads, exp_avgs, exp_avg_sqs, masters, max_exp_avg_sqs, values=False, **hyper)

    def absent_as_empty(states):
        return [g.new_empty(0) if t is None else t for t, g in zip(states, grads)]

    torch.ops.seat.sparse_adamw_(list(params), list(idxs), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                 absent_as_empty(masters), absent_as_empty(max_exp_avg_sqs),
                                 maximize=bool(maximize), **hyper)
