"""seat.optim.SparseAdamW: against torch.optim.AdamW on the masked entries (float64 oracle,
real backward passes through a model), on every backend; hooks, accumulation, clipping,
schedulers and checkpoints."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device, tol

from seat import ops
from seat.masks import random_mask
from seat.optim import SparseAdamW

STEPS = 25


class Tiny(torch.nn.Module):
    """Odd shapes: a 17x13 and a 1x17 weight, and a 13-entry bias."""

    def __init__(self, dtype, device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(17, 13, generator=g).to(dtype).to(device))
        self.b = torch.nn.Parameter(torch.randn(1, 17, generator=g).to(dtype).to(device))
        self.c = torch.nn.Parameter(torch.randn(13, generator=g).to(dtype).to(device))

    def forward(self, x):
        return (torch.tanh(x @ self.a.T + 0.1) @ self.b.T).squeeze(-1) + (x * self.c).sum(-1)


def _batch(step, dtype, device):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 13, generator=g).to(dtype).to(device), torch.randn(8, generator=g).to(dtype).to(device)


def _masks(model, densities=(0.2, 1 / 17, 1.0)):
    """Sparse, a single entry (nnz = 1), and the full mask."""
    return {p: random_mask(p, d, seed=i).to(p.device) for i, (p, d) in enumerate(zip(model.parameters(), densities))}


def _oracle(model, masks, opt_kwargs, schedule):
    """torch.optim.AdamW (float64, foreach=False) on a leaf per param holding its masked
    entries, fed the masked entries of each step's dense gradient."""
    params = list(model.parameters())
    leaves = [p.detach().double().view(-1)[masks[p].long()].clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(leaves, foreach=False, **opt_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return params, leaves, opt, sched


CASES = {
    "plain": dict(lr=1e-2, weight_decay=0.0),
    "weight_decay": dict(lr=1e-2, weight_decay=0.1),
    "amsgrad": dict(lr=1e-2, weight_decay=0.05, amsgrad=True),
    "maximize": dict(lr=1e-2, weight_decay=0.0, maximize=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_adamw_on_masked_entries(backend, case, dtype):
    device = backend_device("sparse_adamw_", backend)
    model = Tiny(dtype, device)
    base = [p.detach().clone() for p in model.parameters()]
    masks = _masks(model)
    kwargs = CASES[case]
    schedule = lambda s: 1.0 / (1 + 0.1 * s)  # noqa: E731 - an LR schedule, not a constant lr
    params, leaves, ref_opt, ref_sched = _oracle(model, masks, kwargs, schedule)
    master = dtype in (torch.bfloat16, torch.float16)
    opt = SparseAdamW(model.parameters(), masks, master_weights=master, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    with ops.use_backend(backend):
        for step in range(STEPS):
            x, y = _batch(step, dtype, device)
            loss = (model(x) - y).pow(2).mean()
            # the oracle's gradient: the dense gradient at this point, at the masked entries
            dense = torch.autograd.grad(loss, params, retain_graph=True)
            for leaf, p, g in zip(leaves, params, dense):
                leaf.grad = g.double().reshape(-1)[masks[p].long()]
            loss.backward()
            opt.step()
            opt.zero_grad()
            ref_opt.step()
            ref_sched.step()
            sched.step()
    for p, leaf, p0 in zip(params, leaves, base):
        outside = torch.ones(p.numel(), dtype=torch.bool, device=device)
        outside[masks[p].long()] = False
        assert torch.equal(p.detach().view(-1)[outside], p0.view(-1)[outside]), "an entry outside the mask moved"
        got = p.detach().view(-1)[masks[p].long()]
        if master:  # the fp32 master follows the oracle; the param is its rounding
            torch.testing.assert_close(opt.state[p]["master"].double(), leaf.detach(), rtol=1e-4, atol=1e-5)
            assert torch.equal(got, opt.state[p]["master"].to(dtype))
        else:
            torch.testing.assert_close(got.double(), leaf.detach(), **tol(dtype) if dtype == torch.float64
                                       else dict(rtol=1e-4, atol=1e-5))


def test_bf16_without_master_tracks_the_oracle_loosely():
    model = Tiny(torch.bfloat16, "cpu")
    masks = _masks(model)
    params, leaves, ref_opt, _ = _oracle(model, masks, dict(lr=1e-2), lambda s: 1.0)
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2)
    for step in range(10):
        x, y = _batch(step, torch.bfloat16, "cpu")
        loss = (model(x) - y).float().pow(2).mean()
        dense = torch.autograd.grad(loss, params, retain_graph=True)
        for leaf, p, g in zip(leaves, params, dense):
            leaf.grad = g.double().reshape(-1)[masks[p].long()]
        loss.backward()
        opt.step(), opt.zero_grad(), ref_opt.step()
    for p, leaf in zip(params, leaves):
        torch.testing.assert_close(p.detach().view(-1)[masks[p].long()].double(), leaf.detach(), **tol(torch.bfloat16))


def test_one_dense_grad_alive_at_a_time_and_freed():
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(4)])
    masks = {p: random_mask(p, 0.1, seed=i) for i, p in enumerate(model.parameters())}
    opt = SparseAdamW(model.parameters(), masks, lr=1e-3)
    alive = []

    def count(_):
        alive.append(sum(p.grad is not None for p in model.parameters()))

    for p in model.parameters():  # registered after the optimizer's: runs after compaction
        p.register_post_accumulate_grad_hook(count)
    model(torch.randn(3, 16)).sum().backward()
    assert alive == [0, 0, 0, 0]
    assert all(p.grad is None for p in model.parameters())
    assert all(opt.compact_grad(p).abs().sum() > 0 for p in model.parameters())


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 5)
    masks = {p: random_mask(p, 0.3, seed=i) for i, p in enumerate(model.parameters())}
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2)
    x = torch.randn(8, 12, dtype=torch.float32)
    for half in (x[:4], x[4:]):
        (model(half).pow(2).sum()).backward()
    accumulated = [opt.compact_grad(p).clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    for p, acc in zip(model.parameters(), accumulated):
        torch.testing.assert_close(acc, opt.compact_grad(p), rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_matches_torch_on_the_masked_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 6)
    masks = {p: random_mask(p, 0.5, seed=i) for i, p in enumerate(model.parameters())}
    x = torch.randn(4, 10)
    dense = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
    masked = [g.reshape(-1)[masks[p].long()].clone() for p, g in zip(model.parameters(), dense)]
    expected_norm = torch.linalg.vector_norm(torch.cat(masked))
    masked = [m * min(1.0, 0.5 / (expected_norm.item() + 1e-6)) for m in masked]
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2)
    model(x).pow(2).sum().backward()
    norm = opt.clip_grad_norm_(0.5)
    torch.testing.assert_close(norm, expected_norm)
    for p, m in zip(model.parameters(), masked):
        torch.testing.assert_close(opt.compact_grad(p), m)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step, torch.float32, "cpu")
        (model(x) - y).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True), dict(master_weights=True, stochastic_rounding=True)])
