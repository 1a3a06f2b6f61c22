"""seat.masks.ImplicitMask and SparseAdamW over implicit masks: the same training
trajectory, bit for bit, as the same entries given as int32 indices; state_dict round
trip; set_masks; errors naming the argument."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops
from seat.masks import ImplicitMask, build_masks, implicit_random_mask, mask_indices, mask_nnz, param_id_for
from seat.ops import _encodings
from seat.ops import implicit_block_offsets as offsets_op
from seat.optim import SparseAdamW


# ----------------------------------------------------------------------------- the mask object


@pytest.mark.parametrize("numel", [0, 1, 17, 4095, 4097, 50_001])
@pytest.mark.parametrize("density", [0.0, 0.05, 1.0])
def test_indices_and_offsets_agree(numel, density):
    mask = ImplicitMask(numel, density, seed=3, param_id=4)
    idx = mask.indices()
    assert idx.dtype == torch.int32 and idx.numel() == mask.nnz == mask_nnz(mask)
    if idx.numel() > 1:
        assert bool((idx[1:] > idx[:-1]).all())
    if density == 0.0:
        assert mask.nnz == 0
    if density == 1.0:
        assert torch.equal(idx, torch.arange(numel, dtype=torch.int32))
    bounds = torch.arange(mask.block_offsets.numel(), dtype=torch.int64) * mask.block
    assert torch.equal(mask.block_offsets, torch.searchsorted(idx.long(), bounds).to(torch.int32))
    assert mask.nbytes == 4 * (-(-numel // 4096) + 1)


def test_same_seed_same_mask_and_spec_round_trip():
    w = torch.randn(300, 70)
    a = implicit_random_mask(w, 0.1, seed=5, param_id=9, block=1024)
    b = ImplicitMask.from_spec(a.spec())
    assert a == b and torch.equal(a.indices(), b.indices()) and torch.equal(a.block_offsets, b.block_offsets)
    assert a != ImplicitMask(w, 0.1, seed=6, param_id=9, block=1024)
    assert not torch.equal(a.indices(), ImplicitMask(w, 0.1, seed=5, param_id=10).indices())


def test_build_masks_implicit():
    params = {"x.weight": torch.randn(64, 64), "y.weight": torch.randn(100)}
    masks = build_masks(params, 0.25, seed=1, encoding="implicit")
    for name, mask in masks.items():
        assert isinstance(mask, ImplicitMask) and mask.param_id == param_id_for(name) and mask.seed == 1
        assert mask.numel == params[name].numel()
    with pytest.raises(ValueError, match="encoding='implicit' is a random mask"):
        build_masks(params, 0.25, kind="magnitude", encoding="implicit")
    with pytest.raises(ValueError, match="encoding must be one of"):
        build_masks(params, 0.25, encoding="int64")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(density=1.5), ValueError, "density must be in"),
    (dict(seed="a"), TypeError, "seed must be an int"),
    (dict(param_id=2**32), ValueError, "param_id must be in"),
    (dict(block=1000), ValueError, "block must be a power of two"),
    (dict(block=4096.0), TypeError, "block must be an int"),
])
def test_mask_errors_name_the_argument(kwargs, error, message):
    args = dict(density=0.1, seed=0, param_id=0, block=4096)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        ImplicitMask(1000, args.pop("density"), **args)


def test_gather_and_swap_check_the_size():
    mask = ImplicitMask(100, 0.5, seed=0)
    with pytest.raises(ValueError, match="dense has 99 elements; this mask was built for 100"):
        mask.gather_(torch.zeros(mask.nnz), torch.randn(99))


# ----------------------------------------------------------------------------- SparseAdamW


class Net(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(70, 90, generator=g).to(dtype))  # 6300: > one 4096 block
        self.b = torch.nn.Parameter(torch.randn(1, 70, generator=g).to(dtype))
        self.c = torch.nn.Parameter(torch.randn(90, generator=g).to(dtype))

    def forward(self, x):
        return (torch.tanh(x @ self.a.T) @ self.b.T).squeeze(-1) + (x * self.c).sum(-1)


def _run(dtype, implicit, device, *, steps=6, state_dict_at=None, **opt_kwargs):
    net = Net(dtype).to(device)
    masks = [ImplicitMask(p, d, seed=11, param_id=i, block=256 if i == 0 else 4096)
             for i, (p, d) in enumerate(zip(net.parameters(), (0.1, 0.5, 1.0)))]
    opt = SparseAdamW(net.parameters(), masks if implicit else [m.indices() for m in masks], lr=1e-2,
                      weight_decay=0.1, seed=3, **opt_kwargs)
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 90, generator=g).to(dtype).to(device), torch.randn(16, generator=g).to(dtype).to(device)
        loss = ((net(x) - y).float() ** 2).mean()
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
        if state_dict_at == step:  # a fresh optimizer resumes from the saved state
            saved = opt.state_dict()
            opt.remove_hooks()
            opt = SparseAdamW(net.parameters(), masks if implicit else [m.indices() for m in masks], lr=1e-2,
                              weight_decay=0.1, seed=3, **opt_kwargs)
            opt.load_state_dict(saved)
    return net, opt


@pytest.mark.parametrize("dtype,opt_kwargs", [
    (torch.float32, {}),
    (torch.bfloat16, {"stochastic_rounding": True}),
    (torch.bfloat16, {"master_weights": True, "amsgrad": True}),
    (torch.float32, {"dense_state": True}),
], ids=["fp32", "bf16-sr", "bf16-master-amsgrad", "fp32-dense-state"])
def test_trajectory_is_bit_exact_against_int32_masks(backend, dtype, opt_kwargs):
    device = backend_device("sparse_adamw_", backend)
    with ops.use_backend(backend):
        a, opt_a = _run(dtype, True, device, **opt_kwargs)
        b, _ = _run(dtype, False, device, **opt_kwargs)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    base = Net(dtype).to(device)
    for p, p0, mask in zip(a.parameters(), base.parameters(), opt_a._masks.values()):
        outside = torch.ones(p.numel(), dtype=torch.bool, device=device)
        outside[mask.indices().long()] = False
        assert torch.equal(p.detach().view(-1)[outside], p0.detach().view(-1)[outside])
        assert not torch.equal(p, p0)


def test_state_dict_round_trip_resumes_bit_exactly():
    straight, _ = _run(torch.bfloat16, True, "cpu", stochastic_rounding=True)
    resumed, opt = _run(torch.bfloat16, True, "cpu", state_dict_at=2, stochastic_rounding=True)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    state = opt.state_dict()["state"][0]
    assert state["implicit_mask"] == ImplicitMask(6300, 0.1, seed=11, param_id=0, block=256).spec()
    assert "idx" not in state


def test_state_dict_of_another_mask_is_refused():
    _, opt = _run(torch.float32, True, "cpu", steps=1)
    saved = opt.state_dict()
    net = Net(torch.float32)
    other = [ImplicitMask(p, 0.1, seed=12, param_id=i) for i, p in enumerate(net.parameters())]
    with pytest.raises(ValueError, match="mask for parameter 0 differs"):
        SparseAdamW(net.parameters(), other, lr=1e-2).load_state_dict(saved)
    as_indices = SparseAdamW(net.parameters(), [m.indices() for m in other], lr=1e-2)
    with pytest.raises(ValueError, match="differs from this optimizer's"):
        as_indices.load_state_dict(saved)


def test_optimizer_memory_holds_no_indices():
    net = Net(torch.float32)
    masks = [ImplicitMask(p, 0.1, seed=1, param_id=i) for i, p in enumerate(net.parameters())]
    implicit = SparseAdamW(net.parameters(), masks, lr=1e-2)
    explicit = SparseAdamW(Net(torch.float32).parameters(), [m.indices() for m in masks], lr=1e-2)
    nnz = sum(m.nnz for m in masks)
    assert explicit.state_bytes() - implicit.state_bytes() == 4 * nnz - sum(m.nbytes for m in masks)


def test_set_masks_moves_state_between_implicit_masks():
    net = Net(torch.float32)
    old = [ImplicitMask(p, 0.5, seed=1, param_id=i) for i, p in enumerate(net.parameters())]
    opt = SparseAdamW(net.parameters(), old, lr=1e-2)
    ((net(torch.randn(4, 90)) ** 2).mean()).backward()
    opt.step()
    opt.zero_grad()
    moments = {i: dict(zip(m.indices().tolist(), opt.state[p]["exp_avg"].tolist()))
               for i, (p, m) in enumerate(zip(net.parameters(), old))}
    new = [ImplicitMask(p, 0.5, seed=2, param_id=i) for i, p in enumerate(net.parameters())]
    opt.set_masks(new)
    for i, (p, m) in enumerate(zip(net.parameters(), new)):
        state = opt.state[p]
        assert state["implicit_mask"] == m.spec() and state["exp_avg"].numel() == m.nnz
        for e, value in zip(m.indices().tolist(), state["exp_avg"].tolist()):
            assert value == moments[i].get(e, 0.0)
    assert mask_nnz(opt._masks[net.a]) == new[0].nnz
    assert torch.equal(mask_indices(opt._masks[net.a]), new[0].indices())


def test_optimizer_refuses_a_mask_of_another_size():
    net = Net(torch.float32)
    with pytest.raises(ValueError, match=r"masks\[1\] \(ImplicitMask\) covers 10 elements; its parameter has 70"):
        SparseAdamW(net.parameters(), [ImplicitMask(6300, 0.1, seed=0), ImplicitMask(10, 0.1, seed=0),
                                       ImplicitMask(90, 0.1, seed=0)], lr=1e-2)


def test_block_offsets_are_reused_by_ops_without_recount(monkeypatch):
    """The prefix count runs once, when the mask is built, not on every step."""
    net = Net(torch.float32)
    masks = [ImplicitMask(p, 0.2, seed=1, param_id=i) for i, p in enumerate(net.parameters())]
    opt = SparseAdamW(net.parameters(), masks, lr=1e-2)
    calls = []
    for backend in offsets_op.ENTRY.kernels:
        monkeypatch.setitem(offsets_op.ENTRY.kernels, backend, lambda *a, **k: calls.append(1))
    monkeypatch.setattr(_encodings, "hash_block_counts", lambda *a, **k: calls.append(1))
    for _ in range(2):
        ((net(torch.randn(4, 90)) ** 2).mean()).backward()
        opt.step()
        opt.zero_grad()
    assert calls == []
