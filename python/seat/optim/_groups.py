"""The hyperparameters of SparseAdamW's param groups: their defaults and one check, used at
construction (every group) and by load_state_dict (every saved group, before anything is
replaced).

A group holds torch.optim.AdamW's keys (lr, betas, eps, weight_decay, amsgrad, maximize,
foreach, capturable, differentiable, fused, decoupled_weight_decay) and SparseAdamW's own
(master_weights, stochastic_rounding), plus whatever else a caller or a scheduler put there
(initial_lr, param_names, ...), which is kept as it is.

Of torch's implementation switches, SparseAdamW runs its own kernels whatever `foreach`
says (the result is the same AdamW step) and refuses the ones it cannot honour:
capturable=True (CUDA-graph capture of step(): the step count and the hyperparameters are
host numbers here), differentiable=True (step() is not differentiable: the kernels run
under no_grad) and fused=True (torch's fused kernel takes no masks; SparseAdamW's step is
already one fused kernel per encoding).
"""
from __future__ import annotations

import copy
import math

from torch import Tensor

# What torch.optim.AdamW.__setstate__ gives a group that lacks the key (a state dict of an
# older version): load_state_dict does the same.
TORCH_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                      fused=None, decoupled_weight_decay=True)
# SparseAdamW's own group keys, at their constructor defaults.
SEAT_DEFAULTS = dict(master_weights=False, stochastic_rounding=False)
# Without these a group cannot step: a saved group lacking one is refused.
REQUIRED = ("lr", "betas", "eps", "weight_decay")
_BOOLS = ("amsgrad", "maximize", "master_weights", "stochastic_rounding")


def scalar(value) -> float:
    """A hyperparameter as a Python float (a 1-element tensor lr or beta is read at each step)."""
    return float(value.item() if isinstance(value, Tensor) else value)


def _number(where: str, name: str, value, *, low: float, low_open: bool = False, high: float | None = None) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{where}: {name} as a tensor must hold one floating-point element; got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        ok_type = True
    if not ok_type:
        raise TypeError(f"{where}: {name} must be a number; got {type(value).__name__}")
    v = scalar(value)
    below = v <= low if low_open else v < low
    if not math.isfinite(v) or below or (high is not None and v >= high):
        rule = f"in [{low:g}, {high:g})" if high is not None else f"{'>' if low_open else '>='} {low:g}"
        raise ValueError(f"{where}: {name} must be {rule} (and finite); got {v}")


def check_group(group: dict, where: str) -> None:
    """Refuse a group whose hyperparameters SparseAdamW cannot step with, naming `where`
    (e.g. "param group 0") and the key."""
    missing = [k for k in REQUIRED if k not in group]
    if missing:
        raise ValueError(f"{where} has no {', '.join(missing)}: a SparseAdamW / torch.optim.AdamW param group "
                         "holds lr, betas, eps and weight_decay")
    _number(where, "lr", group["lr"], low=0.0)
    betas = group["betas"]
    if isinstance(betas, Tensor) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2); got {betas!r}")
    for i, beta in enumerate(betas):
        _number(where, f"betas[{i}]", beta, low=0.0, high=1.0)
    _number(where, "eps", group["eps"], low=0.0, low_open=True)
    _number(where, "weight_decay", group["weight_decay"], low=0.0)
    for key in _BOOLS:
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{where}: {key} must be True or False; got {group[key]!r}")
    if group.get("foreach") not in (None, True, False):
        raise TypeError(f"{where}: foreach must be None, True or False; got {group['foreach']!r}")
    if group.get("capturable", False) is not False:
        raise ValueError(f"{where}: capturable=True is not supported: SparseAdamW's step count and "
                         "hyperparameters are host numbers, so step() cannot be captured in a CUDA graph; "
                         "leave capturable=False")
    if group.get("differentiable", False) is not False:
        raise ValueError(f"{where}: differentiable=True is not supported: SparseAdamW's step runs its kernels "
                         "under no_grad; leave differentiable=False")
    if group.get("fused") not in (None, False):
        raise ValueError(f"{where}: fused=True selects torch's fused AdamW kernel, which takes no masks; "
                         "SparseAdamW's step is already one fused kernel: leave fused=None")
    if group.get("decoupled_weight_decay", True) is not True:
        raise ValueError(f"{where}: decoupled_weight_decay=False is Adam with L2 regularization, not AdamW; "
                         "SparseAdamW only decouples weight decay")


def loaded_group(saved: dict, where: str) -> dict:
    """A saved group as load_state_dict installs it (without "params"): the saved keys,
    torch's and SparseAdamW's defaults for the keys it lacks, checked."""
    group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})  # a tensor lr is not shared
    for key, default in {**TORCH_DEFAULTS, **SEAT_DEFAULTS}.items():
        group.setdefault(key, default)
    check_group(group, where)
    return group
