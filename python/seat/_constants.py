"""Constants more than one module of seat needs, in one place. Plain Python: config,
memory and the CLI import this without loading torch."""
from __future__ import annotations

IGNORE_INDEX = -100  # label of a position without loss (the Hugging Face convention)
INT32_MAX = 2**31 - 1  # masks index a weight's flat storage with int32: at most this many elements

# Mask selection kinds SeatConfig / build_masks draw themselves (importance masks come from
# seat.masks.ImportanceScores), and the mask encodings (seat.masks.ENCODINGS holds their classes).
MASK_KINDS = ("random", "magnitude")
MASK_ENCODINGS = ("int32", "implicit", "block16")
# Encodings seat uses internally, not a SeatConfig choice: "full" (seat.masks.FullMask) marks
# every entry of a compact parameter (QSEAT's delta) as trained, holding no index.
INTERNAL_ENCODINGS = ("full",)
CHOSEN_ENCODINGS = ("int32", "block16")  # the encodings that can store chosen entries (not only a hash's draw)

BLOCK16_SIZE = 65536  # elements per block of a block16 mask (uint16 offsets)
DEFAULT_HASH_BLOCK = 4096  # elements per prefix-count block of an implicit (hash) mask
MIN_HASH_BLOCK, MAX_HASH_BLOCK = 256, 65536  # powers of two: whole warps / Triton tiles per block

# QSEAT (seat.quant) works on a 4-bit weight in row chunks of at most this many bytes of the
# compute dtype (at least one row group aligned to the quantization blocks): its forward,
# recomputation and backward make one chunk's effective weight and one chunk's dense weight
# gradient at a time, never a whole layer's. 16 MiB: the 70B goal's margin (a 48 GB card) is
# tens of MB, and a chunk of 16 MiB (1024 rows of 8192 bf16) still keeps each matmul's
# operands large enough for a GPU's tensor cores. seat.memory models the same constant.
QSEAT_CHUNK_BYTES = 16 << 20