def test_state_dict_round_trip_mid_run_continues_identically(tmp_path, options):
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    model = Tiny(dtype, "cpu")
    masks = _masks(model)
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2, weight_decay=0.01, **options)
    _train_any(model, opt, 5, dtype)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train_any(model, opt, 5, dtype, start=5)

    resumed = Tiny(dtype, "cpu")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    resumed_masks = {p: masks[q] for p, q in zip(resumed.parameters(), model.parameters())}
    opt2 = SparseAdamW(resumed.parameters(), resumed_masks, lr=1e-2, weight_decay=0.01, **options)
    opt2.load_state_dict(ckpt["opt"])
    for p in resumed.parameters():
        assert opt2.state[p]["exp_avg"].dtype == torch.float32  # not cast to the param dtype
    _train_any(resumed, opt2, 5, dtype, start=5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _train_any(model, opt, steps, dtype, start=0):
    for step in range(start, start + steps):
        x, y = _batch(step, dtype, "cpu")
        (model(x) - y).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_load_state_dict_with_another_mask_is_an_error():
    model = Tiny(torch.float32, "cpu")
    opt = SparseAdamW(model.parameters(), _masks(model), lr=1e-2)
    _train(model, opt, 1)
    other = SparseAdamW(model.parameters(), _masks(model, densities=(0.3, 1 / 17, 1.0)), lr=1e-2)
    with pytest.raises(ValueError, match="mask for parameter 0 differs"):
        other.load_state_dict(opt.state_dict())


def test_without_compaction_hooks_step_reads_dense_grads():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    b.load_state_dict(a.state_dict())
    masks_a = {p: random_mask(p, 0.5, seed=i) for i, p in enumerate(a.parameters())}
    masks_b = {q: masks_a[p] for p, q in zip(a.parameters(), b.parameters())}
    opt_a = SparseAdamW(a.parameters(), masks_a, lr=1e-2)
    opt_b = SparseAdamW(b.parameters(), masks_b, lr=1e-2, compact_grads=False)
    x = torch.randn(5, 6)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).pow(2).sum().backward()
        if opt is opt_b:
            assert all(p.grad is not None for p in b.parameters())
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_state_bytes_counts_compact_state_only():
    model = torch.nn.Linear(100, 100, bias=False)
    masks = {model.weight: random_mask(model.weight, 0.05, seed=0)}
    opt = SparseAdamW(model.parameters(), masks, lr=1e-3)
    assert opt.state_bytes() == 500 * (4 + 4 + 4 + 4)  # idx, exp_avg, exp_avg_sq, compact grad


