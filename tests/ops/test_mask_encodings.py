"""The sparse-update ops (masked_gather_, masked_swap_, sparse_adamw_) on every mask
encoding and backend (the internal "full" encoding, FullMask, at density 1 only: every
entry): against the oracle (the mask decoded to int32 indices, plain torch
indexing, float64 where possible), bit-identical across encodings for the same entries,
on odd sizes (numel below, at and off a block boundary, empty and full masks), and bad
input refused before anything is written."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import backend_device, tol

from seat import ops
from seat.masks import Block16Mask, FullMask, ImplicitMask
from seat.ops import _encodings

ENCODINGS = ("int32", "block16", "implicit", "full")
# (numel, hash block): below one block, exactly one block, off a block boundary, several
# block16 blocks with a partial last one (and one hash block of 65536)
SIZES = [(1, 256), (256, 256), (4097, 256), (70_001, 4096), (131_073, 65536)]
DENSITIES = [0.0, 0.3, 1.0]


def make_mask(encoding: str, numel: int, density: float, block: int = 256, device="cpu", seed=11, param_id=3):
    """(mask in `encoding`, its int32 indices on the CPU): the entries of one hash mask,
    so every encoding holds the same ones. "full" is every entry: density 1 only."""
    if encoding == "full":
        if density != 1.0:
            pytest.skip("a full mask holds every entry (density 1)")
        return FullMask(numel).to(device), torch.arange(numel, dtype=torch.int32)
    hashed = ImplicitMask(numel, density, seed=seed, param_id=param_id, block=block)
    idx = hashed.indices()
    mask = {"int32": idx, "block16": Block16Mask(idx, numel), "implicit": hashed}[encoding]
    return mask.to(device), idx


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("numel,block", SIZES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dense_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.float64, torch.float64), (torch.float32, torch.bfloat16),
                                                   (torch.bfloat16, torch.bfloat16)], ids=str)
def test_gather_matches_oracle(backend, encoding, numel, block, density, dense_dtype, out_dtype):
    device = backend_device("masked_gather_", backend)
    mask, idx = make_mask(encoding, numel, density, block, device)
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(numel, generator=gen).to(dense_dtype)
    out = torch.randn(idx.numel(), generator=gen).to(out_dtype)
    # one rounding of the exact sum (fp64 holds it): the kernels round once too
    expected = (out.double() + dense.double()[idx.long()]).to(out_dtype)
    out = out.to(device)
    with ops.use_backend(backend):
        assert ops.masked_gather_(out, dense.to(device), mask) is out
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("numel,block", SIZES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8], ids=str)
def test_swap_is_bit_exact(backend, encoding, numel, block, density, dtype):
    device = backend_device("masked_swap_", backend)
    mask, idx = make_mask(encoding, numel, density, block, device)
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.int8:
        param = torch.randint(-100, 100, (numel,), generator=gen, dtype=torch.int8)
        values = torch.ones(idx.numel(), dtype=dtype)
    else:
        param = torch.randn(numel, generator=gen).to(dtype)
        values = torch.arange(idx.numel()).to(dtype)
    expected_param, expected_values = param.clone(), param[idx.long()].clone()
    expected_param[idx.long()] = values
    param, values = param.to(device), values.to(device)
    before = param.clone()
    with ops.use_backend(backend):
        ops.masked_swap_(param, mask, values)
        assert torch.equal(param.cpu().view(torch.uint8), expected_param.view(torch.uint8))
        assert torch.equal(values.cpu().view(torch.uint8), expected_values.view(torch.uint8))
        ops.masked_swap_(param, mask, values)
    assert torch.equal(param.view(torch.uint8), before.view(torch.uint8))


# name: (param dtype, state dtype, grad dtype, masters, amsgrad, stochastic rounding, dense_state)
ADAMW_CONFIGS = {
    "fp64": (torch.float64, torch.float64, torch.float64, False, False, False, False),
    "fp32": (torch.float32, torch.float32, torch.float32, False, False, False, False),
    "bf16-sr": (torch.bfloat16, torch.float32, torch.float32, False, False, True, False),
    "bf16-masters": (torch.bfloat16, torch.float32, torch.float32, True, False, False, False),
    "fp16-masters-amsgrad": (torch.float16, torch.float32, torch.float32, True, True, False, False),
    "fp32-dense-state": (torch.float32, torch.float32, torch.float32, False, False, False, True),
    "bf16-sr-bf16-grads": (torch.bfloat16, torch.float32, torch.bfloat16, False, False, True, False),
    "bf16-masters-bf16-grads": (torch.bfloat16, torch.float32, torch.bfloat16, True, False, False, False),
}


class _Run:
    """Params + AdamW state over a few steps, with masks in one encoding (the same
    entries in every encoding: those of seeded hash masks)."""

    def __init__(self, config, encoding, device, shapes, density=0.3):
        param_dtype, state_dtype, self.grad_dtype, masters, amsgrad, self.sr, self.dense = ADAMW_CONFIGS[config]
        gen = torch.Generator().manual_seed(2)
        self.params, self.masks, self.idxs = [], [], []
        for i, shape in enumerate(shapes):
            numel = math.prod(shape)
            mask, idx = make_mask(encoding, numel, 1.0 if numel == 1 else density, 256, device, 17, i)
            self.masks.append(mask)
            self.idxs.append(idx)
            self.params.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(param_dtype).to(device))

        def state(i):
            n = self.params[i].numel() if self.dense else self.idxs[i].numel()
            return torch.zeros(n, dtype=state_dtype, device=device)

        n = len(shapes)
        self.exp_avgs = [state(i) for i in range(n)]
        self.exp_avg_sqs = [state(i) for i in range(n)]
        self.max_exp_avg_sqs = [state(i) for i in range(n)] if amsgrad else None
        self.masters = None
        if masters:
            self.masters = [(p.view(-1) if self.dense else p.view(-1)[ix.long().to(device)]).to(state_dtype).clone()
                            for p, ix in zip(self.params, self.idxs)]
        self.gen = torch.Generator().manual_seed(3)
        self.device = device

    def grads(self):
        return [torch.randn(ix.numel(), generator=self.gen, dtype=torch.float64).to(self.grad_dtype).to(self.device)
                for ix in self.idxs]

    def step(self, step, grads):
        ops.sparse_adamw_(self.params, self.masks, grads, self.exp_avgs, self.exp_avg_sqs, self.masters,
                          self.max_exp_avg_sqs, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                          step=step, stochastic_rounding=self.sr, seed=9, dense_state=self.dense)

    def tensors(self):
        return [*self.params, *self.exp_avgs, *self.exp_avg_sqs, *(self.masters or []),
                *(self.max_exp_avg_sqs or [])]


@pytest.mark.parametrize("config", list(ADAMW_CONFIGS))
def test_sparse_adamw_is_the_same_in_every_encoding(backend, config):
    """Bit-exact across encodings on one backend, over several steps (so slots and the
    stochastic-rounding keys line up); within the dtype's tolerance of the reference;
    entries outside the mask untouched."""
    device = backend_device("sparse_adamw_", backend)
    # several block16 blocks, except under the Triton interpreter (minutes per config there;
    # the gather and swap tests cover multi-block block16 masks on every backend)
    interpreted = backend == "triton" and device.type == "cpu"
    shapes = ((33, 65), (5000,), (1,), (300,) if interpreted else (70_001,))
    runs = {e: _Run(config, e, device, shapes) for e in ENCODINGS if e != "full"}
    reference = _Run(config, "int32", "cpu", shapes)
    before = [p.clone() for p in runs["int32"].params]
    for step in range(1, 4):
        grads = reference.grads()
        for run in runs.values():
            run.grads()
            with ops.use_backend(backend):
                run.step(step, [g.clone().to(device) for g in grads])
        with ops.use_backend("reference"):
            reference.step(step, grads)
    for encoding in ("block16", "implicit"):
        for a, b in zip(runs[encoding].tensors(), runs["int32"].tensors()):
            assert torch.equal(a, b), encoding
    for a, r in zip(runs["int32"].tensors(), reference.tensors()):
        torch.testing.assert_close(a.cpu().double(), r.double(), **tol(r.dtype))
    for p, b, ix in zip(runs["int32"].params, before, runs["int32"].idxs):
        untouched = torch.ones(p.numel(), dtype=torch.bool)
        untouched[ix.long()] = False
        assert torch.equal(p.view(-1).cpu()[untouched], b.view(-1).cpu()[untouched])


@pytest.mark.parametrize("config", list(ADAMW_CONFIGS))
def test_sparse_adamw_full_mask_is_an_int32_arange(backend, config):
    """A full mask steps every entry exactly as int32 indices 0 .. numel - 1 do."""
    device = backend_device("sparse_adamw_", backend)
    interpreted = backend == "triton" and device.type == "cpu"
    shapes = ((33, 65), (1,), (300,) if interpreted else (70_001,))
    full, arange = (_Run(config, e, device, shapes, density=1.0) for e in ("full", "int32"))
    assert all(torch.equal(ix, torch.arange(ix.numel(), dtype=torch.int32)) for ix in arange.idxs)
    assert all(isinstance(m, FullMask) for m in full.masks)
    for step in range(1, 4):
        grads = arange.grads()
        full.grads()
        with ops.use_backend(backend):
            full.step(step, [g.clone() for g in grads])
            arange.step(step, [g.clone() for g in grads])
    for a, b in zip(full.tensors(), arange.tensors()):
        assert torch.equal(a, b)


def test_full_mask_protocol():
    mask = FullMask(torch.zeros(3, 5))
    assert (mask.numel, mask.nnz, mask.nbytes, mask.encoding) == (15, 15, 0, "full")
    assert torch.equal(mask.indices(), torch.arange(15, dtype=torch.int32))
    assert torch.equal(mask.chunk(4, 9).indices(), torch.arange(4, 9, dtype=torch.int32))
    assert mask.chunk(4, 9).nnz == 5
    from seat.masks import as_mask, from_spec, from_state_dict

    assert from_state_dict(mask.state_dict(), 15) == mask
    assert from_spec(mask.spec()) == mask and mask != FullMask(14)
    assert as_mask(mask, 15) is mask
    with pytest.raises(ValueError, match="covers 15 elements; its tensor has 16"):
        as_mask(mask, 16)
    with pytest.raises(ValueError, match="chunk"):
        mask.chunk(3, 16)


def test_full_mask_is_not_a_config_encoding():
    """An internal encoding: masks are built from a selection, and "full" selects nothing."""
    from seat.masks import ALL_ENCODINGS, ENCODINGS as USER_ENCODINGS, build_mask

    assert "full" in ALL_ENCODINGS and "full" not in USER_ENCODINGS
    with pytest.raises(ValueError, match="encoding must be one of"):
        build_mask("w", torch.zeros(10), 0.5, encoding="full")


@pytest.mark.parametrize("over,error,message", [
    (dict(index=torch.zeros(2, dtype=torch.int32)), ValueError, "a full mask holds no indices"),
    (dict(index=torch.zeros(0, dtype=torch.int64)), TypeError, "must have dtype int32"),
    (dict(ints=(1, 0, 0)), ValueError, "the mask ints of a full mask must be"),
    (dict(offsets=torch.zeros(3, dtype=torch.uint16)), ValueError, "a full mask has no offsets"),
])
def test_full_mask_bad_args_refused(backend, over, error, message):
    device = backend_device("masked_gather_", backend)
    args = FullMask(40, device=device).op_args()._asdict()
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in over.items()})
    out = torch.zeros(40, device=device)
    with ops.use_backend(backend), pytest.raises(error, match=message):
        ops.masked_gather_(out, torch.randn(40, device=device), _encodings.MaskArgs(**args))
    with ops.use_backend(backend), pytest.raises(ValueError, match="out must have one entry per element"):
        ops.masked_gather_(torch.zeros(39, device=device), torch.randn(40, device=device), FullMask(40).to(device))
    assert torch.all(out == 0)


# ----------------------------------------------------------------------------- block16 encoding


@pytest.mark.parametrize("numel", [1, 17, 65_535, 65_536, 200_003])
@pytest.mark.parametrize("density", [0.0, 0.01, 1.0])
def test_block16_encode_decode_round_trip(numel, density):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(numel, generator=gen)[:round(density * numel)].sort().values.to(torch.int32)
    if numel > 2 * _encodings.BLOCK16_SIZE:  # a block with no entry in the middle
        idx = idx[(idx < _encodings.BLOCK16_SIZE) | (idx >= 2 * _encodings.BLOCK16_SIZE)]
    starts, offsets = _encodings.encode_block16(idx, numel)
    assert starts.dtype == torch.int32 and offsets.dtype == torch.uint16
    assert starts.numel() == -(-numel // 65536) + 1 and int(starts[-1]) == idx.numel()
    assert torch.equal(_encodings.decode_block16(starts, offsets), idx)


def test_block16_chunk_is_the_entries_of_the_chunk():
    mask, idx = make_mask("block16", 200_003, 0.1)
    for start, stop in ((0, 5), (100, 7000), (6000, idx.numel()), (idx.numel(), idx.numel())):
        chunk = mask.chunk(start, stop)
        assert torch.equal(chunk.indices(), idx[start:stop])
        assert chunk.nnz == stop - start


def test_implicit_chunk_is_the_entries_of_the_chunk():
    mask, idx = make_mask("implicit", 70_001, 0.3, block=256)
    for start, stop in ((0, 1), (77, 300), (5000, idx.numel()), (0, idx.numel())):
        assert torch.equal(mask.chunk(start, stop).indices(), idx[start:stop])


# ----------------------------------------------------------------------------- bad input


def _block16(numel=70_000):
    mask, idx = make_mask("block16", numel, 0.2)
    return mask.block_starts, mask.offsets, idx.numel()


def _swapped_offsets():
    starts, offsets, _ = _block16()
    o = offsets.to(torch.int32)
    o[1], o[2] = o[2].clone(), o[1].clone()
    return o.to(torch.uint16)


def _mask_args(kind, **over):
    mask, idx = make_mask(kind, 1000 if kind != "block16" else 70_000, 0.2)
    args = _encodings.as_mask_args("mask", mask)._asdict()
    args.update(over)
    return _encodings.MaskArgs(**args), idx


@pytest.mark.parametrize("encoding,over,error,message", [
    ("implicit", dict(ints=(5, 2**31, 300)), ValueError, "block must be a power of two"),
    ("implicit", dict(ints=(5, 2**31, 128)), ValueError, "block must be a power of two in"),
    ("implicit", dict(ints=(5, 2**32 + 1, 256)), ValueError, "threshold must be in"),
    ("implicit", dict(ints=(-1, 2**31, 256)), ValueError, "key must be in"),
    ("implicit", dict(ints=(1.5, 2**31, 256)), TypeError, "key must be an int"),
    ("implicit", dict(index=torch.zeros(3, dtype=torch.int32)), ValueError, "block_offsets must have ceil"),
    ("implicit", dict(index=torch.zeros(5, dtype=torch.int64)), TypeError, "block_offsets must have dtype int32"),
    ("implicit", dict(ints=(0, 0)), ValueError, "mask ints must be 3 ints"),
    ("int32", dict(ints=(1, 0, 0)), ValueError, "the mask ints of a int32 mask must be"),
    ("int32", dict(encoding=7), ValueError, "encoding must be one of"),
    ("int32", dict(offsets=torch.zeros(3, dtype=torch.uint16)), ValueError, "a int32 mask has no offsets"),
    ("block16", dict(offsets=_block16()[1].to(torch.int32)), TypeError, "offsets must have dtype uint16"),
    ("block16", dict(index=_block16()[0].long()), TypeError, "block_starts must have dtype int32"),
    ("block16", dict(index=_block16()[0][:2]), ValueError, r"block_starts must have ceil\(numel / 65536\)"),
    ("block16", dict(offsets=_swapped_offsets()), ValueError, "offsets must be strictly increasing"),
    ("block16", dict(index=torch.tensor([1, 1, _block16()[2]], dtype=torch.int32)), ValueError,
     "block_starts must start at 0"),
])
def test_gather_rejects_bad_masks(encoding, over, error, message):
    mask, idx = _mask_args(encoding, **over)
    numel = 1000 if encoding != "block16" else 70_000
    out = torch.zeros(idx.numel())
    with pytest.raises(error, match=message):
        ops.masked_gather_(out, torch.randn(numel), mask)
    assert torch.all(out == 0)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_ops_reject_wrong_sizes_and_dtypes(encoding):
    numel = 1000
    mask, idx = make_mask(encoding, numel, 0.2)
    n = idx.numel()
    param = torch.randn(numel)
    with pytest.raises(ValueError, match="out must be 1-D with one entry per index|not a prefix count of a mask "
                                         "with 3 entries"):
        ops.masked_gather_(torch.zeros(3), param, mask)
    with pytest.raises(TypeError, match="out must have dtype"):
        ops.masked_gather_(torch.zeros(n, dtype=torch.float16), param, mask)
    with pytest.raises(TypeError, match="values must have param's dtype"):
        ops.masked_swap_(param, mask, torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="param must be contiguous"):
        ops.masked_swap_(torch.randn(50, 20).t(), mask, torch.zeros(n))
    with pytest.raises(ValueError, match="has 1000 elements; this mask|values must be 1-D|not a prefix count"):
        ops.masked_swap_(param, mask, torch.zeros(2))
    state = [torch.zeros(n)]
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be 1-D with one entry per index \(grads\[0\]"):
        ops.sparse_adamw_([param], [mask], state, [torch.zeros(n + 1)], state, lr=1e-3, step=1)
    with pytest.raises(ValueError, match="masks has 2 tensors but params has 1"):
        ops.sparse_adamw_([param], [mask, mask], state, state, state, lr=1e-3, step=1)
    with pytest.raises(TypeError, match=r"masks\[0\] must be a mask"):
        ops.sparse_adamw_([param], ["x"], state, state, state, lr=1e-3, step=1)
    assert torch.equal(state[0], torch.zeros(n))


def test_sparse_adamw_refuses_mixed_encodings():
    a, ia = make_mask("int32", 1000, 0.2)
    b, ib = make_mask("block16", 1000, 0.2, seed=5)
    params = [torch.randn(1000), torch.randn(1000)]
    before = [p.clone() for p in params]
    state = lambda: [torch.zeros(ia.numel()), torch.zeros(ib.numel())]  # noqa: E731
    with pytest.raises(ValueError, match="masks mix encodings .*call sparse_adamw_ once per encoding"):
        ops.sparse_adamw_(params, [a, b], state(), state(), state(), lr=1e-3, step=1)
    assert all(torch.equal(p, q) for p, q in zip(params, before))


@pytest.mark.parametrize("edit", ["another mask", "edited in place"])
def test_hash_offsets_that_are_not_the_masks_own_are_refused(backend, edit):
    """Offsets that pass the structural check (a prefix count ending at nnz) but are not
    this mask's: refused before anything is written, on every backend."""
    device = backend_device("masked_gather_", backend)
    mask, idx = make_mask("implicit", 70_000, 0.01, device=device)
    args = mask.op_args()
    if edit == "another mask":
        other = ImplicitMask(70_000, 0.01, seed=99, param_id=0, block=256, device=device)
        offsets = other.block_offsets
        n = other.nnz
    else:
        offsets = mask.block_offsets
        offsets[2] += 1  # still a prefix count ending at nnz
        n = idx.numel()
    out = torch.zeros(n, device=device)
    with ops.use_backend(backend), pytest.raises(ValueError, match="are not the prefix counts of this mask"):
        ops.masked_gather_(out, torch.randn(70_000, device=device), args._replace(index=offsets))
    assert torch.all(out == 0)


def test_bad_hash_offsets_never_write_out_of_bounds(backend):
    """Offsets that lie (a prefix count of other members): called directly, bypassing the
    validation that refuses them, the kernels number slots as the reference does (each
    block's members from its offset, none at or past the next block's) and stay inside
    the compact arrays."""
    device = backend_device("masked_gather_", backend)
    mask, idx = make_mask("implicit", 4096, 0.5, device=device)
    args = mask.op_args()
    skewed = args.index.clone()
    skewed[1:-1] = torch.clamp(skewed[1:-1] - 40, min=0)  # still monotone, steps <= block
    guard = torch.zeros(idx.numel() + 64, device=device)
    out = guard[:idx.numel()]
    entry = ops.OPS["masked_gather_"]
    kernel = entry.kernels.get(backend, entry.reference)  # the kernel itself: validation refuses these offsets
    kernel(out, torch.ones(4096, device=device), args._replace(index=skewed))
    assert torch.all(guard[idx.numel():] == 0)
    expected = torch.zeros(idx.numel())
    entry.reference(expected, torch.ones(4096), args._replace(index=skewed.cpu()))
    assert torch.equal(out.cpu(), expected)
