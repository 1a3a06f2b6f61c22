"""torch.library.opcheck on every registered op (schema, fake tensor, autograd
registration, AOT dispatch), on each backend that implements it on the CPU."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops


def _idx(*values):
    return torch.tensor(values, dtype=torch.int32)


def _samples(name: str, device):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)

    if name == "masked_gather_":
        return [((randn(3), randn(4, 5), _idx(0, 7, 19).to(device)), {}),
                ((randn(0), randn(6, dtype=torch.bfloat16), _idx().to(device)), {}),
                ((randn(3, dtype=torch.bfloat16), randn(4, 5), _idx(1, 2, 18).to(device)), {})]  # lean bf16 grad
    if name == "masked_swap_":
        return [((randn(4, 5), _idx(1, 2, 18).to(device), randn(3)), {}),
                ((randn(7, dtype=torch.float16), _idx(0, 6).to(device), randn(2, dtype=torch.float16)), {})]
    if name == "sparse_adamw_":
        kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, maximize=False)
        params = [randn(4, 5), randn(9, dtype=torch.bfloat16)]
        idxs = [_idx(0, 3, 19).to(device), _idx(2, 8).to(device)]
        state = lambda: [randn(3).abs(), randn(2).abs()]  # noqa: E731
        empty = torch.empty(0, device=device)
        return [((params, idxs, state(), state(), state(), [empty, randn(2)], [empty, empty.clone()]), kwargs),
                (([params[0]], [idxs[0]], [randn(3)], [randn(3)], [randn(3).abs()], [empty.clone()], [randn(3).abs()]),
                 {**kwargs, "maximize": True}),
                # lean mode: bf16 compact gradients with fp32 state
                ((params, idxs, [randn(3, dtype=torch.bfloat16), randn(2, dtype=torch.bfloat16)], state(), state(),
                  [empty, empty.clone()], [empty, empty.clone()]), kwargs)]
    if name in IMPLICIT_OPS:
        return _implicit_samples(name, device, randn)
    if name in BLOCK16_OPS:
        return _block16_samples(name, device, randn)
    if name == "kl_div":
        kw = dict(temperature=1.0, reduction="mean", num_items=None, reverse=False, compute_grad=True)
        return [((randn(2, 3, 11, grad=True), randn(2, 3, 11), None), kw),
                ((randn(5, 7, grad=True), randn(5, 7), torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool).to(device)),
                 {**kw, "reduction": "none", "reverse": True, "temperature": 2.0})]
    paired = dict(kl_weight=1.5, ignore_index=-100, temperature=1.0, reduction="mean", ce_num_items=None,
                  kl_num_items=None, reverse_kl=False, compute_grad=True)
    labels = torch.tensor([3, -100, 5], dtype=torch.int64).to(device)
    if name == "paired_loss":
        return [((randn(5, 9, grad=True), labels, randn(2, 9), None), paired),
                ((randn(5, 9, grad=True), labels, randn(2, 9), torch.tensor([True, False]).to(device)),
                 {**paired, "reduction": "sum"})]
    if name == "fused_linear_paired_loss":
        fused = {**paired, "chunk_size": 0}
        return [((randn(5, 4, grad=True), randn(9, 4), labels, randn(2, 4), None, None), fused),
                ((randn(5, 4, grad=True), randn(9, 4), labels, randn(2, 4), None, randn(9)), {**fused, "chunk_size": 2})]
    raise AssertionError(f"no opcheck samples for seat.ops.{name}: add them here")


IMPLICIT_OPS = ("implicit_block_offsets_", "masked_gather_implicit_", "masked_swap_implicit_", "sparse_adamw_implicit_")


def _implicit_samples(name, device, randn):
    from seat.ops import implicit_masks as im

    def mask(numel, density, seed, block=256):
        args = dict(seed=seed, param_id=1, threshold=im.threshold_for(density), block=block)
        offsets = torch.empty(im.n_blocks(numel, block) + 1, dtype=torch.int32)
        ops.implicit_block_offsets_(offsets, numel=numel, **args)
        return args, offsets.to(device), int(offsets[-1])

    if name == "implicit_block_offsets_":
        args, _, _ = mask(600, 0.3, 0)
        return [((torch.empty(4, dtype=torch.int32, device=device),), {"numel": 600, **args}),
                ((torch.empty(1, dtype=torch.int32, device=device),), {"numel": 0, **args})]
    a, offsets_a, nnz_a = mask(20, 0.5, 0)
    b, offsets_b, nnz_b = mask(700, 0.2, 3)
    if name == "masked_gather_implicit_":
        return [((randn(nnz_a), randn(4, 5), offsets_a), a),
                ((randn(nnz_b), randn(700, dtype=torch.bfloat16), offsets_b), b)]
    if name == "masked_swap_implicit_":
        return [((randn(4, 5), offsets_a, randn(nnz_a)), a),
                ((randn(700, dtype=torch.float16), offsets_b, randn(nnz_b, dtype=torch.float16)), b)]
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, maximize=False,
                  seeds=[a["seed"], b["seed"]], param_ids=[1, 1], thresholds=[a["threshold"], b["threshold"]],
                  blocks=[256, 256])
    params = [randn(4, 5), randn(700, dtype=torch.bfloat16)]
    state = lambda: [randn(nnz_a).abs(), randn(nnz_b).abs()]  # noqa: E731
    empty = torch.empty(0, device=device)
    one = {k: (v[:1] if isinstance(v, list) else v) for k, v in kwargs.items()}
    return [((params, [offsets_a, offsets_b], state(), state(), state(), [empty, randn(nnz_b)],
              [empty, empty.clone()]), kwargs),
            (([params[0]], [offsets_a], [randn(nnz_a)], [randn(nnz_a)], [randn(nnz_a).abs()], [empty.clone()],
              [randn(nnz_a).abs()]), {**one, "maximize": True, "stochastic_rounding": True})]


BLOCK16_OPS = ("masked_gather_block16_", "masked_swap_block16_", "sparse_adamw_block16_")


def _block16_samples(name, device, randn):
    def enc(numel, *values):
        return tuple(t.to(device) for t in ops.encode_block16(_idx(*values), numel))

    a, b = enc(20, 0, 7, 19), enc(70_000, 3, 65_535, 65_536, 69_999)
    if name == "masked_gather_block16_":
        return [((randn(3), randn(4, 5), *a), {}), ((randn(4), randn(70_000, dtype=torch.bfloat16), *b), {})]
    if name == "masked_swap_block16_":
        return [((randn(4, 5), *a, randn(3)), {}),
                ((randn(70_000, dtype=torch.float16), *b, randn(4, dtype=torch.float16)), {})]
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, maximize=False)
    params = [randn(4, 5), randn(70_000, dtype=torch.bfloat16)]
    state = lambda: [randn(3).abs(), randn(4).abs()]  # noqa: E731
    empty = torch.empty(0, device=device)
    return [((params, [a[0], b[0]], [a[1], b[1]], state(), state(), state(), [empty, randn(4)],
              [empty, empty.clone()]), kwargs),
            (([params[0]], [a[0]], [a[1]], [randn(3)], [randn(3)], [randn(3).abs()], [empty.clone()],
              [randn(3).abs()]), {**kwargs, "maximize": True, "stochastic_rounding": True})]


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_opcheck(name, backend):
    device = backend_device(name, backend)
    op = getattr(torch.ops.seat, name).default
    with ops.use_backend(backend):
        for args, kwargs in _samples(name, device):
            torch.library.opcheck(op, args, kwargs)


def test_every_op_in_the_design_table_is_registered():
    expected = {"masked_gather_", "masked_swap_", "sparse_adamw_", "kl_div", "paired_loss",
                "fused_linear_paired_loss", *IMPLICIT_OPS, *BLOCK16_OPS}
    assert set(ops.OPS) == expected
    for name in expected:
        assert hasattr(torch.ops.seat, name)
