"""The memory of QSEAT (seat.quant): a bitsandbytes 4-bit base with a trained sparse delta
per target weight (Options.base_bits = 4).

Per target weight of n elements, as bitsandbytes' quantize_4bit stores it (what
transformers' BitsAndBytesConfig(load_in_4bit=True) loads):

  packed codes        ceil(n / 2) bytes (uint8, two 4-bit codes per byte)
  absmax              one fp32 per block of quant_blocksize elements (bnb_4bit default 64);
                      with double quantization (bnb_4bit_use_double_quant) one uint8 per
                      block instead, plus an fp32 per 256 blocks, a 256-entry fp32 code
                      book and an fp32 offset
  4-bit code book     16 fp32 (the nf4 / fp4 values), one per weight

Every other parameter (embeddings, lm_head, norms, biases) stays in the model's dtype.
The trained delta holds one value per mask entry in the compute dtype (the model's dtype
here), and there are no original values: the base is never written. The delta's
optimizer mask covers all of it (seat.masks' full mask: no index memory).

Transients: each target's forward (the reference's and the trained one's, and the
recomputation of gradient checkpointing) dequantizes its weight into an effective weight
(n entries in the compute dtype), freed when the matmul is done; its backward makes the
effective weight again for the input gradient, frees it, then forms the layer's dense
weight gradient (n entries) and gathers it into the delta's gradient (nnz entries), which
SparseAdamW's hook takes as a float target's hook takes a weight's gradient.
"""
from __future__ import annotations

from ._options import GRAD_DTYPES, Options

CODE4_BYTES = 16 * 4  # the 4-bit code book of a weight (QuantState.code)
NESTED_CODE_BYTES = 256 * 4  # the 8-bit code book of double-quantized absmax (state2.code)


def packed_weight_bytes(opts: Options, numel: int) -> int:
    """Bytes bitsandbytes holds for one 4-bit weight of `numel` elements (module docstring)."""
    blocks = -(-numel // opts.quant_blocksize)
    packed = -(-numel // 2)
    if opts.double_quant:
        absmax = blocks + 4 * -(-blocks // 256) + NESTED_CODE_BYTES + 4
    else:
        absmax = 4 * blocks
    return packed + absmax + CODE4_BYTES


def weights_bytes(arch, opts: Options, shapes: list[int]) -> dict[str, int]:
    """The base model's bytes: the 4-bit targets, and the rest in the model's dtype."""
    rest = (arch.total_params - sum(shapes)) * opts.es
    return {"weights: 4-bit targets (packed codes, absmax, code books)": sum(packed_weight_bytes(opts, n)
                                                                             for n in shapes),
            "weights: the rest (embeddings, lm_head, norms) in the model's dtype": rest}


def forward_transient(opts: Options, shapes: list[int]) -> int:
    """One layer's effective weight, alive during its matmul."""
    return max(shapes) * opts.es


def backward_transients(opts: Options, weights: list[tuple[int, int]], chunk_update) -> dict[str, int]:
    """What a target's backward holds at the worst moment of the worst weight: the
    Function's dense weight gradient next to the delta's gradient it is gathered into (the
    effective weight was freed before), or SparseAdamW's hook on the delta's gradient.
    The hook adds nothing by default (it gathers into the persistent compact gradient);
    with the update in backward it gathers into a transient compact gradient beside the
    delta's gradient, frees that, and (8-bit state) updates one chunk at a time
    (chunk_update(opts, nnz): its fp32 moments and new codes)."""
    es, gs = opts.es, GRAD_DTYPES[opts.grad_dtype]
    worst: dict[str, int] = {}
    for numel, nnz in sorted(set(weights)):
        moments = [{"4-bit backward: one layer's dense weight gradient": numel * es,
                    "its delta's gradient (gathered from it)": nnz * es}]
        if opts.optimizer_in_backward:
            compact = {"its transient compact gradient (update in backward)": gs * nnz}
            moments.append({"the delta's gradient in its hook": nnz * es, **compact})
            if opts.optimizer_bits == 8:
                moments.append({**compact, "8-bit update in backward: one chunk's fp32 moments and new codes":
                                chunk_update(opts, nnz)})
        for moment in moments:
            if sum(moment.values()) > sum(worst.values()):
                worst = moment
    return worst