def test_bad_construction_is_rejected():
    model = torch.nn.Linear(4, 3)
    w = model.weight
    with pytest.raises(ValueError, match="masks has no entry"):
        SparseAdamW(model.parameters(), {w: random_mask(w, 0.5, seed=0)})
    with pytest.raises(ValueError, match="masks has 1 entries for 2 parameters"):
        SparseAdamW(model.parameters(), [random_mask(w, 0.5, seed=0)])
    t = torch.nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="must be contiguous"):
        SparseAdamW([t], [random_mask(t, 0.5, seed=0)])
    with pytest.raises(ValueError, match=r"masks\[0\] holds values"):
        SparseAdamW([w], [torch.tensor([0, 12], dtype=torch.int32)])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SparseAdamW([w], [random_mask(w, 0.5, seed=0)], lr=-1.0)


@pytest.mark.parametrize("dense_state", [False, True])
def test_redrawn_masks_keep_state_of_kept_entries(backend, dense_state):
    """Paper-faithful mode: re-draw the mask mid-run (given as bool masks). Kept entries
    keep their moments, new ones start at zero (compact) or keep theirs (full-size);
    nothing outside the two masks moves; the backend agrees with the reference."""
    device = backend_device("sparse_adamw_", backend)
    results = {}
    for which in ("reference", backend):
        model = Tiny(torch.float32, device)
        base = [p.detach().clone() for p in model.parameters()]
        first = _masks(model, densities=(0.3, 0.3, 0.5))
        second = {p: random_mask(p, 0.3, seed=10 + i).to(device) for i, p in enumerate(model.parameters())}
        opt = SparseAdamW(model.parameters(), first, lr=1e-2, amsgrad=True, dense_state=dense_state)
        with ops.use_backend(which):
            for step in range(6):
                if step == 3:
                    bool_masks = {p: torch.zeros(p.shape, dtype=torch.bool, device=device).view(-1)
                                  .index_fill_(0, m.long(), True).view(p.shape) for p, m in second.items()}
                    before = {p: _state_by_position(opt, p) for p in model.parameters()}
                    opt.set_masks(bool_masks)
                    for p in model.parameters():
                        after = _state_by_position(opt, p)
                        kept = torch.isin(second[p], first[p])
                        for pos in second[p][kept].tolist():
                            assert after[pos] == before[p][pos]
                        if not dense_state:
                            assert all(after[pos] == 0.0 for pos in second[p][~kept].tolist())
                x, y = _batch(step, torch.float32, device)
                (model(x) - y).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        moved = [(p.detach() != b).view(-1) for p, b in zip(model.parameters(), base)]
        for p, m in zip(model.parameters(), moved):
            allowed = torch.zeros(p.numel(), dtype=torch.bool, device=device)
            allowed[first[p].long()] = True
            allowed[second[p].long()] = True
            assert not bool((m & ~allowed).any()), "an entry outside both masks moved"
        if dense_state:
            assert all(opt.state[p]["exp_avg"].numel() == p.numel() for p in model.parameters())
        results[which] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(results["reference"], results[backend]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _state_by_position(opt, p) -> dict[int, float]:
    state = opt.state[p]["exp_avg"]
    if opt.dense_state:
        return dict(enumerate(state.tolist()))
    return dict(zip(opt.state[p]["idx"].tolist(), state.tolist()))


def test_set_masks_with_pending_gradients_is_refused():
    model = Tiny(torch.float32, "cpu")
    opt = SparseAdamW(model.parameters(), _masks(model), lr=1e-2)
    x, y = _batch(0, torch.float32, "cpu")
    (model(x) - y).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match="after optimizer.step"):
        opt.set_masks(_masks(model))


