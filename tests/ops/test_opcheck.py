"""torch.library.opcheck on every registered op (schema, fake tensor, autograd
registration, AOT dispatch), on each backend that implements it on the CPU."""
from __future__ import annotations

import pytest
import torch
from conftest import backend_device

from seat import ops
from seat.ops import _encodings


def _samples(name: str, device):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)

    if name in ("masked_gather_", "masked_swap_", "sparse_adamw_", "implicit_block_offsets_"):
        return _sparse_update_samples(name, device, randn)
    if name == "dequant4_delta":
        return _dequant4_samples(device)
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


def _masks(device):
    """Two masks per encoding, over tensors of 20 and 70,000 elements, as MaskArgs."""
    from seat.masks import Block16Mask, ImplicitMask

    out = {}
    for encoding in ("int32", "block16", "implicit"):
        pair = []
        for numel, density, seed in ((20, 0.5, 0), (70_000, 0.01, 3)):
            hashed = ImplicitMask(numel, density, seed=seed, param_id=1, block=256)
            mask = {"int32": hashed.indices(), "block16": Block16Mask(hashed.indices(), numel),
                    "implicit": hashed}[encoding]
            pair.append(_encodings.as_mask_args("mask", mask.to(device)))
        out[encoding] = pair
    return out


def _sparse_update_samples(name, device, randn):
    if name == "implicit_block_offsets_":
        args = dict(seed=0, param_id=1, threshold=2**30, block=256)
        return [((torch.empty(4, dtype=torch.int32, device=device),), {"numel": 600, **args}),
                ((torch.empty(1, dtype=torch.int32, device=device),), {"numel": 0, **args})]
    samples = []
    for encoding, (a, b) in _masks(device).items():
        na = _nnz(a)
        nb = _nnz(b)
        if name == "masked_gather_":
            samples += [((randn(na), randn(4, 5), a.index, a.offsets, a.encoding, list(a.ints)), {}),
                        ((randn(nb, dtype=torch.bfloat16), randn(70_000, dtype=torch.bfloat16), b.index, b.offsets,
                          b.encoding, list(b.ints)), {})]  # the lean bf16 compact gradient
        elif name == "masked_swap_":
            samples += [((randn(4, 5), a.index, randn(na), a.offsets, a.encoding, list(a.ints)), {}),
                        ((randn(70_000, dtype=torch.float16), b.index, randn(nb, dtype=torch.float16), b.offsets,
                          b.encoding, list(b.ints)), {})]
        else:
            kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, maximize=False,
                          encoding=a.encoding, mask_ints=[*a.ints, *b.ints])
            params = [randn(4, 5), randn(70_000, dtype=torch.bfloat16)]
            state = lambda: [randn(na).abs(), randn(nb).abs()]  # noqa: E731
            empty = torch.empty(0, device=device)
            masks = ([a.index, b.index], [a.offsets, b.offsets])
            samples += [((params, *masks, state(), state(), state(), [empty, randn(nb)], [empty, empty.clone()]),
                         kwargs),
                        (([params[0]], [a.index], [a.offsets], [randn(na)], [randn(na)], [randn(na).abs()],
                          [empty.clone()], [randn(na).abs()]),
                         {**kwargs, "mask_ints": list(a.ints), "maximize": True, "stochastic_rounding": True}),
                        # lean mode: bf16 compact gradients with fp32 state
                        ((params, *masks, [randn(na, dtype=torch.bfloat16), randn(nb, dtype=torch.bfloat16)],
                          state(), state(), [empty, empty.clone()], [empty, empty.clone()]), kwargs)]
    return samples


def _dequant4_samples(device):
    """A plain and a double-quantized 4-bit weight, without and with a delta per encoding."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from _quant4 import make_mask, quantize

    from seat.ops.dequant4_delta import quant4_of

    samples = []
    for nested, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        packed, qs = quantize((9, 30), nested=nested, dtype=dtype)
        q = quant4_of(qs)
        head = (packed.to(device), q.absmax.to(device), q.code.to(device), q.blocksize, list(q.shape), dtype,
                None if q.nested_absmax is None else q.nested_absmax.to(device),
                None if q.nested_code is None else q.nested_code.to(device), q.nested_blocksize, q.offset)
        samples.append((head, {}))
        for encoding in ("int32", "block16", "implicit", "full"):
            mask, idx = make_mask(encoding, 270, 0.2, device=device)
            a = _encodings.as_mask_args("mask", mask)
            samples.append(((*head, a.index, torch.randn(idx.numel()).to(dtype).to(device), a.offsets, a.encoding,
                             list(a.ints)), {}))
    return samples


def _nnz(mask) -> int:
    """Entries of a mask given as MaskArgs (the last prefix count of the encoded ones)."""
    return mask.index.numel() if mask.encoding == _encodings.INDEX else int(mask.index[-1])


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_opcheck(name, backend):
    device = backend_device(name, backend)
    op = getattr(torch.ops.seat, name).default
    with ops.use_backend(backend):
        for args, kwargs in _samples(name, device):
            torch.library.opcheck(op, args, kwargs)


def test_every_op_in_the_design_table_is_registered():
    expected = {"masked_gather_", "masked_swap_", "sparse_adamw_", "implicit_block_offsets_", "kl_div",
                "paired_loss", "fused_linear_paired_loss", "dequant4_delta"}
    assert set(ops.OPS) == expected
    for name in expected:
        assert hasattr(torch.ops.seat, name)
