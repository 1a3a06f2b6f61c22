"""The tensor a kernel may read and write for a parameter or gradient that FSDP2 sharded.

FSDP2 (torch.distributed.fsdp.fully_shard) makes each parameter a DTensor sharded along
dim 0, and its gradient a DTensor of the same shard. seat's kernels and masks work on
plain tensors: the rank's own rows, ``_local_tensor``, a view of FSDP2's sharded storage
(writing it in place changes the parameter, as FSDP2's own optimizer step does). This
module never imports torch.distributed.tensor: no DTensor can exist before it is imported.
"""
from __future__ import annotations

import sys

from torch import Tensor


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """`t`'s local shard (a plain tensor sharing its storage) when `t` is a DTensor, else `t`."""
    return t._local_tensor if is_dtensor(t) else t


def shard_group(params, data_parallel=None):
    """The process group over which `params` are sharded (FSDP2: every param a DTensor on
    one 1-D mesh), or None for plain params. Mixed plain and sharded params, several
    meshes, or data_parallel with sharded params are refused: each would leave some
    gradient unreduced or reduced twice."""
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        plain = [i for i, s in enumerate(sharded) if not s]
        raise ValueError(f"params at position {plain[:5]} are plain tensors and the others FSDP2-sharded DTensors: "
                         "build SparseAdamW over the parameters of one sharded model (handle.optimizer() after "
                         "seat.distributed.shard(handle))")
    # compared by value: FSDP2 gives some parameters (fused expert tensors, say) equal
    # meshes (one layout, one group) that are distinct objects
    meshes = {p.device_mesh for p in params}
    if len(meshes) > 1 or next(iter(meshes)).ndim != 1:
        raise ValueError("SparseAdamW takes parameters sharded on one 1-D device mesh (FSDP2's default)")
    if data_parallel is not None:
        raise ValueError("data_parallel is for unsharded models; FSDP2 already reduces the sharded parameters' "
                         "gradients: drop data_parallel")
    return params[0].device_mesh.get_group()


def global_norm(total: Tensor, norm_type: float, group) -> Tensor:
    """The norm over every rank's shard from this rank's `total` (a 0-dim tensor)."""
    import math

    import torch.distributed as dist

    from ._counts import comm_device

    t = total.detach().double().to(comm_device(group))
    if math.isinf(norm_type):
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.to(total.device, total.dtype)
    t = t ** norm_type
    dist.all_reduce(t, group=group)
    return (t ** (1.0 / norm_type)).to(total.device, total.dtype)


def first_on_any_rank(position: int | None, count: int, group) -> int | None:
    """The smallest of the ranks' `position`s (None: none on that rank; positions index a
    list of `count` items every rank shares), so that every rank decides alike."""
    import torch
    import torch.distributed as dist

    from ._counts import comm_device

    t = torch.tensor([count if position is None else position], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    found = int(t.item())
    return None if found >= count else found
