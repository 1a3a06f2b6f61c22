"""seat.optim.SparseAdamW lean modes (update_in_backward=True, state_bits=8, bf16 compact
gradients) with ImplicitMask and Block16Mask masks: each is the same lean mode with the
int32 mask holding the same entries, bit for bit (8-bit state stepped in STATE_CHUNK
pieces for every encoding); the float64 oracle; checkpoints; transients."""
from __future__ import annotations

import pytest
import torch
from test_optim import Tiny, _batch, _oracle

from seat import ops, optim
from seat.memory import Options
from seat.memory._estimate import _chunk_update_bytes
from seat.masks import Block16Mask, ImplicitMask, mask_indices, random_mask
from seat.optim import SparseAdamW

DENSITIES = (0.2, 0.06, 1.0)


def _encoded_masks(model, form):
    """Masks of `form` ("implicit" / "block16") for Tiny: sparse, nearly empty, full."""
    params = list(model.parameters())
    if form == "implicit":
        return [ImplicitMask(p, d, seed=7, param_id=i, block=256) for i, (p, d) in enumerate(zip(params, DENSITIES))]
    return [Block16Mask(random_mask(p, d, seed=i), p) for i, (p, d) in enumerate(zip(params, DENSITIES))]


def _train(model, opt, sched, steps, dtype, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step, dtype, "cpu")
        (model(x) - y).float().pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for v in opt.dequantized_state(p).values()]
        out += [opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "master", "max_exp_avg_sq",
                                                   "exp_avg_absmax", "exp_avg_sq_absmax") if k in opt.state[p]]
    return out, [opt.state[p]["step"] for p in model.parameters()]


LEAN = [dict(update_in_backward=True), dict(update_in_backward=True, amsgrad=True, weight_decay=0.1),
        dict(update_in_backward=True, master_weights=True), dict(update_in_backward=True, dense_state=True),
        dict(update_in_backward=True, stochastic_rounding=True, seed=3),
        dict(state_bits=8, update_in_backward=True, stochastic_rounding=True, seed=3),
        dict(grad_dtype=torch.bfloat16), dict(grad_dtype=torch.bfloat16, master_weights=True),
        dict(grad_dtype=torch.bfloat16, compact_grads=False),
        dict(grad_dtype=torch.bfloat16, update_in_backward=True),
        dict(grad_dtype=torch.bfloat16, state_bits=8, update_in_backward=True),
        dict(grad_dtype=torch.bfloat16, state_bits=8, update_in_backward=True, stochastic_rounding=True, seed=3),
        dict(state_bits=8), dict(state_bits=8, master_weights=True),
        dict(state_bits=8, update_in_backward=True), dict(state_bits=8, update_in_backward=True, master_weights=True)]


