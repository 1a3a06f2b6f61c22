"""sparse_adamw_implicit_ / sparse_adamw_block16_ read bf16 compact gradients for fp32
state (the lean mode grad_dtype=torch.bfloat16, issue 9), in every backend: the step is
the int32 sparse_adamw_'s with the same bf16 gradient, bit for bit."""
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
    if form == "int32":
        ops.sparse_adamw_(params, [m.indices() for m in masks], grads, ms, vs, masters, **hyper)
    elif form == "implicit":
        ops.sparse_adamw_implicit_(params, [m.block_offsets for m in masks], grads, ms, vs, masters,
                                   seeds=[m.seed for m in masks], param_ids=[m.param_id for m in masks],
                                   thresholds=[m.threshold for m in masks], blocks=[m.block for m in masks], **hyper)
    else:
        ops.sparse_adamw_block16_(params, [m.block_starts for m in masks], [m.offsets for m in masks], grads, ms, vs,
                                  masters, **hyper)


@pytest.mark.parametrize("form", ["implicit", "block16"])
@pytest.mark.parametrize("param_dtype,master,sr", [(torch.float32, False, False), (torch.bfloat16, True, False),
                                                   (torch.bfloat16, False, True), (torch.float16, True, False)])
def test_bf16_grads_step_as_the_int32_op(backend, form, param_dtype, master, sr):
    device = backend_device(f"sparse_adamw_{form}_", backend)
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
