"""The block16-mask ops on every backend against their reference (which decodes the
indices and runs the idx ops' references): odd sizes (numel not a multiple of 65536,
empty blocks, empty and full masks), encode/decode, and bad input."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device, random_indices, tol

from seat import ops
from seat.ops import block16_masks as b16

# numel < block, several blocks with the last one partial, exactly two blocks
SIZES = [1, 17, 65_535, 65_536, 200_003, 131_072]
DENSITIES = [0.0, 0.01, 1.0]


def _mask(numel, density, seed=0, empty_block=False):
    gen = torch.Generator().manual_seed(seed)
    idx = random_indices(numel, int(round(density * numel)), gen)
    if empty_block and numel > 2 * b16.BLOCK16:  # a block with no entry in the middle
        idx = idx[(idx < b16.BLOCK16) | (idx >= 2 * b16.BLOCK16)]
    return idx


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
def test_encode_decode_round_trip(numel, density):
    idx = _mask(numel, density, empty_block=True)
    starts, offsets = ops.encode_block16(idx, numel)
    assert starts.dtype == torch.int32 and offsets.dtype == torch.uint16
    assert starts.numel() == -(-numel // 65536) + 1 and int(starts[-1]) == idx.numel()
    assert torch.equal(ops.decode_block16(starts, offsets), idx)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dense_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gather_matches_reference(backend, numel, density, dense_dtype):
    device = backend_device("masked_gather_block16_", backend)
    idx = _mask(numel, density, empty_block=True)
    starts, offsets = ops.encode_block16(idx, numel)
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(numel, generator=gen).to(dense_dtype)
    out_dtype = torch.float64 if dense_dtype == torch.float64 else torch.float32
    out = torch.randn(idx.numel(), generator=gen, dtype=out_dtype)
    expected = (out.double() + dense.double()[idx.long()]).to(out_dtype)
    out = out.to(device)
    with ops.use_backend(backend):
        assert ops.masked_gather_block16_(out, dense.to(device), starts.to(device), offsets.to(device)) is out
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_swap_is_bit_exact(backend, numel, density, dtype):
    device = backend_device("masked_swap_block16_", backend)
    idx = _mask(numel, density, empty_block=True)
    starts, offsets = (t.to(device) for t in ops.encode_block16(idx, numel))
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(numel, generator=gen).to(dtype)
    values = torch.arange(idx.numel()).to(dtype)
    expected_param = param.clone()
    expected_param[idx.long()] = values
    expected_values = param[idx.long()].clone()
    param, values = param.to(device), values.to(device)
    before = param.clone()
    with ops.use_backend(backend):
        ops.masked_swap_block16_(param, starts, offsets, values)
        assert torch.equal(param.cpu(), expected_param) and torch.equal(values.cpu(), expected_values)
        ops.masked_swap_block16_(param, starts, offsets, values)
    assert torch.equal(param, before)


CONFIGS = {  # param dtype, state dtype, masters, amsgrad, stochastic rounding, dense_state
    "fp64": (torch.float64, torch.float64, False, False, False, False),
    "fp32": (torch.float32, torch.float32, False, False, False, False),
    "bf16-sr": (torch.bfloat16, torch.float32, False, False, True, False),
    "bf16-masters": (torch.bfloat16, torch.float32, True, False, False, False),
    "fp16-masters-amsgrad": (torch.float16, torch.float32, True, True, False, False),
    "fp32-dense-state": (torch.float32, torch.float32, False, False, False, True),
}


def _state(config, device, sizes=(200_003, 17, 65_536)):
    param_dtype, state_dtype, masters, amsgrad, sr, dense = CONFIGS[config]
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(param_dtype).to(device) for n in sizes]
    idxs = [_mask(n, 0.02 if n > 100 else 0.5, seed=i, empty_block=True).to(device) for i, n in enumerate(sizes)]

    def zeros(i):
        return torch.zeros(params[i].numel() if dense else idxs[i].numel(), dtype=state_dtype, device=device)

    st = dict(params=params, idxs=idxs, exp_avgs=[zeros(i) for i in range(len(sizes))],
              exp_avg_sqs=[zeros(i) for i in range(len(sizes))],
              max_exp_avg_sqs=[zeros(i) for i in range(len(sizes))] if amsgrad else None,
              masters=[(p.view(-1) if dense else p.view(-1)[ix.long()]).to(state_dtype).clone()
                       for p, ix in zip(params, idxs)] if masters else None,
              sr=sr, dense=dense, state_dtype=state_dtype)
    return st


def _tensors(st):
    return [*st["params"], *st["exp_avgs"], *st["exp_avg_sqs"], *(st["masters"] or []), *(st["max_exp_avg_sqs"] or [])]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sparse_adamw_block16_equals_idx_op(backend, config):
    """Bit-exact against sparse_adamw_ with the decoded indices on the same backend over
    several steps; within tolerance of the reference."""
    device = backend_device("sparse_adamw_block16_", backend)
    a, b, r = _state(config, device), _state(config, device), _state(config, "cpu")
    enc = [ops.encode_block16(ix, p.numel()) for ix, p in zip(a["idxs"], a["params"])]
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        grads = [torch.randn(ix.numel(), generator=gen, dtype=torch.float64).to(a["state_dtype"]) for ix in a["idxs"]]
        kw = dict(lr=1e-2, weight_decay=0.1, step=step, stochastic_rounding=a["sr"], seed=3, dense_state=a["dense"])
        with ops.use_backend(backend):
            ops.sparse_adamw_block16_(a["params"], [e[0] for e in enc], [e[1] for e in enc],
                                      [g.to(device) for g in grads], a["exp_avgs"], a["exp_avg_sqs"], a["masters"],
                                      a["max_exp_avg_sqs"], **kw)
            ops.sparse_adamw_(b["params"], b["idxs"], [g.to(device) for g in grads], b["exp_avgs"], b["exp_avg_sqs"],
                              b["masters"], b["max_exp_avg_sqs"], **kw)
        with ops.use_backend("reference"):
            ops.sparse_adamw_block16_(r["params"], [e[0].cpu() for e in enc], [e[1].cpu() for e in enc], grads,
                                      r["exp_avgs"], r["exp_avg_sqs"], r["masters"], r["max_exp_avg_sqs"], **kw)
    for x, y in zip(_tensors(a), _tensors(b)):
        assert torch.equal(x, y)
    for x, y in zip(_tensors(a), _tensors(r)):
        torch.testing.assert_close(x.cpu().double(), y.double(), **tol(y.dtype))


def _good():
    idx = _mask(70_000, 0.1)
    starts, offsets = ops.encode_block16(idx, 70_000)
    return dict(out=torch.zeros(idx.numel()), dense=torch.randn(70_000), block_starts=starts, offsets=offsets)


def _bad_offsets():
    g = _good()
    o = g["offsets"].to(torch.int32)
    o[1], o[2] = o[2], o[1]
    return o.to(torch.uint16)


@pytest.mark.parametrize("over,error,message", [
    (lambda g: {"offsets": g["offsets"].to(torch.int32)}, TypeError, "offsets must have dtype uint16"),
    (lambda g: {"block_starts": g["block_starts"].long()}, TypeError, "block_starts must have dtype int32"),
    (lambda g: {"block_starts": g["block_starts"][:2]}, ValueError, r"block_starts must have ceil\(numel / 65536\)"),
    (lambda g: {"out": torch.zeros(3)}, ValueError, "out must be 1-D with one entry per index"),
    (lambda g: {"offsets": _bad_offsets()}, ValueError, "offsets must be strictly increasing"),
    (lambda g: {"block_starts": torch.tensor([0, 1, g["offsets"].numel()], dtype=torch.int32)}, ValueError,
     "offsets must be strictly increasing|offsets reach element"),
    (lambda g: {"block_starts": torch.tensor([1, 1, g["offsets"].numel()], dtype=torch.int32)}, ValueError,
     "block_starts must start at 0"),
])
def test_gather_rejects(over, error, message):
    args = _good()
    args.update(over(args))
    before = args["out"].clone()
    with pytest.raises(error, match=message):
        ops.masked_gather_block16_(args["out"], args["dense"], args["block_starts"], args["offsets"])
    assert torch.equal(args["out"], before)


def test_encode_rejects_unsorted():
    with pytest.raises(ValueError, match="idx must be sorted and unique"):
        ops.encode_block16(torch.tensor([5, 3], dtype=torch.int32), 10)


def test_swap_and_adamw_reject():
    g = _good()
    param = torch.randn(70_000)
    with pytest.raises(TypeError, match="values must have param's dtype"):
        ops.masked_swap_block16_(param, g["block_starts"], g["offsets"], g["out"].double())
    with pytest.raises(ValueError, match="values must be 1-D with one entry per index"):
        ops.masked_swap_block16_(param, g["block_starts"], g["offsets"], torch.zeros(2))
    n = g["offsets"].numel()
    state = [torch.zeros(n)]
    with pytest.raises(ValueError, match="offsets has 2 tensors but params has 1"):
        ops.sparse_adamw_block16_([param], [g["block_starts"]], [g["offsets"]] * 2, state, state, state, lr=1e-3,
                                  step=1)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be 1-D with one entry per index \(offsets\[0\]"):
        ops.sparse_adamw_block16_([param], [g["block_starts"]], [g["offsets"]], state, [torch.zeros(3)], state,
                                  lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"\[0\] block_starts must have ceil"):
        ops.sparse_adamw_block16_([param], [g["block_starts"][:1]], [g["offsets"]], state, state, state, lr=1e-3,
                                  step=1)
