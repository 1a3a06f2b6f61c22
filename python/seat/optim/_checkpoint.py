"""SparseAdamW.load_state_dict's reading of a checkpoint: every check before anything is
replaced, so a refused state dict leaves the optimizer exactly as it was.

A SparseAdamW state dict is torch's ({"state": {id: {...}}, "param_groups": [...]}) plus
"skipped_steps" (steps skipped for non-finite gradients, nonfinite="skip"). Each param's
state holds exactly:

  step                      a non-negative integer (an int, or torch's 1-element tensor)
  its mask                  under its encoding's keys (seat.masks.STATE_KEYS), equal to this
                            optimizer's mask of the param (the same entries in another
                            encoding pass: state is laid out by entry)
  the moments               as the state format stores them (state.py `layout`): fp32
                            (float64 for float64 params) exp_avg / exp_avg_sq, or 8-bit codes
                            and their block absmax; (size,) with size = the mask's nnz, or
                            the param's numel with dense_state=True
  max_exp_avg_sq            iff the group has amsgrad=True (not with state_bits=8)
  master                    iff the group has master_weights=True and the param is
                            float16 / bfloat16

with finite values (and non-negative second moments and absmax). Tensors are copied onto
the param's device; their dtypes must match exactly (nothing is cast).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import Tensor

from ..distributed._local import local
from ..masks import STATE_KEYS
from ._groups import loaded_group
from ._params import saved_mask, store_mask
from .state import state_dtype

_NONNEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")


def _step(value, where: str) -> int:
    """A saved step as an int (torch.optim keeps it as a float tensor)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{where}: step must be one number; got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: step must be an integer; got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise ValueError(f"{where}: step must be a non-negative integer; got {value}")
    return int(value)


def _expected(opt, p: Tensor, group: dict) -> dict[str, tuple[int, torch.dtype]]:
    """{key: (numel, dtype)} of every state tensor p has under `group`, mask keys aside."""
    dtype = state_dtype(p)
    size = local(p).numel() if opt.dense_state else opt._masks[p].nnz  # an FSDP2 shard's: the rank's rows
    out = opt._format.layout(size, dtype)
    if group["amsgrad"]:
        out["max_exp_avg_sq"] = (size, dtype)
    if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
        out["master"] = (size, dtype)
    return out


def _param_state(opt, p: Tensor, key, saved: Mapping, group: dict, where: str) -> dict:
    """p's checked state, its tensors copied onto p's device."""
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where}: the state must be a dict; got {type(saved).__name__}")
    mask = opt._masks[p]
    if not any(k in saved for k in STATE_KEYS):
        raise ValueError(f"{where} holds no mask: a SparseAdamW state dict saves each param's mask with its "
                         "state (a torch.optim.AdamW state dict holds dense moments, which SparseAdamW does not "
                         "take)")
    theirs = saved_mask(dict(saved), local(p).numel())
    if theirs is None or not (theirs == mask or torch.equal(theirs.indices(), mask.indices())):
        raise ValueError(f"the state_dict's mask for parameter {key} differs from this optimizer's: build the "
                         "optimizer with the masks the checkpoint was trained with")
    quantized = "exp_avg_absmax" in saved or getattr(saved.get("exp_avg"), "dtype", None) == torch.uint8
    if quantized != (opt.state_bits == 8):
        have = "8-bit" if quantized else str(getattr(saved.get("exp_avg"), "dtype", "missing"))
        raise ValueError(f"the state_dict's exp_avg for parameter {key} is {have} but this optimizer has "
                         f"state_bits={opt.state_bits}: build it with the state_bits the checkpoint was saved with")
    expected = _expected(opt, p, group)
    mask_keys = {k for k in saved if k in STATE_KEYS}
    unknown = sorted(set(saved) - set(expected) - mask_keys - {"step"}, key=str)
    missing = sorted(set(expected) - set(saved)) + ([] if "step" in saved else ["step"])
    if unknown or missing:
        mode = (f"state_bits={opt.state_bits}, dense_state={opt.dense_state}, amsgrad={group['amsgrad']}, "
                f"master_weights={group['master_weights']}")
        raise ValueError(f"{where} does not match this optimizer ({mode}): missing {missing}, unexpected "
                         f"{unknown}; load a checkpoint saved by a SparseAdamW built with the same options")
    restored = {"step": _step(saved["step"], where)}
    for name, (numel, dtype) in expected.items():
        t = saved[name]
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != (numel,):
            have = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a {dtype} tensor of shape ({numel},); got {have}")
        t = t.to(p.device, copy=True)
        if dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} holds NaN or inf")
        if name in _NONNEGATIVE and dtype.is_floating_point and bool((t < 0).any()):
            raise ValueError(f"{where}: {name} holds negative values")
        restored[name] = t
    return restored


def read(opt, state_dict) -> tuple[defaultdict, list[dict], int]:
    """(state, param groups without "params", skipped_steps) of `state_dict` for `opt`,
    every part checked; raises ValueError / TypeError naming the part otherwise."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (what state_dict() returns)")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError(f"state_dict['state'] must be a dict; got {type(saved_state).__name__}")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                         f"{len(opt.param_groups)}")
    groups, id_map = [], {}
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"state_dict param group {i} must be a dict with 'params'")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {i} has {len(saved['params'])} params in state_dict, "
                             f"{len(group['params'])} here")
        groups.append(loaded_group(saved, f"state_dict param group {i}"))
        if opt.state_bits == 8 and groups[-1]["amsgrad"]:
            raise ValueError(f"state_dict param group {i} has amsgrad=True, which state_bits=8 does not support")
        for key, p in zip(saved["params"], group["params"]):
            if key in id_map:
                raise ValueError(f"state_dict param group {i} repeats param id {key!r}")
            id_map[key] = (p, groups[-1])
    unknown = [k for k in saved_state if k not in id_map]
    if unknown:
        raise ValueError(f"state_dict['state'] has entries {unknown[:5]} for no param of its param groups")
    state = defaultdict(dict)
    for key, (p, group) in id_map.items():
        where = f"the state_dict's state for parameter {key!r}"
        if key not in saved_state:
            raise ValueError(f"{where} is missing: a SparseAdamW state dict holds every param's state")
        state[p] = _param_state(opt, p, key, saved_state[key], group, where)
        store_mask(state[p], opt._masks[p])  # this optimizer's mask (the saved one is equal)
    skipped = state_dict.get("skipped_steps", 0)
    if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
        raise ValueError(f"state_dict['skipped_steps'] must be a non-negative int; got {skipped!r}")
    return state, groups, skipped
