"""Token counts of the global batch, so that every rank normalizes its CE and KL by the
same numbers and the N-rank step equals the one-process step on the whole batch."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def global_sum(values: Sequence[int], group=None) -> list[int]:
    """The sums over all ranks of each of ``values`` (ints), in one all-reduce; the values
    themselves when torch.distributed is not initialized (one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend(group)) \
        else torch.device("cpu")
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, group=group)
    return [int(v) for v in t.tolist()]


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
