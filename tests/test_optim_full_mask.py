"""seat.optim.SparseAdamW on compact parameters trained whole (QSEAT's delta: a 1-D
Parameter of one value per mask entry) with seat.masks.FullMask: every lean mode
(8-bit state, update in backward, bf16 compact gradients, and their combinations) gives
the trajectory of int32 indices 0 .. numel - 1, bit for bit, 8-bit state across chunks
too; a checkpoint resumes identically; the mask holds no index."""
from __future__ import annotations

import pytest
import torch

from seat import optim
from seat.masks import FullMask
from seat.optim import SparseAdamW

NUMEL = 5000
LEAN = [dict(), dict(update_in_backward=True), dict(state_bits=8), dict(state_bits=8, update_in_backward=True),
        dict(grad_dtype=torch.bfloat16), dict(grad_dtype=torch.bfloat16, update_in_backward=True),
        dict(grad_dtype=torch.bfloat16, state_bits=8, update_in_backward=True),
        dict(state_bits=8, update_in_backward=True, grad_dtype=torch.bfloat16, stochastic_rounding=True, seed=3,
             dtype=torch.bfloat16),
        dict(master_weights=True, dtype=torch.bfloat16), dict(amsgrad=True, weight_decay=0.1),
        dict(dense_state=True, update_in_backward=True)]


def _ids(o):
    return "-".join(f"{k}={v}" for k, v in o.items()) or "plain"


def _delta(dtype):
    g = torch.Generator().manual_seed(0)
    return torch.nn.Parameter((torch.randn(NUMEL, generator=g) * 1e-2).to(dtype))


def _loss(delta, step):
    g = torch.Generator().manual_seed(100 + step)
    target = torch.randn(NUMEL, generator=g)
    return (delta.float() - target).pow(2).mean()


def _train(delta, opt, steps, start=0):
    for step in range(start, start + steps):
        _loss(delta, step).backward()
        opt.step()
        opt.zero_grad()


def _run(mask_of, options, steps=5):
    options = dict(options)
    dtype = options.pop("dtype", torch.float32)
    delta = _delta(dtype)
    opt = SparseAdamW([delta], [mask_of(delta)], lr=1e-2, **options)
    _train(delta, opt, steps)
    state = {k: v.clone() for k, v in opt.state[delta].items() if isinstance(v, torch.Tensor)}
    return delta.detach().clone(), state, opt


def _arange(p):
    return torch.arange(p.numel(), dtype=torch.int32)


@pytest.mark.parametrize("options", LEAN, ids=_ids)
def test_full_mask_equals_int32_arange_bit_for_bit(options):
    (a, sa, opt), (b, sb, _) = _run(FullMask, options), _run(_arange, options)
    assert torch.equal(a, b)
    assert not torch.equal(a, _delta(a.dtype))  # it trained
    mask_keys = {"full_mask", "idx"}
    assert set(sa) - mask_keys == set(sb) - mask_keys
    for k in set(sa) - mask_keys:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert sa["full_mask"].numel() == 0  # no index per entry


@pytest.mark.parametrize("options", [dict(), dict(update_in_backward=True),
                                     dict(grad_dtype=torch.bfloat16, update_in_backward=True)], ids=_ids)
def test_8bit_full_mask_across_chunks(monkeypatch, options):
    """8-bit state stepped in STATE_CHUNK pieces (a piece of a full mask is int32
    indices): the trajectory of one whole chunk and of the int32 mask."""
    monkeypatch.setattr(optim.state, "STATE_CHUNK", 512)
    chunked = _run(FullMask, dict(state_bits=8, **options))[0]
    assert torch.equal(chunked, _run(_arange, dict(state_bits=8, **options))[0])
    monkeypatch.setattr(optim.state, "STATE_CHUNK", 1 << 20)
    assert torch.equal(chunked, _run(FullMask, dict(state_bits=8, **options))[0])


@pytest.mark.parametrize("options", [dict(update_in_backward=True), dict(state_bits=8),
                                     dict(state_bits=8, update_in_backward=True, grad_dtype=torch.bfloat16)],
                         ids=_ids)
def test_full_mask_state_dict_round_trip(tmp_path, options):
    delta = _delta(torch.float32)
    opt = SparseAdamW([delta], [FullMask(delta)], lr=1e-2, **options)
    _train(delta, opt, 3)
    torch.save({"delta": delta.detach().clone(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(delta, opt, 3, start=3)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = torch.nn.Parameter(ckpt["delta"])
    opt2 = SparseAdamW([resumed], [FullMask(resumed)], lr=1e-2, **options)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 3, start=3)
    assert torch.equal(delta, resumed)


def test_full_mask_of_another_size_refused():
    delta = _delta(torch.float32)
    with pytest.raises(ValueError, match="covers 4999 elements"):
        SparseAdamW([delta], [FullMask(NUMEL - 1)], lr=1e-2)