@pytest.mark.parametrize("form", ["implicit", "block16"])
@pytest.mark.parametrize("options", LEAN, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_encoded_mask_equals_int32_mask_bit_for_bit(form, options):
    bf16 = options.get("master_weights") or options.get("stochastic_rounding")
    dtype = torch.bfloat16 if bf16 else torch.float32
    results = []
    for encoded in (True, False):
        model = Tiny(dtype, "cpu")
        masks = _encoded_masks(model, form)
        if not encoded:
            masks = [mask_indices(m) for m in masks]
        opt = SparseAdamW(model.parameters(), masks, **{"lr": 1e-2, "weight_decay": 0.01, **options})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
        _train(model, opt, sched, 6, dtype)
        results.append(_snapshot(model, opt))
    (a, sa), (b, sb) = results
    assert sa == sb == [6, 6, 6]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


CHUNKED = [dict(), dict(update_in_backward=True), dict(grad_dtype=torch.bfloat16, update_in_backward=True),
           dict(grad_dtype=torch.bfloat16, master_weights=True, stochastic_rounding=True, seed=3),
           dict(update_in_backward=True, stochastic_rounding=True, seed=3)]


def _chunked_run(monkeypatch, form, encoded, chunk, options):
    """Linear(96, 80) with 8-bit state and STATE_CHUNK = chunk; returns the snapshot, the
    (encoding, nnz) of every sparse_adamw_ call's masks, and the masks' nnz."""
    monkeypatch.setattr(optim.state, "STATE_CHUNK", chunk)
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Linear(96, 80).to(dtype)
    params = list(model.parameters())
    masks = ([ImplicitMask(p, 0.4, seed=3, param_id=i, block=256) for i, p in enumerate(params)]
             if form == "implicit" else [Block16Mask(random_mask(p, 0.4, seed=i), p) for i, p in enumerate(params)])
    if not encoded:
        masks = [mask_indices(m) for m in masks]
    calls, step = [], ops.sparse_adamw_

    def spy(params, masks, *args, **kwargs):
        calls.append([(getattr(m, "encoding", "int32"), mask_indices(m).numel()) for m in masks])
        return step(params, masks, *args, **kwargs)

    monkeypatch.setattr(ops, "sparse_adamw_", spy)
    opt = SparseAdamW(params, masks, lr=1e-2, state_bits=8, **options)
    g = torch.Generator().manual_seed(11)
    for _ in range(4):
        model(torch.randn(4, 96, generator=g).to(dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return _snapshot(model, opt)[0], calls, [mask_indices(m).numel() for m in masks]


@pytest.mark.parametrize("form", ["implicit", "block16"])
@pytest.mark.parametrize("options", CHUNKED, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "8-bit")
def test_8bit_encoded_mask_across_chunks_equals_int32(monkeypatch, form, options):
    """Every encoding steps its 8-bit state in STATE_CHUNK pieces (Mask.chunk: an implicit
    mask's piece is int32 indices, a block16 mask's is block16): the trajectory of the
    int32 mask, and of one whole chunk, bit for bit (chunks are whole quantization blocks;
    stochastic rounding draws by element position)."""
    chunked, calls, (weight, bias) = _chunked_run(monkeypatch, form, True, 512, options)
    assert weight > 4 * 512 and bias < 512  # the weight in several chunks, the bias in one
    piece = "int32" if form == "implicit" else form  # what Mask.chunk gives
    assert all(len(call) == 1 for call in calls)  # one param per call
    one_step = [[(piece, min(512, weight - start))] for start in range(0, weight, 512)] + [[(form, bias)]]
    assert sorted(calls) == sorted(4 * one_step)
    for other in (_chunked_run(monkeypatch, form, False, 512, options)[0],
                  _chunked_run(monkeypatch, form, True, 1 << 20, options)[0]):
        for x, y in zip(chunked, other):
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_update_in_backward_with_encoded_mask_follows_the_float64_oracle(form):
    model = Tiny(torch.float64, "cpu")
    enc = _encoded_masks(model, form)
    masks = {p: mask_indices(m) for p, m in zip(model.parameters(), enc)}
    hyper = dict(lr=1e-2, weight_decay=0.05)
    schedule = lambda s: 1.0 / (1 + 0.1 * s)  # noqa: E731 - an LR schedule
    params, leaves, ref_opt, ref_sched = _oracle(model, masks, hyper, schedule)
    opt = SparseAdamW(model.parameters(), enc, update_in_backward=True, **hyper)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    assert opt._grads == {}
    for step in range(10):
        x, y = _batch(step, torch.float64, "cpu")
        loss = (model(x) - y).pow(2).mean()
        dense = torch.autograd.grad(loss, params, retain_graph=True)
        for leaf, p, g in zip(leaves, params, dense):
            leaf.grad = g.reshape(-1)[masks[p].long()].clone()
        loss.backward()
        opt.step()
        ref_opt.step()
        ref_sched.step()
        sched.step()
        opt.zero_grad()
    for p, leaf in zip(params, leaves):
        torch.testing.assert_close(p.detach().view(-1)[masks[p].long()], leaf.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["implicit", "block16"])
@pytest.mark.parametrize("options", [dict(update_in_backward=True), dict(state_bits=8),
                                     dict(state_bits=8, update_in_backward=True), dict(grad_dtype=torch.bfloat16),
                                     dict(state_bits=8, update_in_backward=True, grad_dtype=torch.bfloat16)],
                         ids=["in-backward", "8-bit", "8-bit-in-backward", "bf16-grad", "all-three"])
def test_encoded_lean_state_dict_round_trip_continues_identically(tmp_path, form, options):
    model = Tiny(torch.float32, "cpu")
    masks = _encoded_masks(model, form)
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2, weight_decay=0.01, **options)
    _train(model, opt, None, 3, torch.float32)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, None, 3, torch.float32, start=3)
    resumed = Tiny(torch.float32, "cpu")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    opt2 = SparseAdamW(resumed.parameters(), _encoded_masks(resumed, form), lr=1e-2, weight_decay=0.01, **options)
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, None, 3, torch.float32, start=3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    # the same entries as int32 indices resume the same run (state is laid out by entry) ...
    same = [mask_indices(m) for m in _encoded_masks(resumed, form)]
    SparseAdamW(resumed.parameters(), same, lr=1e-2, **options).load_state_dict(ckpt["opt"])
    # ... other entries are refused
    other = [random_mask(p, 0.5, seed=99) for p in resumed.parameters()]
    opt3 = SparseAdamW(resumed.parameters(), other, lr=1e-2, **options)
    with pytest.raises(ValueError, match="mask for parameter 0 differs"):
        opt3.load_state_dict(ckpt["opt"])


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_bf16_grad_accumulation_with_encoded_mask_equals_int32(form):
    """A second micro-batch turns the bf16 buffer into fp32, as with an int32 mask."""
    results = []
    for encoded in (True, False):
        model = Tiny(torch.float32, "cpu")
        masks = _encoded_masks(model, form)
        if not encoded:
            masks = [mask_indices(m) for m in masks]
        opt = SparseAdamW(model.parameters(), masks, lr=1e-2, grad_dtype=torch.bfloat16)
        for step in range(3):
            for micro in range(2):
                x, y = _batch(2 * step + micro, torch.float32, "cpu")
                (model(x) - y).pow(2).mean().backward()
            assert all(opt.compact_grad(p).dtype == torch.float32 for p in model.parameters())
            opt.step()
            opt.zero_grad()
            assert all(opt.compact_grad(p).dtype == torch.bfloat16 for p in model.parameters())
        results.append(_snapshot(model, opt)[0])
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_8bit_encoded_transient_is_one_chunk(monkeypatch, form):
    """As with int32 masks: one chunk's fp32 moments (8 B per entry of the chunk) +
    bitsandbytes' codes while quantizing (1 B), and for an implicit mask the chunk's int32
    indices (4 B), not the whole parameter's."""
    from test_optim_lean import _transient_peak

    monkeypatch.setattr(optim.state, "STATE_CHUNK", 4096)
    params = [torch.nn.Parameter(torch.randn(160, 100)), torch.nn.Parameter(torch.randn(50, 30))]
    masks = ([ImplicitMask(p, d, seed=2, param_id=i, block=256) for i, (p, d) in enumerate(zip(params, (0.8, 0.5)))]
             if form == "implicit" else
             [Block16Mask(random_mask(p, d, seed=i), p) for i, (p, d) in enumerate(zip(params, (0.8, 0.5)))])
    nnz, chunk = masks[0].nnz, 4096
    assert nnz > 3 * chunk
    grads = [torch.randn_like(p) for p in params]
    opt = SparseAdamW(params, masks, lr=1e-3, state_bits=8)

    def update():
        for p, g in zip(params, grads):
            p.grad = g
            opt.compact_(p)
        opt.step()
        opt.zero_grad()

    update()  # lazy set-up (code books, the block16 mask's validation) is not a transient
    peak = _transient_peak(update)
    indices = 4 * chunk if form == "implicit" else 0
    assert 8 * chunk + indices <= peak <= 9 * chunk + indices + 2048 + 4 * chunk // 256, peak
    # and seat.memory models it
    opts = Options(index_encoding=form, optimizer_bits=8, state_chunk=chunk)
    assert _chunk_update_bytes(opts, nnz) == 9 * chunk + 4 * -(-chunk // 256) + indices
    assert _chunk_update_bytes(opts, chunk) == 9 * chunk + 4 * -(-chunk // 256)  # one chunk: the mask itself


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_8bit_set_masks_to_an_encoded_mask_keeps_training(form):
    model = Tiny(torch.float32, "cpu")
    opt = SparseAdamW(model.parameters(), _encoded_masks(model, form), lr=1e-2, state_bits=8,
                      update_in_backward=True)
    _train(model, opt, None, 2, torch.float32)
    before = {p: dict(zip(mask_indices(opt._masks[p]).tolist(), opt.dequantized_state(p)["exp_avg"].tolist()))
              for p in model.parameters()}
    new = [ImplicitMask(p, 0.5, seed=9, param_id=i, block=256) if form == "implicit"
           else Block16Mask(random_mask(p, 0.5, seed=9 + i), p) for i, p in enumerate(model.parameters())]
    opt.set_masks(new)
    for p, m in zip(model.parameters(), new):
        after = opt.dequantized_state(p)["exp_avg"]
        assert after.numel() == m.nnz and opt.state[p]["exp_avg"].dtype == torch.uint8
        absmax = opt.state[p]["exp_avg_absmax"].repeat_interleave(256)[:after.numel()]
        for j, pos in enumerate(mask_indices(m).tolist()):
            old = before[p].get(pos, 0.0)
            assert abs(after[j].item() - old) <= optim.quantization_error_bound("exp_avg") * absmax[j].item() + 1e-9
    _train(model, opt, None, 2, torch.float32, start=2)
    assert all(opt.state[p]["step"] == 4 for p in model.parameters())
