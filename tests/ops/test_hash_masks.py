"""Hash (implicit) masks: implicit_block_offsets_ on every backend against the oracle
(prefix counts of the materialized members) on odd sizes, the hash's pinned definition,
its density and independence across parameters, and bad input. The sparse-update ops on
hash masks are tested with the other encodings in test_mask_encodings.py."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device, tol

from seat import ops
from seat.ops import _encodings as im

# (numel, block): numel < block, not a multiple of the block, exactly one block, tiny
SIZES = [(1, 256), (17, 256), (255, 256), (256, 256), (4097, 256), (10_007, 1024), (70_001, 65536), (9000, 4096)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def offsets_oracle(numel: int, seed: int, param_id: int, threshold: int, block: int) -> torch.Tensor:
    """From the materialized indices: members before each block boundary."""
    idx = im.hash_indices(numel, im.mask_key(seed, param_id), threshold).long()
    bounds = torch.arange(0, im.n_blocks(numel, block) + 1, dtype=torch.int64) * block
    return torch.searchsorted(idx, bounds).to(torch.int32)


def make_offsets(numel, seed, param_id, threshold, block, device, backend="reference"):
    out = torch.full((im.n_blocks(numel, block) + 1,), -7, dtype=torch.int32, device=device)
    with ops.use_backend(backend):
        ops.implicit_block_offsets_(out, numel=numel, seed=seed, param_id=param_id, threshold=threshold, block=block)
    return out


# ----------------------------------------------------------------------------- the hash and the counts


def test_mask_key_is_the_documented_hash():
    """Pinned values, computed once: the mask of a seed must never change between versions
    (deltas and checkpoints store seeds, not indices)."""
    assert im.mask_key(0, 0) == 1752665475 and im.mask_key(1, 7) == 70672447
    keys = {im.mask_key(s, p) for s in (0, 1, -1, 2**40) for p in (0, 1, 2**32 - 1)}
    assert len(keys) == 12
    assert im.threshold_for(0.0) == 0 and im.threshold_for(1.0) == 2**32 and im.threshold_for(0.5) == 2**31
    assert im.hash_indices(16, im.mask_key(0, 0), 2**31).tolist() == [1, 2, 5, 6, 7, 9, 11, 12, 14, 15]


@pytest.mark.parametrize("numel,block", SIZES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
def test_block_offsets_match_oracle(backend, numel, block, density):
    device = backend_device("implicit_block_offsets_", backend)
    threshold = im.threshold_for(density)
    got = make_offsets(numel, 5, 123, threshold, block, device, backend)
    expected = offsets_oracle(numel, 5, 123, threshold, block)
    assert torch.equal(got.cpu(), expected)
    if density == 0.0:
        assert int(got[-1]) == 0
    if density == 1.0:
        assert int(got[-1]) == numel


def test_empty_tensor():
    out = make_offsets(0, 1, 2, 2**31, 256, "cpu")
    assert out.tolist() == [0]
    assert im.hash_indices(0, im.mask_key(1, 2), 2**31).numel() == 0


@pytest.mark.parametrize("numel", [1000, 4097, 100_003, 1_000_003])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.05, 0.3, 0.9])
def test_density_within_binomial_bound(numel, density):
    """nnz ~ Binomial(numel, density): within 5 sigma (+1 for the rounding of the threshold)."""
    sigma = math.sqrt(numel * density * (1 - density))
    for seed in range(3):
        nnz = int(make_offsets(numel, seed, 7, im.threshold_for(density), 4096, "cpu")[-1])
        assert abs(nnz - numel * density) <= 5 * sigma + 1, (seed, nnz, numel * density, sigma)


def test_members_are_spread_and_independent_across_params():
    """Per-block counts have the binomial spread (no clumping), and two param ids overlap
    like independent masks (about density**2 of the elements)."""
    numel, block, density = 1 << 20, 4096, 0.1
    threshold = im.threshold_for(density)
    counts = make_offsets(numel, 0, 1, threshold, block, "cpu").diff().double()
    mean, var = block * density, block * density * (1 - density)
    assert abs(counts.mean() - mean) < 5 * math.sqrt(var / counts.numel())
    assert 0.7 * var < counts.var() < 1.3 * var  # 256 blocks: the sample variance is within ~9%
    a = im.hash_indices(numel, im.mask_key(0, 1), threshold)
    b = im.hash_indices(numel, im.mask_key(0, 2), threshold)
    both = torch.isin(a, b).sum().item()
    expected = numel * density**2
    assert abs(both - expected) < 5 * math.sqrt(expected)


def test_block_offsets_rejects():
    args = dict(seed=1, param_id=2, threshold=2**31, block=256)
    out = torch.zeros(5, dtype=torch.int32)
    with pytest.raises(ValueError, match="numel must be an int >= 0"):
        ops.implicit_block_offsets_(torch.zeros(2, dtype=torch.int32), numel=-1, **args)
    with pytest.raises(ValueError, match="block must be a power of two"):
        ops.implicit_block_offsets_(out, numel=1000, **{**args, "block": 300})
    with pytest.raises(ValueError, match="param_id must be in"):
        ops.implicit_block_offsets_(out, numel=1000, **{**args, "param_id": -1})
    with pytest.raises(ValueError, match="seed must be in"):
        ops.implicit_block_offsets_(out, numel=1000, **{**args, "seed": 2**63})
    with pytest.raises(TypeError, match="seed must be an int"):
        ops.implicit_block_offsets_(out, numel=1000, **{**args, "seed": 1.5})
    with pytest.raises(ValueError, match="block_offsets must have ceil"):
        ops.implicit_block_offsets_(out, numel=100_000, **args)
    assert torch.all(out == 0)
