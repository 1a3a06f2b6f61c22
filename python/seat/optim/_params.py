"""The params of SparseAdamW and their masks: each param checked, its mask normalized to
a seat.masks Mask (validated against the param) and kept in the param's optimizer state
under its encoding's keys (seat.masks.STATE_KEYS), which checkpoints hold."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..distributed._local import local
from ..masks import STATE_KEYS, Mask, as_mask, from_state_dict
from ..ops import _checks


def _check_param(name: str, param: Tensor) -> None:
    if not isinstance(param, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(param).__name__}")
    if param.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {param.dtype}")
    if not local(param).is_contiguous():
        raise ValueError(f"{name} must be contiguous: the mask indexes its flat storage; "
                         "make the parameter contiguous before building its mask")
    if not param.is_leaf or not param.requires_grad:
        raise ValueError(f"{name} must be a leaf tensor with requires_grad=True (a trainable parameter)")


def store_mask(state: dict, mask: Mask) -> None:
    """The mask in a param's state (what state_dict saves and load_state_dict compares):
    its encoding's keys (seat.masks.STATE_KEYS), none of another's."""
    for key in STATE_KEYS:
        state.pop(key, None)
    state.update(mask.state_dict())


def saved_mask(saved: dict, numel: int):
    """The mask a checkpoint's state entry holds, or None when its keys hold no valid mask
    of a tensor of `numel` elements (which differs from any mask)."""
    try:
        return from_state_dict(saved, numel)
    except (TypeError, ValueError):
        return None


def resolve_masks(params: list[Tensor], masks) -> dict[Tensor, Mask]:
    """Each param's mask as a seat.masks Mask, validated against the param."""
    if isinstance(masks, Mapping):
        by_id = {id(p): m for p, m in masks.items()}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"masks has no entry for parameter(s) at position {missing}; give every "
                             "parameter a mask (seat.masks.random_mask(p, 1.0, seed=0) trains all entries)")
        resolved = [by_id[id(p)] for p in params]
    else:
        resolved = list(masks)
        if len(resolved) != len(params):
            raise ValueError(f"masks has {len(resolved)} entries for {len(params)} parameters; pass one per "
                             "parameter, in order, or a mapping param -> idx")
    out = {}
    for i, (p, given) in enumerate(zip(params, resolved)):
        _check_param(f"params[{i}]", p)
        name = f"masks[{i}]"
        # two checks as_mask words for any tensor, worded here for a parameter (Mask: the
        # seat.masks protocol, whatever the encoding)
        if isinstance(given, Tensor) and given.dtype == torch.bool and given.shape != p.shape:
            raise ValueError(f"{name} is a bool mask of shape {tuple(given.shape)}; its parameter has "
                             f"shape {tuple(p.shape)}")
        numel = local(p).numel()  # an FSDP2 shard's mask covers the rank's rows
        if isinstance(given, Mask) and given.numel != numel:
            raise ValueError(f"{name} ({type(given).__name__}) covers {given.numel} elements; its "
                             f"parameter has {numel}")
        mask = as_mask(given, numel, name)
        if mask.device != p.device:
            raise ValueError(f"{name} is on {mask.device} but its parameter is on {p.device}")
        out[p] = mask
    return out
