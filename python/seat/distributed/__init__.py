"""seat.distributed: SEAT on several processes with torch.distributed.

Two ways: compact-gradient data parallelism (every rank holds the whole model; below) and
FSDP2 sharding for a model too large for one GPU: ``shard(handle)`` after seat.patch and
before handle.optimizer() (see _fsdp.py).

Compact-gradient data parallelism (see _sync.py): build the same model, SeatConfig and
SparseAdamW on every rank with ``data_parallel=DataParallel(...)``; the model is not
wrapped in DDP. Each step all-reduces only the compact gradients (the trained entries),
in buckets that overlap backward:

    torch.distributed.init_process_group()            # torchrun sets the rank and size
    handle = seat.patch(model, config)
    opt = handle.optimizer(lr=1e-4, data_parallel=DataParallel(reduce="sum"))
    for micro_batches in loader:                       # this rank's share of the batch
        n_ce, n_kl = global_counts(micro_batches)      # tokens of the global batch
        for i, batch in enumerate(micro_batches):
            with opt.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                handle.loss(batch, num_items_in_batch=n_ce, kl_num_items=n_kl).loss.backward()
        opt.step(); opt.zero_grad()
"""
from __future__ import annotations

from ._sync import DEFAULT_BUCKET_BYTES, REDUCTIONS, DataParallel, GradSync
from ._counts import global_counts, global_sum
from ._fsdp import shard

__all__ = ["DEFAULT_BUCKET_BYTES", "REDUCTIONS", "DataParallel", "GradSync", "global_counts", "global_sum", "shard"]
