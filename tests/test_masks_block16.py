"""seat.masks.Block16Mask: 2 bytes per entry, the same entries and the same SparseAdamW
trajectory (bit for bit) as the int32 form; state_dict round trip; build_masks,
ImportanceScores and seat.patch produce it on request."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops
from seat.masks import Block16Mask, ImportanceScores, build_masks, magnitude_mask, mask_indices, mask_nnz, random_mask
from seat.optim import SparseAdamW


class Net(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(300, 250, generator=g).to(dtype))  # 75000: two 65536-blocks
        self.b = torch.nn.Parameter(torch.randn(1, 300, generator=g).to(dtype))

    def forward(self, x):
        return (torch.tanh(x @ self.a.T) @ self.b.T).squeeze(-1)


def _masks(net):
    return [magnitude_mask(net.a, 0.05), random_mask(net.b, 0.5, seed=1)]


def _train(net, masks, device, steps=5, **kw):
    opt = SparseAdamW(net.parameters(), masks, lr=1e-2, weight_decay=0.1, seed=2, **kw)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 250, generator=g).to(net.a.dtype).to(device)
        (net(x).float() ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("dtype,kw", [(torch.float32, {}), (torch.bfloat16, {"stochastic_rounding": True}),
                                      (torch.bfloat16, {"master_weights": True, "amsgrad": True})],
                         ids=["fp32", "bf16-sr", "bf16-master-amsgrad"])
def test_trajectory_is_bit_exact_against_int32_masks(backend, dtype, kw):
    device = backend_device("sparse_adamw_", backend)
    a, b = Net(dtype).to(device), Net(dtype).to(device)
    masks = [m.to(device) for m in _masks(a)]
    with ops.use_backend(backend):
        _train(a, [Block16Mask(m, p.numel()) for m, p in zip(masks, a.parameters())], device, **kw)
        _train(b, masks, device, **kw)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.a, Net(dtype).to(device).a)


def test_state_dict_round_trip_and_memory():
    net = Net(torch.float32)
    masks = [Block16Mask(m, p.numel()) for m, p in zip(_masks(net), net.parameters())]
    opt = _train(net, masks, "cpu", steps=2)
    saved = opt.state_dict()
    assert saved["state"][0]["offsets"].dtype == torch.uint16
    fresh = SparseAdamW(net.parameters(), masks, lr=1e-2)
    fresh.load_state_dict(saved)
    other = [Block16Mask(random_mask(p, 0.05, seed=9), p.numel()) for p in net.parameters()]
    with pytest.raises(ValueError, match="differs from this optimizer's"):
        SparseAdamW(net.parameters(), other, lr=1e-2).load_state_dict(saved)
    int32 = SparseAdamW(Net(torch.float32).parameters(), [m.indices() for m in masks], lr=1e-2)
    nnz = sum(m.nnz for m in masks)
    assert int32.state_bytes() - fresh.state_bytes() == 2 * nnz - 4 * sum(m.block_starts.numel() for m in masks)


def test_mask_object():
    idx = random_mask(200_000, 0.01, seed=0)
    m = Block16Mask(idx, 200_000)
    assert mask_nnz(m) == idx.numel() and torch.equal(mask_indices(m), idx)
    assert m.nbytes == 2 * idx.numel() + 4 * 5
    assert m == Block16Mask.from_encoding(200_000, m.block_starts, m.offsets)
    with pytest.raises(ValueError, match="idx must be sorted and unique"):
        Block16Mask(idx.flip(0), 200_000)
    with pytest.raises(TypeError, match="idx must be a torch.Tensor"):
        Block16Mask([1, 2], 10)


def test_builders_return_block16_on_request():
    params = {"w": torch.randn(100, 100)}
    for kind in ("random", "magnitude"):
        b = build_masks(params, 0.1, kind=kind, encoding="block16")["w"]
        i = build_masks(params, 0.1, kind=kind)["w"]
        assert isinstance(b, Block16Mask) and torch.equal(b.indices(), i)
    w = torch.nn.Parameter(torch.randn(50, 40))
    scores = ImportanceScores({"w": w})
    (w ** 2).sum().backward()
    scores.update()
    assert torch.equal(scores.masks(0.1, encoding="block16")["w"].indices(), scores.masks(0.1)["w"])
    with pytest.raises(ValueError, match="encoding must be 'int32' or 'block16'"):
        scores.masks(0.1, encoding="implicit")
