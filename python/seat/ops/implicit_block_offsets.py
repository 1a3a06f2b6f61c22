"""implicit_block_offsets_: the per-block prefix counts of a hash (implicit) mask.

The one mask-building op. Fills

    block_offsets  (n_blocks + 1,) int32, n_blocks = ceil(numel / block):
                   block_offsets[b] = members in elements [0, b * block); [-1] = nnz

for the hash mask of (seed, param_id, threshold) over a tensor of numel elements (see
_encodings.py: element e is a member iff mix32(key ^ mix32(e)) < threshold, key =
mask_key(seed, param_id)). The kernels count the members of each block; the prefix sum
is torch's. seat.masks.ImplicitMask calls it once, when the mask is built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _encodings, _registry


def _reference(block_offsets, *, numel, seed, param_id, threshold, block) -> None:
    counts = _encodings.hash_block_counts(numel, _encodings.mask_key(seed, param_id), threshold, block,
                                          block_offsets.device)
    block_offsets[0] = 0
    torch.cumsum(counts, 0, dtype=torch.int32, out=block_offsets[1:])


def _with_counts(count_kernel):
    """An implementation from a kernel filling counts[b] = members of block b."""
    def run(block_offsets, *, numel, seed, param_id, threshold, block) -> None:
        counts = block_offsets.new_empty(_encodings.n_blocks(numel, block))
        if counts.numel():
            count_kernel(counts, numel, _encodings.mask_key(seed, param_id), threshold, block)
        block_offsets[0] = 0
        torch.cumsum(counts, 0, dtype=torch.int32, out=block_offsets[1:])
    return run


def _native_counts(counts, numel, key, threshold, block) -> None:
    torch.ops.seat_C.implicit_block_counts_(counts, numel, key, threshold, block)


def _triton_counts(counts, numel, key, threshold, block) -> None:
    from seat_kernels.sparse_update import implicit_block_counts_

    implicit_block_counts_(counts, numel, key, threshold, block)


ENTRY = _registry.register("implicit_block_offsets_", _reference,
                           {"cpu": _with_counts(_native_counts), "cuda": _with_counts(_native_counts),
                            "triton": _with_counts(_triton_counts)})


def check(block_offsets, numel, seed, param_id, threshold, block) -> None:
    _encodings.check_hash_params("", seed=seed, param_id=param_id, threshold=threshold, block=block)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0; got {numel!r}")
    _encodings.check_block_offsets("block_offsets", block_offsets, numel, block, None, values=False)


@torch.library.custom_op("seat::implicit_block_offsets_", mutates_args=("block_offsets",))
def _offsets_op(block_offsets: Tensor, *, numel: int, seed: int, param_id: int, threshold: int,
                block: int) -> None:
    check(block_offsets, numel, seed, param_id, threshold, block)
    ENTRY.run(block_offsets.device, block_offsets, numel=numel, seed=seed, param_id=param_id,
              threshold=threshold, block=block)
    _encodings.record_block_offsets(block_offsets, numel, block, _encodings.mask_key(seed, param_id), threshold)


@_offsets_op.register_fake
def _(block_offsets, *, numel, seed, param_id, threshold, block):
    check(block_offsets, numel, seed, param_id, threshold, block)


def implicit_block_offsets_(block_offsets: Tensor, *, numel: int, seed: int, param_id: int = 0, threshold: int,
                            block: int = _encodings.DEFAULT_HASH_BLOCK) -> Tensor:
    """Fill block_offsets ((ceil(numel / block) + 1,) int32) with the prefix counts of the
    mask of (seed, param_id, threshold) over a tensor of numel elements; returns it."""
    check(block_offsets, numel, seed, param_id, threshold, block)
    torch.ops.seat.implicit_block_offsets_(block_offsets, numel=numel, seed=seed, param_id=param_id,
                                           threshold=threshold, block=block)
    return block_offsets
