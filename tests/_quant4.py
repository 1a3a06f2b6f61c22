"""Test helpers for the 4-bit ops: bitsandbytes-quantized weights and masks over them."""
from __future__ import annotations

import torch

from seat.masks import Block16Mask, ImplicitMask

ENCODINGS = ("int32", "block16", "implicit", "full")


def quantize(shape, *, quant_type="nf4", nested=False, blocksize=64, dtype=torch.bfloat16, seed=0):
    """(packed, quant_state) of a random weight of `shape`, quantized by bitsandbytes."""
    import bitsandbytes.functional as F

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(dtype)
    return F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def bnb_reference(packed, quant_state, idx, delta, dtype):
    """What the op must equal: bnb's dequantize_4bit, cast, then index_add of delta.

    bnb is asked for the weight as a vector (shape (numel,)) and the result reshaped:
    bnb's quantize blocks the flat weight, and so does its dequantize on CUDA and in its
    generic path, but bitsandbytes 0.50.2's CPU kernel blocks each row on its own when the
    last dimension is even and not a multiple of the block size (a (32, 16) weight in
    blocks of 64 comes back with the wrong scales); a vector is one row, blocked right.
    For a weight of <= 2 elements bnb hands its output back transposed (a compatibility
    shim): a vector either way."""
    import copy

    import bitsandbytes.functional as F

    flat = copy.copy(quant_state)
    flat.shape = torch.Size([quant_state.shape.numel()])
    out = F.dequantize_4bit(packed, flat).to(dtype).reshape(quant_state.shape)
    if idx is not None:
        out.view(-1).index_add_(0, idx.long(), delta)
    return out


def make_mask(encoding: str, numel: int, density: float, *, block: int = 256, seed: int = 5, device="cpu"):
    """(mask in `encoding`, its int32 indices): the entries of one hash mask (every entry
    for "full"), so every encoding holds the same ones."""
    if encoding == "full":
        from seat.masks import FullMask

        return FullMask(numel).to(device), torch.arange(numel, dtype=torch.int32)
    hashed = ImplicitMask(numel, density, seed=seed, param_id=1, block=block)
    idx = hashed.indices()
    mask = {"int32": idx, "block16": Block16Mask(idx, numel), "implicit": hashed}[encoding]
    return mask.to(device), idx
