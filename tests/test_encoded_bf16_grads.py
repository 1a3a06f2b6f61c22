"""sparse_adamw_ and masked_gather_ with implicit / block16 masks read and write bf16
compact gradients for fp32 state (the lean mode grad_dtype=torch.bfloat16), in every
backend: the step is the int32 mask's with the same bf16 gradient, bit for bit, and the
gather writes the bf16 buffer directly (no fp32 copy of it), in SparseAdamW too."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops
from seat.masks import Block16Mask, ImplicitMask, random_mask


def _mask(form, numel, seed):
    if form == "implicit":
        return ImplicitMask(numel, 0.3, seed=seed, param_id=seed, block=256)
    return Block16Mask(random_mask(numel, 0.3, seed=seed), numel)


def _step(form, params, masks, grads, ms, vs, masters, **hyper):
    """One sparse_adamw_ call with the masks as given (`form`) or as int32 indices."""
    masks = [m.indices() for m in masks] if form == "int32" else masks
    ops.sparse_adamw_(params, masks, grads, ms, vs, masters, **hyper)


@pytest.mark.parametrize("form", ["implicit", "block16"])
@pytest.mark.parametrize("param_dtype,master,sr", [(torch.float32, False, False), (torch.bfloat16, True, False),
                                                   (torch.bfloat16, False, True), (torch.float16, True, False)])
def test_bf16_grads_step_as_the_int32_op(backend, form, param_dtype, master, sr):
    device = backend_device("sparse_adamw_", backend)
    g = torch.Generator().manual_seed(0)
    sizes = (3000, 517, 64)
    results = {}
    for which in (form, "int32"):
        masks = [_mask(form, n, i).to(device) for i, n in enumerate(sizes)]
        params = [torch.randn(n, generator=torch.Generator().manual_seed(i)).to(param_dtype).to(device)
                  for i, n in enumerate(sizes)]
        nnz = [m.indices().numel() for m in masks]
        ms = [torch.zeros(k, device=device) for k in nnz]
        vs = [torch.zeros(k, device=device) for k in nnz]
        masters = [p.view(-1)[m.indices().long()].float() if master else None for p, m in zip(params, masks)]
        for step in range(1, 4):
            grads = [torch.randn(k, generator=torch.Generator().manual_seed(10 * step + k)).to(torch.bfloat16)
                     .to(device) for k in nnz]
            with ops.use_backend(backend):
                _step(which, params, masks, grads, ms, vs, masters, lr=1e-2, weight_decay=0.01, step=step,
                      stochastic_rounding=sr, seed=5)
        results[which] = params + ms + vs + [m for m in masters if m is not None]
    del g
    for a, b in zip(results[form], results["int32"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_bf16_grads_need_fp32_state(form):
    m = _mask(form, 1000, 0)
    k = m.indices().numel()
    p = torch.randn(1000, dtype=torch.float64)
    with pytest.raises(TypeError, match="grads\\[0\\] must be float64 for a float64 param"):
        _step(form, [p], [m], [torch.zeros(k, dtype=torch.bfloat16)], [torch.zeros(k, dtype=torch.float64)],
              [torch.zeros(k, dtype=torch.float64)], [None], lr=1e-2, step=1)
    with pytest.raises(TypeError, match="grads\\[0\\] must be float32 or bfloat16"):
        _step(form, [torch.randn(1000)], [m], [torch.zeros(k, dtype=torch.float16)], [torch.zeros(k)],
              [torch.zeros(k)], [None], lr=1e-2, step=1)


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_bf16_gather_equals_the_int32_gather(backend, form):
    """masked_gather_ into a bf16 buffer: the fp32 sum rounded once, as with int32 indices."""
    device = backend_device("masked_gather_", backend)
    mask = _mask(form, 5000, 3).to(device)
    dense = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(device)
    outs = {}
    for which in (form, "int32"):
        out = torch.randn(mask.nnz, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)
        with ops.use_backend(backend):
            ops.masked_gather_(out, dense, mask if which == form else mask.indices())
        outs[which] = out
    assert outs[form].dtype == torch.bfloat16 and torch.equal(outs[form], outs["int32"])


def _model_and_masks(form):
    torch.manual_seed(0)
    model = torch.nn.Linear(120, 90)
    return model, [_mask(form, p.numel(), i) for i, p in enumerate(model.parameters())]


@pytest.mark.parametrize("update_in_backward", [False, True], ids=["buffer", "in-backward"])
@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_optimizer_gathers_encoded_masks_into_bf16_directly(monkeypatch, form, update_in_backward):
    """grad_dtype=torch.bfloat16 with an encoded mask: every gather writes the bf16 compact
    gradient itself (no fp32 copy of it first)."""
    from seat.optim import SparseAdamW

    model, masks = _model_and_masks(form)
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2, grad_dtype=torch.bfloat16,
                      update_in_backward=update_in_backward)
    seen = []
    gather = ops.masked_gather_

    def spy(out, dense, mask):
        seen.append((out.dtype, out.numel(), mask.encoding))
        return gather(out, dense, mask)

    monkeypatch.setattr(ops, "masked_gather_", spy)
    model(torch.randn(4, 120)).pow(2).mean().backward()
    opt.step()
    assert seen == [(torch.bfloat16, m.nnz, form) for m in reversed(masks)]  # backward: bias first


@pytest.mark.parametrize("form", ["implicit", "block16"])
def test_bf16_gather_of_an_encoded_mask_allocates_nothing(form):
    """With the native kernels the hook's gather allocates nothing, for the bf16 buffer
    as for the fp32 one (the reference backend decodes the mask: not measured)."""
    from test_optim_lean import _transient_peak

    from seat.ops import _native
    from seat.optim import SparseAdamW

    try:
        _native.load()
    except _native.NativeBuildError as exc:
        pytest.skip(f"needs the native cpu kernels: {exc}")
    model, masks = _model_and_masks(form)
    opt = SparseAdamW(model.parameters(), masks, lr=1e-2, grad_dtype=torch.bfloat16)
    grads = [torch.randn_like(p) for p in model.parameters()]

    def hooks():
        for p, g in zip(model.parameters(), grads):
            p.grad = g
            opt.compact_(p)

    with ops.use_backend("cpu"):
        hooks()
        opt.zero_grad()
        assert _transient_peak(hooks) == 0
