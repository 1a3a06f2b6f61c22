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

Transients: the reference forward (the frozen base: bitsandbytes' dequantize-then-linear)
dequantizes a whole weight (n entries in the compute dtype), freed when its matmul is
done. The trained forward, its recomputation under gradient checkpointing, and the
backward work in row chunks of at most QSEAT_CHUNK_BYTES of the compute dtype (seat.quant
._chunks; rows aligned to the quantization blocks, at least one aligned row group): per
chunk the forward makes the chunk's effective weight and its output rows (tokens x rows);
the backward makes the chunk's effective weight for the input gradient, frees it, then the
chunk's dense weight gradient, gathered into the delta's gradient (nnz entries, alive over
the whole loop), which SparseAdamW's hook takes as a float target's hook takes a weight's
gradient. A chunk's delta entries are found as int32 positions (4 bytes per entry of the
chunk); an implicit mask hashes the chunk's elements for them, HASH_PIECE at a time (~33
bytes of int64 scratch each). A weight of one chunk takes the unchunked path.
"""
from __future__ import annotations

import math

from .. import _constants
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


HASH_PIECE = 1 << 18  # seat.masks.implicit.HASH_PIECE: elements an implicit mask's positions_in hashes at a time
HASH_SCRATCH_PER_ELEMENT = 33  # the int64 scratch of torch's hash ops per element hashed


def target_shapes(arch) -> list[tuple[int, int]]:
    """(out_features, in_features) of every target weight, parallel to
    arch.target_numels() (a fused expert tensor counts as one row: never chunked)."""
    dense = list(arch.block_linear_shapes().values())
    sparse = [(1, n) for n in arch.sparse_block_target_numels().values()]
    return dense * arch.dense_layers + sparse * arch.sparse_layers


def chunk_rows(opts: Options, out_features: int, in_features: int) -> int:
    """Rows of one chunk (seat.quant._chunks.rows_per_chunk, with seat's block sizes:
    opts.quant_blocksize, times bitsandbytes' nested blocksize 256 when double-quantized)."""
    align = opts.quant_blocksize * (256 if opts.double_quant else 1)
    group = align // math.gcd(align, in_features)
    rows = max(group, _constants.QSEAT_CHUNK_BYTES // max(1, in_features * opts.es) // group * group)
    return min(rows, out_features)


def forward_transient(opts: Options, shapes: list[int]) -> int:
    """The reference forward: one layer's whole effective weight, alive during its matmul."""
    return max(shapes) * opts.es


def chunk_moments(opts: Options, shape: tuple[int, int], nnz: int, tokens: int) -> list[dict[str, int]]:
    """The worst moments of one weight's trained forward and backward (module docstring)."""
    o, i = shape
    es, rows = opts.es, chunk_rows(opts, o, i)
    delta_grad = {"its delta's gradient (gathered from it)": nnz * es}
    if rows >= o:  # one chunk: the unchunked path
        return [{"4-bit backward: one layer's dense weight gradient": o * i * es, **delta_grad}]
    chunk = rows * i
    entries = 4 * -(-nnz * chunk // (o * i))  # the chunk's delta positions (int32, the mean share)
    moments = [{"4-bit trained forward: one row chunk's effective weight": chunk * es,
                "its output rows": tokens * rows * es, "the chunk's delta positions": entries},
               {"4-bit backward: one row chunk's dense weight gradient": chunk * es,
                "the chunk's delta positions": entries, **delta_grad}]
    if opts.index_encoding == "implicit":
        moments.append({"implicit mask: hashing a chunk's elements for its positions":
                        min(chunk, HASH_PIECE) * HASH_SCRATCH_PER_ELEMENT + entries, **delta_grad})
    return moments


def backward_transients(opts: Options, weights: list[tuple[tuple[int, int], int]], chunk_update,
                        tokens: int) -> dict[str, int]:
    """What a target's forward or backward holds at the worst moment of the worst weight
    ((out, in), nnz each): a row chunk's effective weight, or its dense weight gradient
    next to the delta's gradient it is gathered into (chunk_moments), or SparseAdamW's hook
    on the delta's gradient.
    The hook adds nothing by default (it gathers into the persistent compact gradient);
    with the update in backward it gathers into a transient compact gradient beside the
    delta's gradient, frees that, and (8-bit state) updates one chunk at a time
    (chunk_update(opts, nnz): its fp32 moments and new codes)."""
    es, gs = opts.es, GRAD_DTYPES[opts.grad_dtype]
    worst: dict[str, int] = {}
    for shape, nnz in sorted(set(weights)):
        moments = chunk_moments(opts, shape, nnz, tokens)
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
