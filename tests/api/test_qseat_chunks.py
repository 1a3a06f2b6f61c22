"""QSEAT's row chunks (seat.quant._chunks): a 4-bit weight's forward and backward made
one block-aligned row chunk at a time equal the whole-weight computation, for every mask
encoding, nf4 / fp4, nested (double-quantized) or not, and row counts that do not divide
into chunks. The chunk size is forced small (seat._constants.QSEAT_CHUNK_BYTES) so that
tiny weights run several chunks."""
from __future__ import annotations

import types

import pytest
import torch

from _quant4 import ENCODINGS, bnb_reference, make_mask, quantize
from seat import _constants
from seat.quant import _chunks
from seat.ops.dequant4_delta import quant4_of as _quant4_of
from seat.quant._target import Dequant4DeltaLinear, QuantTarget, Switch

pytest.importorskip("bitsandbytes")

# (out, in): rows per aligned group is 1 (in 64, blocksize 64), 2 (in 96: 3 blocks per 2
# rows) or, nested (blocks of 64 * 256 elements), 256 (in 64) and 128 (in 128); the row
# counts leave a partial last chunk
SHAPES = {False: [(37, 64), (45, 96)], True: [(600, 64), (300, 128)]}


def _target(shape, encoding, quant_type, nested, dtype, density=0.2):
    packed, state = quantize(shape, quant_type=quant_type, nested=nested, dtype=dtype)
    packed.quant_state = state
    mask, idx = make_mask(encoding, shape[0] * shape[1], density)
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(dtype)
    module = types.SimpleNamespace(weight=packed, bias=bias)
    settings = types.SimpleNamespace(compute_dtype=str(dtype).removeprefix("torch."), numel=idx.numel())
    gen = torch.Generator().manual_seed(4)
    delta = torch.nn.Parameter((torch.randn(idx.numel(), generator=gen) * 0.1).to(dtype))
    return QuantTarget("w", module, mask, delta, settings, Switch()), packed, state, idx


def _run(target, x, bias):
    x = x.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    target.delta.grad = None
    y = Dequant4DeltaLinear.apply(x, target.delta, bias, target)
    gen = torch.Generator().manual_seed(7)
    y.backward(torch.randn(y.shape, generator=gen).to(y.dtype))
    return y.detach(), x.grad, target.delta.grad.clone(), bias.grad


def _tolerance(dtype, roundings):
    """Relative to a result's largest value: the BLAS may sum a dot product in another
    order for a matmul of another width (the chunk's rows), a float sum's reordering over
    <= 600 terms in fp32 (1e-5), one rounding in bf16 (2**-8); the input gradient is the
    sum of the chunks' products, rounded to the compute dtype once per chunk
    (`roundings`): that is the chunked input gradient's error in bf16."""
    return 1e-5 * roundings if dtype == torch.float32 else 2**-8 * (roundings + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_chunked_forward_and_backward_equal_the_whole_weight(encoding, quant_type, nested, dtype, monkeypatch):
    """Forward output and delta gradient bit for bit (each output and each entry's
    gradient is one dot product over the same inputs); the input gradient sums the
    chunks' rows one chunk after another instead of in one matmul: fp32 within 1e-5
    relative of its largest value (a float sum's reordering over <= 600 rows), bf16
    within the rounding of one bf16 add per chunk (2**-8 relative)."""
    for shape in SHAPES[nested]:
        target, packed, state, idx = _target(shape, encoding, quant_type, nested, dtype)
        x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(9)).to(dtype)
        bias = target.module.bias
        monkeypatch.setattr(_constants, "QSEAT_CHUNK_BYTES", 1 << 40)
        assert _chunks.n_chunks(state, dtype) == 1
        whole = _run(target, x, bias)
        item = torch.empty(0, dtype=dtype).element_size()
        group = _chunks.rows_per_chunk(shape[0], shape[1], _chunks.alignment(_quant4_of(state)), item, 1)
        # one aligned row group per chunk, then two (a partial last chunk: no row count
        # here is a whole number of pairs of groups)
        for budget in (1, 2 * group * shape[1] * item):
            monkeypatch.setattr(_constants, "QSEAT_CHUNK_BYTES", budget)
            assert _chunks.n_chunks(state, dtype) >= 2
            chunked = _run(target, x, bias)
            assert torch.equal(chunked[3], whole[3]), shape  # the bias gradient: the same sum
            n = _chunks.n_chunks(state, dtype)
            for got, want, tol in [(chunked[0], whole[0], _tolerance(dtype, 1)),
                                   (chunked[1], whole[1], _tolerance(dtype, n)),
                                   (chunked[2], whole[2], _tolerance(dtype, 1))]:
                err = (got.float() - want.float()).abs().max()
                assert err <= tol * want.float().abs().max(), (shape, budget, err)
        # and the whole computation is the naive one on bnb's dequantized weight
        w = bnb_reference(packed, state, idx, target.delta.detach(), dtype)
        torch.testing.assert_close(whole[0], torch.nn.functional.linear(x, w, bias))
        monkeypatch.undo()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_chunks_cover_the_weight_on_block_boundaries(nested, monkeypatch):
    """Every row once, in order; every boundary on a quantization block (a nested absmax
    block when nested); the chunks' slots tile the mask; each chunk's dequantized rows are
    the whole weight's rows."""
    from seat.ops import dequant4_delta

    shape = SHAPES[nested][1]
    packed, state = quantize(shape, nested=nested, dtype=torch.float32)
    mask, idx = make_mask("implicit", shape[0] * shape[1], 0.1)
    whole = dequant4_delta(packed, state, dtype=torch.float32)
    monkeypatch.setattr(_constants, "QSEAT_CHUNK_BYTES", 3 * shape[1] * 4)  # 3 rows' worth: rounded to a group
    chunks = list(_chunks.row_chunks(packed, state, mask, torch.float32, with_delta=True))
    assert len(chunks) >= 2
    assert [c.r0 for c in chunks] == [0] + [c.r1 for c in chunks[:-1]] and chunks[-1].r1 == shape[0]
    align = 64 * (256 if nested else 1)
    assert all(c.r0 * shape[1] % align == 0 for c in chunks)
    assert [c.s0 for c in chunks] == [0] + [c.s1 for c in chunks[:-1]] and chunks[-1].s1 == idx.numel()
    for c in chunks:
        assert torch.equal(dequant4_delta(c.packed, c.q, dtype=torch.float32), whole[c.r0:c.r1])
        assert torch.equal(c.positions.long() + c.r0 * shape[1], idx[c.s0:c.s1].long())


