"""What SparseAdamW checks before an update writes anything: that updates are allowed
(SparseAdamW.updates_forbidden) and that the gradients are finite (the `nonfinite` option).

nonfinite (a constructor option of SparseAdamW):
  "raise" (default)  a step whose compact gradients hold a NaN or inf raises RuntimeError
                     naming the step and the first offending parameter; params and state
                     are untouched and the gradients stay where they are (zero_grad() to
                     drop them). One non-finite gradient would otherwise turn every entry
                     it reaches into NaN for the rest of training, silently: an error is
                     the safe default.
  "skip"             such a step changes nothing (params, state, step counts), warns, and
                     adds one to the optimizer's `skipped_steps` (saved in state_dict): the
                     loss-scaling practice of skipping an overflowed step.
  "apply"            no check (torch.optim.AdamW's behaviour): the NaN spreads.

The check is one fused reduction per step over the compact gradient buffers (the L2 norm
of each, torch._foreach_norm) and one host sync; see first_nonfinite.

With update_in_backward=True there is no whole step to check: each parameter is updated
in its own gradient hook, before the next parameter's gradient exists. "raise" then checks
each transient compact gradient in its hook and raises before that parameter's update, so
the parameters updated earlier in the same backward keep their update (per tensor, not per
step). "skip" cannot be honoured there and is refused at construction.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

NONFINITE = ("raise", "skip", "apply")


def check_option(nonfinite, update_in_backward: bool) -> None:
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}")
    if nonfinite == "skip" and update_in_backward:
        raise ValueError("nonfinite='skip' needs the whole step's gradients before any update, but "
                         "update_in_backward=True updates each parameter inside its gradient hook: use "
                         "nonfinite='raise' (checked per parameter, before its update) or update_in_backward=False")


def first_nonfinite(grads: list[Tensor]) -> int | None:
    """Position in `grads` of the first tensor holding a NaN or inf, or None.

    One fused reduction per device (the L2 norm of each tensor, torch._foreach_norm, as
    clip_grad_norm_ uses: a NaN or inf entry makes its norm NaN or inf) and one host sync.
    A norm can also overflow on finite entries (|g| above ~1e19): a tensor whose norm is
    not finite is confirmed entry by entry, so the answer is exact. (The max-|g| norm would
    not overflow but is ~1000x slower on CPU.)"""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    flagged = []
    for positions in by_device.values():
        norms = torch._foreach_norm([grads[i] for i in positions], 2)
        finite = torch.isfinite(torch.stack([n.float() for n in norms])).cpu()
        flagged += [positions[j] for j in range(len(positions)) if not finite[j]]
    bad = [i for i in sorted(flagged) if not bool(torch.isfinite(grads[i]).all())]
    return bad[0] if bad else None


def describe(opt, p: Tensor) -> str:
    """p as an error names it: its group, position, name (when the groups hold
    param_names) and shape."""
    group_index, position, group = opt._where(p)
    names = group.get("param_names")
    name = f" {names[position]!r}" if names else ""
    return f"parameter {position}{name} of param group {group_index} (shape {tuple(p.shape)})"


def gate(opt, params: list[Tensor]) -> bool:
    """Whether a step may update `params` (those with a gradient) given opt.nonfinite:
    raises for "raise", warns, counts and returns False for "skip"."""
    group = getattr(opt, "_shard_group", None)  # FSDP2: every rank decides on every rank's shards
    if opt.nonfinite == "apply" or (not params and group is None):
        return True
    bad = first_nonfinite([opt._grads[p] for p in params]) if params else None
    if group is not None:
        from ..distributed._local import first_on_any_rank

        bad = first_on_any_rank(bad, len(params), group)
    if bad is None:
        return True
    p = params[bad]
    step = opt.state[p]["step"] + 1
    if opt.nonfinite == "raise":
        raise RuntimeError(f"SparseAdamW step {step}: the gradient of {describe(opt, p)} holds NaN or inf; "
                           "nothing was updated. Find its cause (a non-finite loss, an fp16 overflow), call "
                           "zero_grad() to drop it, or build the optimizer with nonfinite='skip' to skip such "
                           "steps with a warning")
    opt.skipped_steps += 1
    warnings.warn(f"SparseAdamW step {step} skipped: the gradient of {describe(opt, p)} holds NaN or inf; params "
                  f"and state are unchanged ({opt.skipped_steps} step(s) skipped so far)", RuntimeWarning,
                  stacklevel=3)
    return False


def check_transient(opt, p: Tensor, grad: Tensor) -> None:
    """update_in_backward with nonfinite="raise": p's compact gradient, before p's update."""
    if opt.nonfinite == "raise" and first_nonfinite([grad]) is not None:
        raise RuntimeError(f"SparseAdamW step {opt.state[p]['step'] + 1}: the gradient of {describe(opt, p)} holds "
                           "NaN or inf; its update was not applied (with update_in_backward=True each parameter "
                           "is checked in its own hook: parameters whose hooks ran before were updated)")
