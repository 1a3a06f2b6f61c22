"""SparseAdamW's state under FSDP2 in the one-process format, so that a checkpoint of N
sharded ranks resumes on any number of ranks, sharded or not.

Each rank holds the state of its rows' entries: the slots [s0, s1) of every trained
weight's whole mask (dense_state: the flat positions [lo, hi)). ``whole_state_dict``
gathers them to rank 0 in rank order, which is slot order, and gives what one process's
SparseAdamW.state_dict() gives for the unsharded model: the whole masks and compact
arrays. ``local_state_dict`` cuts such a dict to this rank's slots for load_state_dict.
8-bit state travels as its fp32 moments and is quantized again for the blocks of the
receiving layout (the whole arrays', or the rank's entries'), so an 8-bit state resumed
under another sharding equals the saved one to the 8-bit quantization error, not bit for
bit.
"""
from __future__ import annotations

import types

import torch

from ..masks import STATE_KEYS, as_mask, encode_chosen, from_spec, mask_indices
from ._fsdp import agree

SHARD = "seat_shard_state"  # marks one rank's state dict (a sharded optimizer's state_dict())


def _params(opt) -> list:
    return [p for group in opt.param_groups for p in group["params"]]


def _fp32(opt, state: dict) -> dict:
    """A CPU copy of a param's state tensors with the moments in fp32, mask keys dropped."""
    copy = {k: v for k, v in state.items() if k not in STATE_KEYS}
    opt._format.to_fp32(copy)
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in copy.items()}


def whole_state_dict(opt) -> dict | None:
    """The one-process state dict of a sharded SparseAdamW, on rank 0 (None on the
    others). A collective: every rank of the shard group calls it."""
    import torch.distributed as dist

    group = opt._shard_group
    missing = [i for i, p in enumerate(_params(opt)) if p not in opt._shards]
    if missing:
        raise ValueError(f"params at position {missing[:5]} have no shard record: build the optimizer of a sharded "
                         "model with handle.optimizer() after seat.distributed.shard(handle)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = opt.state_dict()  # this rank's: the groups and options, its own slots' state
    out.pop(SHARD, None)
    mine = {}
    for i, p in enumerate(_params(opt)):
        info = opt._shards[p]
        positions = None if info.spec is not None else (mask_indices(opt._masks[p]).long() + info.lo).int().cpu()
        mine[i] = (_fp32(opt, opt.state[p]), positions)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=dist.get_global_rank(group, 0), group=group)
    error = None
    if rank == 0:
        try:
            _assemble(opt, out, gathered)
        except Exception as e:  # every rank raises it (agree): none goes on to wait for rank 0
            error = e
    agree(types.SimpleNamespace(group=group, world_size=world), error)
    return out if rank == 0 else None


def _assemble(opt, out: dict, gathered: list) -> None:
    """Put the whole state of every param, from the ranks' `gathered` parts, into out["state"]."""
    for i, p in enumerate(_params(opt)):
        info, parts = opt._shards[p], [g[i] for g in gathered]
        steps = {part[0]["step"] for part in parts}
        if len(steps) != 1:
            raise RuntimeError(f"the ranks' optimizer steps of parameter {i} differ ({sorted(steps)}): the shards "
                               "trained apart")
        entry = {"step": steps.pop()}
        for key, value in parts[0][0].items():
            if isinstance(value, torch.Tensor):
                entry[key] = torch.cat([part[0][key] for part in parts])
        whole = from_spec(info.spec) if info.spec is not None else as_mask(
            torch.cat([part[1] for part in parts]), info.numel, f"parameter {i}")
        if info.spec is None and opt._masks[p].encoding != "int32":
            whole = as_mask(encode_chosen(whole.indices(), info.numel, opt._masks[p].encoding), info.numel)
        entry.update(whole.state_dict())
        opt._format.from_fp32(entry)
        out["state"][i] = entry


def local_state_dict(opt, state_dict: dict) -> dict:
    """`state_dict` (a whole one: from one process, or whole_state_dict) cut to this rank's
    slots, in the form this sharded optimizer's own state_dict() has."""
    from ..optim._params import saved_mask

    params = _params(opt)
    index = {}
    for group in state_dict.get("param_groups", []):
        index.update({key: position for position, key in enumerate(group.get("params", []), len(index))})
    out = {k: v for k, v in state_dict.items() if k != "state"}
    out["state"] = {}
    for key, saved in state_dict.get("state", {}).items():
        position = index.get(key)
        if position is None or position >= len(params) or not isinstance(saved, dict):
            out["state"][key] = saved  # for load_state_dict's checks to name
            continue
        p = params[position]
        info = opt._shards.get(p)
        if info is None:
            raise ValueError("this sharded optimizer has no shard record: build it with handle.optimizer() after "
                             "seat.distributed.shard(handle) to load a whole state dict")
        whole = saved_mask(dict(saved), info.numel)
        if whole is None:
            raise ValueError(f"the state_dict's state for parameter {key!r} holds no valid mask of its "
                             f"{info.numel}-element weight: load a state dict of this model's optimizer")
        s0, s1 = whole.slots_in(info.lo, info.hi)
        if s1 - s0 != opt._masks[p].nnz or not torch.equal(whole.positions_in(info.lo, info.hi).to(
                mask_indices(opt._masks[p]).device), mask_indices(opt._masks[p])):
            raise ValueError(f"the state_dict's mask for parameter {key!r} differs from this optimizer's: build "
                             "the optimizer with the masks the checkpoint was trained with")
        values = _fp32(opt, saved)
        lo, hi = (info.lo, info.hi) if opt.dense_state else (s0, s1)
        entry = {k: (v[lo:hi].clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        opt._format.from_fp32(entry)
        entry.update(opt._masks[p].state_dict())
        out["state"][key] = entry
    return out