def test_rows_per_chunk_stays_within_the_budget():
    assert _chunks.rows_per_chunk(28672, 8192, 64 * 256, 2, 16 << 20) == 1024
    assert _chunks.rows_per_chunk(8192, 28672, 64 * 256, 2, 16 << 20) == 292  # groups of 4 rows
    assert _chunks.rows_per_chunk(10, 8192, 64, 2, 16 << 20) == 10  # the whole weight
    assert _chunks.rows_per_chunk(1000, 96, 64, 4, 1) == 2  # at least one aligned group


@pytest.mark.parametrize("mode", ["default", "implicit+lean"])
def test_training_in_row_chunks_follows_the_whole_weight_training(mode, monkeypatch):
    """seat.patch on a tiny 4-bit model (fp32 compute), three steps, with every weight in
    one chunk and in row chunks of 1 KiB (several per weight): the same losses and deltas
    up to the input gradient's summation order (the lean modes' update in backward takes
    the delta's gradient from the hook once per backward either way)."""
    import seat
    from _models import paired_batch
    from _qseat_helpers import tiny_4bit_model

    kwargs, encoding = {"default": ({}, "int32"),
                        "implicit+lean": (dict(update_in_backward=True, state_bits=8), "implicit")}[mode]

    def train(chunk_bytes):
        monkeypatch.setattr(_constants, "QSEAT_CHUNK_BYTES", chunk_bytes)
        model = tiny_4bit_model("qwen2", compute_dtype=torch.float32)
        handle = seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding=encoding))
        chunks = [_chunks.n_chunks(t.module.weight.quant_state, torch.float32) for t in handle.targets.values()]
        opt = handle.optimizer(lr=1e-2, **kwargs)
        losses = []
        for _ in range(3):
            out = handle.loss(paired_batch(seed=0))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
        return losses, [t.delta.detach().clone() for t in handle.targets.values()], chunks

    whole, whole_deltas, ones = train(1 << 40)
    chunked, chunked_deltas, counts = train(1 << 10)
    assert set(ones) == {1} and min(counts) >= 2
    assert chunked == pytest.approx(whole, rel=1e-5)
    for a, b in zip(chunked_deltas, whole_deltas):
        # Adam divides by the gradient's own scale: an entry whose gradient is near zero
        # moves by up to lr per step whatever its last bits, so the deltas are compared
        # against a thousandth of lr (they moved by ~lr per step)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert a.abs().max() > 1e-3
