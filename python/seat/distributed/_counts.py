"""Token counts of the global batch, so that every rank normalizes its CE and KL by the
same numbers and the N-rank step equals the one-process step on the whole batch."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def comm_device(group=None) -> torch.device:
    """Where small control tensors are all-reduced: the GPU with NCCL, the CPU with gloo."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(values: Sequence, group=None, dtype: torch.dtype = torch.int64) -> list:
    """The sums over all ranks of each of ``values`` (ints, or floats with
    dtype=torch.float64), in one all-reduce; the values themselves when torch.distributed
    is not initialized (one process)."""
    import torch.distributed as dist

    cast = float if dtype.is_floating_point else int
    if not (dist.is_available() and dist.is_initialized()):
        return [cast(v) for v in values]
    t = torch.tensor([cast(v) for v in values], dtype=dtype, device=comm_device(group))
    dist.all_reduce(t, group=group)
    return [cast(v) for v in t.tolist()]


def global_counts(micro_batches: Sequence[Mapping[str, Tensor]], group=None) -> tuple[int, int]:
    """(CE label tokens, KL positions) of the global batch: this rank's micro-batches of one
    optimizer step summed over all ranks. Pass them to handle.loss as num_items_in_batch
    and kl_num_items (with DataParallel(reduce="sum"))."""
    from ..data import IGNORE_INDEX
    from ..loss import kl_row_mask

    ce = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    kl = sum(int(kl_row_mask(b).sum()) for b in micro_batches)
    ce, kl = global_sum([ce, kl], group)
    return ce, kl
