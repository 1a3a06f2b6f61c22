"""dequant4_delta on every backend against bitsandbytes itself (dequantize_4bit, cast,
index_add of the delta), bit for bit: nf4 and fp4, double quantization or not, each
block size, each output dtype, odd shapes, each mask encoding, empty masks and no delta;
bnb's packing checked against bnb; bad input refused before any kernel runs."""
from __future__ import annotations

import re

import pytest
import torch
from _quant4 import ENCODINGS, bnb_reference, make_mask, quantize
from conftest import backend_device

from seat import ops
from seat.ops.dequant4_delta import Quant4, quant4_of

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: no 4-bit weights to test")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# odd numel, numel off a block boundary, one element, several block16 blocks
SHAPES = [(64, 128), (7, 9), (1,), (3, 65), (300, 229)]


def _run(backend, packed, qs, mask, delta, dtype):
    with ops.use_backend(backend):
        return ops.dequant4_delta(packed, qs, mask, delta, dtype=dtype)


def test_packing_is_bnb_high_nibble_first():
    """Element 2i is the high nibble of byte i, element 2i + 1 the low one (bnb's own
    dequantize of a hand-made byte says so; the reference and the kernels assume it)."""
    import bitsandbytes.functional as F

    packed, qs = quantize((2,), quant_type="nf4", blocksize=64, dtype=torch.float32)
    qs.absmax.fill_(1.0)
    packed.fill_(0x3C)  # high nibble 3, low nibble 12
    out = F.dequantize_4bit(packed, qs).reshape(-1)
    assert out.tolist() == [qs.code[3].item(), qs.code[12].item()]
    with ops.use_backend("reference"):
        assert ops.dequant4_delta(packed, qs, dtype=torch.float32).tolist() == out.tolist()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_bnb(backend, shape, quant_type, nested, dtype):
    device = backend_device("dequant4_delta", backend)
    packed, qs = quantize(shape, quant_type=quant_type, nested=nested, blocksize=64, dtype=dtype)
    numel = qs.shape.numel()
    mask, idx = make_mask("int32", numel, 0.1)
    delta = torch.randn(idx.numel(), generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = bnb_reference(packed, qs, idx, delta, dtype)
    plain = bnb_reference(packed, qs, None, None, dtype)
    qs.to(device)
    out = _run(backend, packed.to(device), qs, mask.to(device), delta.to(device), dtype)
    assert out.shape == qs.shape and out.dtype == dtype
    assert torch.equal(out.cpu(), expected)
    assert torch.equal(_run(backend, packed.to(device), qs, None, None, dtype).cpu(), plain)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_block_sizes(backend, blocksize, nested):
    device = backend_device("dequant4_delta", backend)
    packed, qs = quantize((129, 67), quant_type="nf4", nested=nested, blocksize=blocksize)
    mask, idx = make_mask("int32", qs.shape.numel(), 0.05)
    delta = torch.randn(idx.numel()).to(torch.bfloat16)
    expected = bnb_reference(packed, qs, idx, delta, torch.bfloat16)
    qs.to(device)
    out = _run(backend, packed.to(device), qs, mask.to(device), delta.to(device), torch.bfloat16)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("numel,density", [(70_001, 0.05), (131_072, 0.3), (4_095, 0.0), (257, 1.0)], ids=str)
def test_every_encoding(backend, encoding, numel, density):
    """Each mask encoding gives the same result as int32 indices of its entries."""
    device = backend_device("dequant4_delta", backend)
    packed, qs = quantize((numel,), quant_type="fp4", nested=True, blocksize=128, dtype=torch.float16)
    mask, idx = make_mask(encoding, numel, density)
    delta = torch.randn(idx.numel()).to(torch.float16)
    expected = bnb_reference(packed, qs, idx, delta, torch.float16)
    qs.to(device)
    out = _run(backend, packed.to(device), qs, mask.to(device), delta.to(device), torch.float16)
    assert torch.equal(out.cpu(), expected)


def test_empty_weight(backend):
    device = backend_device("dequant4_delta", backend)
    q = Quant4(torch.empty(0, device=device), torch.zeros(16, device=device), 64, (0, 5))
    out = _run(backend, torch.empty(0, dtype=torch.uint8, device=device), q, torch.empty(0, dtype=torch.int32,
               device=device), torch.empty(0, dtype=torch.bfloat16, device=device), torch.bfloat16)
    assert out.shape == (0, 5)


def test_float64_oracle():
    """The reference against a float64 evaluation of the formula (fp32 product, one
    rounding to dtype, then the delta added with one more rounding)."""
    packed, qs = quantize((37, 41), quant_type="nf4", nested=True, blocksize=64)
    mask, idx = make_mask("int32", qs.shape.numel(), 0.2)
    delta = torch.randn(idx.numel()).to(torch.bfloat16)
    flat = packed.view(-1).long()
    nib = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)[:qs.shape.numel()]
    state2 = qs.state2
    blocks = torch.arange(qs.absmax.numel()) // state2.blocksize
    scale = ((state2.code[qs.absmax.long()].double() * state2.absmax[blocks].double()).float().double()
             + qs.offset.double()).float()
    value = (qs.code[nib].double() * scale[torch.arange(nib.numel()) // 64].double()).float().to(torch.bfloat16)
    value[idx.long()] = (value[idx.long()].double() + delta.double()).to(torch.bfloat16)
    with ops.use_backend("reference"):
        out = ops.dequant4_delta(packed, qs, mask, delta, dtype=torch.bfloat16)
    assert torch.equal(out.view(-1), value)


# ----------------------------------------------------------------------------- validation


def _valid():
    packed, qs = quantize((16, 8), quant_type="nf4", nested=True, blocksize=64)
    idx = torch.tensor([0, 5, 127], dtype=torch.int32)
    return packed, quant4_of(qs), idx, torch.zeros(3, dtype=torch.bfloat16)


@pytest.mark.parametrize("change,error,words", [
    (lambda p, q, i, d: (p[:-1], q, i, d), ValueError, "packed must hold ceil(numel / 2) = 64"),
    (lambda p, q, i, d: (p.float(), q, i, d), TypeError, "packed must have dtype uint8"),
    (lambda p, q, i, d: (p, q._replace(absmax=q.absmax[:1]), i, d), ValueError, "absmax must have"),
    (lambda p, q, i, d: (p, q._replace(absmax=q.absmax.float()), i, d), TypeError, "absmax must have dtype uint8"),
    (lambda p, q, i, d: (p, q._replace(code=q.code[:8]), i, d), ValueError, "code must be the 16-entry"),
    (lambda p, q, i, d: (p, q._replace(blocksize=48), i, d), ValueError, "blocksize must be one of"),
    (lambda p, q, i, d: (p, q._replace(nested_code=q.nested_code[:5]), i, d), ValueError, "nested_code must be"),
    (lambda p, q, i, d: (p, q._replace(nested_absmax=torch.zeros(3)), i, d), ValueError, "nested_absmax must have"),
    (lambda p, q, i, d: (p, q._replace(offset=float("nan")), i, d), ValueError, "offset must be a finite"),
    (lambda p, q, i, d: (p, q, i, d[:2]), ValueError, "delta must be 1-D with one entry per index"),
    (lambda p, q, i, d: (p, q, i, d.float()), TypeError, "delta must have the output dtype"),
    (lambda p, q, i, d: (p, q, i.flip(0), d), ValueError, "sorted and unique"),
    (lambda p, q, i, d: (p, q, i + 1, d), ValueError, "outside [0, 128)"),
    (lambda p, q, i, d: (p, q, i, None), ValueError, "mask and delta go together"),
    (lambda p, q, i, d: (p, q._replace(shape=(16, -8)), i, d), ValueError, "shape must be a sequence"),
], ids=["packed-size", "packed-dtype", "absmax-size", "absmax-dtype", "code-size", "blocksize", "nested-code",
        "nested-absmax", "offset", "delta-size", "delta-dtype", "unsorted", "out-of-range", "no-delta", "shape"])
def test_bad_input_refused(backend, change, error, words):
    backend_device("dequant4_delta", backend)
    packed, q, idx, delta = change(*_valid())
    if packed.dtype == torch.uint8:  # the wrapper reads another dtype's bytes (bnb's quant_storage)
        with ops.use_backend(backend), pytest.raises(error, match=re.escape(words)):
            ops.dequant4_delta(packed, q, idx, delta, dtype=torch.bfloat16)
    # the op itself (bypassing the wrapper's early checks) refuses the same
    with ops.use_backend(backend), pytest.raises(error, match=re.escape(words)):
        torch.ops.seat.dequant4_delta(packed, q.absmax, q.code, q.blocksize, list(q.shape), torch.bfloat16,
                                      q.nested_absmax, q.nested_code, q.nested_blocksize, q.offset,
                                      idx, delta)


def test_mask_of_another_tensor_refused():
    packed, q, idx, delta = _valid()
    from seat.masks import FullMask

    with pytest.raises(ValueError, match="was built for a tensor of 12 elements"):
        ops.dequant4_delta(packed, q, FullMask(12), torch.zeros(12, dtype=torch.bfloat16), dtype=torch.bfloat16)


def test_bad_dtype_and_quant_state():
    packed, q, idx, delta = _valid()
    with pytest.raises(TypeError, match="dtype must be one of bfloat16, float16, float32"):
        ops.dequant4_delta(packed, q, dtype=torch.float64)
    with pytest.raises(TypeError, match="quant_state must be a bitsandbytes QuantState"):
        ops.dequant4_delta(packed, object(), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype is required"):
        ops.dequant4_delta(packed, q)


def test_quant_storage_bytes_accepted():
    """A packed weight stored in another dtype (bnb's quant_storage) is read as its bytes."""
    import bitsandbytes.functional as F

    weight = torch.randn(32, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    packed, qs = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    out = ops.dequant4_delta(packed, qs, dtype=torch.bfloat16)
    assert torch.equal(out, bnb_reference(packed, qs, None, None, torch.bfloat16))


def test_bnb_unflattened_where_its_cpu_kernel_blocks_right():
    """A Linear4bit-like weight whose rows are whole blocks: bnb's own call on the 2-D
    shape (no flattening) gives the op's result too."""
    import bitsandbytes.functional as F

    packed, qs = quantize((48, 128), quant_type="nf4", nested=True, blocksize=64)
    assert torch.equal(ops.dequant4_delta(packed, qs), F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("encoding", ["int32", "block16", "full"])
def test_native_kernel_skips_entries_outside_the_weight(encoding):
    """A direct caller of the CPU kernel with a mask that lies (positions outside the
    weight, block starts past the offsets): those entries are skipped, nothing outside
    the tensors is touched, the rest is the plain dequantize plus the valid entries."""
    from seat.ops import _native
    from seat.ops._encodings import no_offsets

    _native.load()
    packed, qs = quantize((70_001,), nested=True, dtype=torch.float32)
    q = quant4_of(qs)
    plain = ops.dequant4_delta(packed, qs, dtype=torch.float32)
    delta = torch.ones(4)
    expected = plain.clone()
    if encoding == "int32":
        index, offsets, valid = torch.tensor([-7, 3, 69_999, 10**9], dtype=torch.int32), no_offsets("cpu"), [3, 69_999]
    elif encoding == "block16":  # block 1 holds elements 65536..70000: offset 65535 lies past the weight
        index = torch.tensor([0, 2, 4], dtype=torch.int32)
        offsets = torch.tensor([5, 9, 4463, 65535], dtype=torch.int32).to(torch.uint16)
        valid = [5, 9, 65536 + 4463]
    else:
        index, offsets, delta = torch.empty(0, dtype=torch.int32), no_offsets("cpu"), torch.ones(70_001)
        valid = list(range(70_001))
    expected[valid] += 1
    out = torch.full((70_001,), float("nan"))
    code = {"int32": 0, "block16": 1, "full": 3}[encoding]
    torch.ops.seat_C.dequant4_delta_(out, packed, q.absmax, q.code, q.blocksize, q.nested_absmax, q.nested_code,
                                     q.nested_blocksize, q.offset, delta, code, index, offsets, [0, 0, 0])
    assert torch.equal(out, expected)