def test_a_dropped_optimizer_is_freed_despite_its_hooks():
    import gc
    import weakref

    model = torch.nn.Linear(8, 4)
    opt = SparseAdamW(model.parameters(), {p: random_mask(p, 0.5, seed=i) for i, p in enumerate(model.parameters())})
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    model(torch.randn(2, 8)).sum().backward()  # the orphaned hooks do nothing
    assert model.weight.grad is not None


@pytest.mark.parametrize("options", [dict(), dict(state_bits=8), dict(update_in_backward=True),
                                     dict(grad_dtype=torch.bfloat16, master_weights=True)], ids=str)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_like_the_original(options, how):
    """copy.deepcopy and pickle (torch.save / torch.load) give a working optimizer over
    copies of the params, with its own hooks, that continues exactly as the original."""
    import copy
    import io

    from seat.masks import ImplicitMask

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(70))]
    masks = [random_mask(params[0], 0.2, seed=1), ImplicitMask(params[1], 0.3, seed=2, block=256)]
    opt = SparseAdamW(params, masks, lr=1e-2, **options)

    def step(o, ps, seed):
        g = torch.Generator().manual_seed(seed)
        sum((p * torch.randn(p.shape, generator=g)).sum() for p in ps).backward()
        o.step()
        o.zero_grad()

    step(opt, params, 0)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert all(a is not b and torch.equal(a, b) for a, b in zip(params, twin_params))
    for seed in (1, 2):
        step(opt, params, seed)
        step(twin, twin_params, seed)
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert all(s["step"] == 3 for s in twin.state.values())


@pytest.mark.parametrize("options", [dict(), dict(update_in_backward=True), dict(state_bits=8)], ids=str)
def test_a_grad_assigned_without_backward_is_used(options):
    """As in torch.optim: step() takes a .grad set by hand (no backward, so no hook ran),
    exactly as if backward had produced it, and frees it."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(30, 20))
    b.data.copy_(a.data)
    start = a.detach().clone()
    mask = random_mask(a, 0.2, seed=4)
    by_hand, by_backward = SparseAdamW([a], [mask], lr=1e-2, **options), SparseAdamW([b], [mask], lr=1e-2, **options)
    for seed in range(3):
        g = torch.randn(30, 20, generator=torch.Generator().manual_seed(seed))
        a.grad = g.clone()
        by_hand.step()
        (b * g).sum().backward()
        by_backward.step()
        assert a.grad is None
        by_hand.zero_grad()
        by_backward.zero_grad()
    assert torch.equal(a, b) and not torch.equal(a, start)


def test_a_tensor_step_in_a_loaded_state_dict_is_an_int():
    """torch.optim.AdamW saves step as a tensor; a state dict in that form resumes."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(30, 20))
    opt = SparseAdamW([p], [random_mask(p, 0.2, seed=4)], lr=1e-2)
    (p ** 2).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["step"] = torch.tensor(1.0)
    opt.load_state_dict(saved)
    assert opt.state[p]["step"] == 1 and isinstance(opt.state[p]["step"], int)
    (p ** 2).sum().backward()
    opt.step()
    assert opt.state[p]["step"] == 2
