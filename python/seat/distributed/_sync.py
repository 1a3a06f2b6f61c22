"""Compact-gradient data parallelism: SparseAdamW's compact gradients all-reduced in buckets.

Every rank holds the whole model and its own SparseAdamW over the same masks. A rank's
gradient hooks gather each parameter's masked entries into its compact buffer, as on one
process (seat.optim.grads); GradSync then all-reduces those buffers instead of DDP's
dense gradients: nnz entries per parameter in the gradient dtype (4 bytes, or 2 with
grad_dtype=torch.bfloat16) where DDP moves every entry.

Buckets. The parameters are split, in reverse optimizer order (roughly the order in
which backward produces their gradients, as DDP assumes), into buckets of at most
``bucket_bytes`` of compact gradient of one dtype and device. When every parameter of a
bucket has had its hook in the current backward, the bucket is copied into one flat
tensor and all-reduced asynchronously, overlapping the rest of backward; buckets start
strictly in index order, so every rank issues the same collectives in the same order
even when they finish their parameters in a different order. ``finish()`` (from step()
and clip_grad_norm_) starts the buckets not started yet (a parameter that had no
gradient in this backward, or no synchronized backward at all), waits for all, copies
the sums back into the compact buffers (scaled by 1/world_size for ``reduce="mean"``),
then all-reduces which parameters had a gradient on any rank, so every rank steps the
same parameters. The flat copies are the only extra memory: one per bucket in flight.
zero_grad() without a step after a synchronized backward starts the buckets not started
yet too, so the ranks' all-reduces stay paired for the next step (a rank's synchronized
backward must then reach at least one trained parameter, as it does with one model).

Micro-batches. Inside ``no_sync()`` the hooks only accumulate (nothing is sent); the
first backward outside it sends the accumulated sums. So a step of k micro-batches
communicates once, like DDP's no_sync. A second synchronized backward before the step
would send the first one's sum again and is refused.

update_in_backward: each parameter's transient compact gradient is all-reduced inside its
hook (synchronously: its update needs the sum) before the non-finite check and the
update, so every rank applies the same update. Every rank must then produce gradients
for the same parameters in the same order (as DDP without find_unused_parameters);
step() checks that the ranks updated the same parameters (a one-byte-per-parameter
all-reduce) and raises if not.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._counts import comm_device

if TYPE_CHECKING:  # the optimizer imports this module lazily
    from ..optim.sparse_adamw import SparseAdamW

REDUCTIONS = ("mean", "sum")
DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """How SparseAdamW synchronizes compact gradients across processes.

    group: the torch.distributed process group (None: the default group).
    reduce: "mean" (the average of the ranks' gradients, as DDP: each rank's loss is
      normalized by its own tokens) or "sum" (each rank's loss is already normalized by the
      global batch's token counts, e.g. seat.distributed.global_counts; SeatTrainer does
      this, so the trajectory does not depend on the number of ranks).
    bucket_bytes: the most compact-gradient bytes per all-reduce (one parameter larger
      than this gets a bucket of its own).
    """

    group: object = None
    reduce: str = "mean"
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"DataParallel reduce must be 'mean' (average the ranks' gradients, as DDP) or 'sum' "
                             f"(losses normalized by global token counts); got {self.reduce!r}")
        if isinstance(self.bucket_bytes, bool) or not isinstance(self.bucket_bytes, int) or self.bucket_bytes < 1:
            raise ValueError(f"DataParallel bucket_bytes must be a positive int (bytes of compact gradient per "
                             f"all-reduce, e.g. 25 * 2**20); got {self.bucket_bytes!r}")


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("data_parallel needs torch.distributed initialized: launch with torchrun (or accelerate "
                         "launch) and call torch.distributed.init_process_group() before building the optimizer, "
                         "or drop data_parallel for one process")
    return dist


def check_config(data_parallel, compact_grads: bool) -> None:
    """SparseAdamW's data_parallel argument, checked before the optimizer registers its
    hooks on the params (a refused optimizer must leave none behind)."""
    if not isinstance(data_parallel, DataParallel):
        raise ValueError(f"data_parallel must be None or a seat.distributed.DataParallel; got "
                         f"{type(data_parallel).__name__}")
    if not compact_grads:
        raise ValueError("data_parallel all-reduces the compact gradients the hooks gather: it needs "
                         "compact_grads=True")
    dist = _dist()
    if data_parallel.group is not None and dist.get_rank(data_parallel.group) < 0:
        raise ValueError(f"rank {dist.get_rank()} is not in DataParallel's group: build the data-parallel "
                         "optimizer on the group's ranks only (torch.distributed.new_group gives the other ranks "
                         "a placeholder group)")


@dataclasses.dataclass
class _Bucket:
    params: list[Tensor]
    dtype: torch.dtype
    device: torch.device
    numel: int
    pending: set = dataclasses.field(default_factory=set)  # ids of params whose hook has not run yet


class GradSync:
    """The runtime of DataParallel for one SparseAdamW (see the module docstring).

    ``grad_bytes`` counts the gradient payload all-reduced so far (the flat buckets, or
    the transient gradients with update_in_backward), ``control_bytes`` the small
    "which parameters have a gradient" exchanges; ``last_step_grad_bytes`` the payload
    of the last finished step.
    """

    def __init__(self, opt: "SparseAdamW", config: DataParallel):
        self.dist = _dist()
        self.config = config
        self.group = config.group
        self.world_size = self.dist.get_world_size(self.group)
        self.rank = self.dist.get_rank(self.group)
        self.paused = 0  # depth of no_sync() blocks
        self.grad_bytes = 0
        self.control_bytes = 0
        self.last_step_grad_bytes = 0
        self._step_bytes = 0
        self.plan(opt)

    # ------------------------------------------------------------------ set-up
    def plan(self, opt: "SparseAdamW") -> None:
        """Split the params into buckets and check that every rank has the same ones
        (shapes, masks, dtypes, options): a rank that differs would exchange other
        entries, silently."""
        params = [p for group in opt.param_groups for p in group["params"]]
        self.params = params
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[int, int] = {}
        if not opt._gradients.in_backward:
            for p in reversed(params):
                dtype, nnz = opt._gradients.dtype(p), opt._masks[p].nnz
                size = nnz * dtype.itemsize
                last = self.buckets[-1] if self.buckets else None
                if (last is None or last.dtype != dtype or last.device != p.device
                        or (last.numel * dtype.itemsize + size > self.config.bucket_bytes and last.params)):
                    last = _Bucket([], dtype, p.device, 0)
                    self.buckets.append(last)
                last.params.append(p)
                last.numel += nnz
                self.bucket_of[id(p)] = len(self.buckets) - 1
        self._reset()
        self._check_same_everywhere(opt)

    def _check_same_everywhere(self, opt) -> None:
        fingerprint = _fingerprint(opt, self)
        device = comm_device(self.group)
        both = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=device)
        self.dist.all_reduce(both, op=self.dist.ReduceOp.MAX, group=self.group)
        if int(both[0]) != fingerprint or int(both[1]) != -fingerprint:
            raise ValueError(f"rank {self.rank}: the SparseAdamW of the ranks differ (parameter shapes, masks, "
                             "dtypes, data-parallel options or lean modes): every rank must build the same model, "
                             "SeatConfig (mask seed included) and optimizer options")

    def _reset(self) -> None:
        for b in self.buckets:
            b.pending = {id(p) for p in b.params}
        self.next_bucket = 0  # index of the next bucket to start
        self.in_flight: list[tuple[_Bucket, Tensor, object]] = []
        self.synced_backward = False  # a synchronized backward ran since the last finish / zero
        self.finished = False

    # ------------------------------------------------------------------ backward
    def ready(self, opt, p: Tensor) -> None:
        """p's compact buffer holds this backward's gradient: start its bucket if it is
        complete (and every earlier bucket has started)."""
        if self.paused:
            return
        if self.finished:
            raise RuntimeError("a backward after the gradients were synchronized (by clip_grad_norm_ or step) and "
                               "before zero_grad(): call optimizer.zero_grad() after each step; accumulate "
                               "micro-batches inside optimizer.no_sync()")
        bucket = self.buckets[self.bucket_of[id(p)]]
        if id(p) not in bucket.pending:
            raise RuntimeError("a second synchronized backward before optimizer.step(): its all-reduce would add "
                               "the earlier micro-batches' sums again. Run every micro-batch but the last inside "
                               "optimizer.no_sync()")
        self.synced_backward = True
        bucket.pending.discard(id(p))
        while self.next_bucket < len(self.buckets) and not self.buckets[self.next_bucket].pending:
            self._start(opt, self.buckets[self.next_bucket])
            self.next_bucket += 1

    def _start(self, opt, bucket: _Bucket) -> None:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device=bucket.device)
        offset = 0
        for p in bucket.params:
            n = opt._masks[p].nnz
            if opt._has_grad[p]:
                flat[offset:offset + n].copy_(opt._grads[p])
            else:
                flat[offset:offset + n].zero_()
            offset += n
        work = self.dist.all_reduce(flat, group=self.group, async_op=True)
        self.in_flight.append((bucket, flat, work))
        self._step_bytes += flat.numel() * flat.element_size()

    def reduce_now(self, grad: Tensor) -> None:
        """update_in_backward: all-reduce one transient compact gradient in place."""
        if self.paused:
            raise RuntimeError("optimizer.no_sync() accumulates gradients over micro-batches, which "
                               "update_in_backward=True cannot do (each update is applied in backward)")
        self.dist.all_reduce(grad, group=self.group)
        if self.config.reduce == "mean":
            grad.div_(self.world_size)
        self.grad_bytes += grad.numel() * grad.element_size()

    # ------------------------------------------------------------------ step
    def finish(self, opt) -> None:
        """Start the remaining buckets, wait for every one, copy the sums back, agree on
        which params have a gradient. Idempotent until the next zero_grad()."""
        if opt._gradients.in_backward:
            self._check_same_updates(opt)
            return
        if self.finished:
            return
        while self.next_bucket < len(self.buckets):
            self._start(opt, self.buckets[self.next_bucket])
            self.next_bucket += 1
        for bucket, flat, work in self.in_flight:
            work.wait()
            if self.config.reduce == "mean":
                flat.div_(self.world_size)
            offset = 0
            for p in bucket.params:
                n = opt._masks[p].nnz
                opt._grads[p].copy_(flat[offset:offset + n])
                offset += n
        self.in_flight = []
        device = comm_device(self.group)
        flags = torch.tensor([opt._has_grad[p] for p in self.params], dtype=torch.uint8, device=device)
        self.dist.all_reduce(flags, op=self.dist.ReduceOp.MAX, group=self.group)
        self.control_bytes += flags.numel()
        for p, flag in zip(self.params, flags.tolist()):
            opt._has_grad[p] = bool(flag)
        self.grad_bytes += self._step_bytes
        self.last_step_grad_bytes, self._step_bytes = self._step_bytes, 0
        self.finished = True

    def _check_same_updates(self, opt) -> None:
        """update_in_backward, at step(): every rank must have updated the same params. A
        rank whose backward reached other params paired its all-reduces with other params'
        on the other ranks (silently when their sizes match): raise rather than go on."""
        device = comm_device(self.group)
        flags = torch.tensor([opt._has_grad[p] for p in self.params], dtype=torch.uint8, device=device)
        both = torch.cat([flags, 1 - flags])  # MAX of both: 1 and 1 where the ranks differ
        self.dist.all_reduce(both, op=self.dist.ReduceOp.MAX, group=self.group)
        self.control_bytes += both.numel()
        n = len(self.params)
        differ = [i for i, (a, b) in enumerate(zip(both[:n].tolist(), both[n:].tolist())) if a and b]
        if differ:
            raise RuntimeError(f"rank {self.rank}: the ranks updated different parameters in this step (positions "
                               f"{differ} on some ranks only). With update_in_backward=True each gradient is "
                               "all-reduced inside its hook, so every rank's backward must reach the same parameters "
                               "in the same order, or the all-reduces pair different parameters' gradients (the "
                               "ranks' weights now differ). For parameters that only some ranks' data reach, build "
                               "the optimizer with update_in_backward=False")

    def discard(self, opt) -> None:
        """zero_grad(): drop this step's gradients. Every rank must have issued the same
        all-reduces before the next step's: a rank whose backward left a parameter without
        a gradient started fewer buckets than the others, so after a synchronized backward
        the rest are started here too (as step() would; nothing can be exchanged to ask the
        others first, it would pair with their buckets); then wait for all, forget them."""
        if self.synced_backward and not self.finished:
            while self.next_bucket < len(self.buckets):
                self._start(opt, self.buckets[self.next_bucket])
                self.next_bucket += 1
        for _, _, work in self.in_flight:
            work.wait()
        self.grad_bytes += self._step_bytes  # sent, though not applied
        self._step_bytes = 0
        self._reset()




def _fingerprint(opt, sync: GradSync) -> int:
    """A 62-bit digest of what every rank must share: each param's shape, dtype, mask
    (its stored arrays' contents) and gradient dtype, the bucket plan, the options and
    the param groups' hyperparameters."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(repr((sync.config.reduce, sync.config.bucket_bytes, opt.update_in_backward, opt.grad_dtype,
                   opt.state_bits, opt.dense_state, [len(b.params) for b in sync.buckets])).encode())
    # what decides the updates: a rank with another lr, or that skips a non-finite step
    # where another raises, would silently diverge or hang
    h.update(repr((opt.nonfinite, opt.seed, [{k: _plain(v) for k, v in sorted(g.items()) if k != "params"}
                                             for g in opt.param_groups])).encode())
    for p in sync.params:
        mask = opt._masks[p]
        h.update(repr((tuple(p.shape), str(p.dtype), mask.encoding, mask.nnz)).encode())
        for key, value in sorted(mask.state_dict().items()):
            if isinstance(value, Tensor):
                h.update(key.encode())
                h.update(_tensor_digest(value).to_bytes(8, "little"))
            else:
                h.update(repr((key, value)).encode())
    return int.from_bytes(h.digest(), "little") >> 2


def _plain(value):
    """A param group value without tensors (whose repr names their device, cuda:<rank>)."""
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _tensor_digest(t: Tensor, chunk: int = 1 << 22) -> int:
    """A position-weighted wrap-around sum of an integer/bool tensor's values, computed on
    its device in chunks (no host copy of a large mask, no int64 copy of all of it)."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
    total = 0
    for start in range(0, flat.numel(), chunk):
        values = flat[start:start + chunk].to(torch.int64)
        weights = torch.arange(start + 1, start + values.numel() + 1, dtype=torch.int64, device=values.device)
        total = (total + int((values * (weights * 0x9E3779B1) + values).sum())) % 2**63
    return total
