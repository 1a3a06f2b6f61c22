"""The choices an estimate depends on, validated on construction (ValueError naming the
argument), and the byte sizes they imply per trained entry."""
from __future__ import annotations

import dataclasses

from .._constants import MASK_ENCODINGS

METHODS = ("seat", "naive", "full", "lora")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEVICES = ("cuda", "cpu")
INDEX_ENCODINGS = MASK_ENCODINGS
GRAD_DTYPES = {"float32": 4, "bfloat16": 2}
OPTIMIZER_BITS = (32, 8)
STRATEGIES = ("dp", "fsdp")
BUCKET_BYTES = 25 * 2**20  # seat.distributed's default bucket_bytes
BASE_BITS = (4,)  # besides None: the model's dtype


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Options:
    """What is estimated.

    method: "seat" (seat.patch + SparseAdamW + the fused-linear loss), "naive" (a full
        copy of the model as the reference, dense torch AdamW with the gradient times a
        bool mask, materialized logits and log-softmaxes), "full" (dense torch AdamW on
        the same target weights, CE only) or "lora" (peft LoRA rank lora_rank on the same
        linears, CE only).
    density: fraction of each target weight that trains (seat, naive), in (0, 1].
    seq, batch: tokens per sequence and sequences (pairs x / x~ for seat and naive).
    gradient_checkpointing: transformers' activation checkpointing (one saved hidden state
        per block, the block recomputed in backward).
    dtype: the model's dtype; device: "cuda" or "cpu" (what differs: the CPU fused-linear
        loss upcasts a low-precision lm_head once per call; torch AdamW runs foreach on
        CUDA, one tensor at a time on CPU).
    index_encoding (seat): SeatConfig(mask_encoding=...): "int32" explicit sorted indices
        (4 B per trained entry), "block16" uint16 offsets in blocks of block16_size
        elements plus an int32 start per block (+ 1), "implicit" hashed random mask (an
        int32 prefix count per block of implicit_block elements (+ 1), no indices; its
        nnz is Binomial(numel, density): the estimate takes the mean). Their kernels
        (gather in the gradient hook, swap around the reference forward, the AdamW step)
        allocate nothing, as measured on CPU, for fp32 and bf16 compact gradients alike.
        With 8-bit state a weight's step goes through its mask in state_chunk pieces as
        for int32; an implicit mask's piece is materialized as int32 indices (4 B per
        entry of the chunk) when the weight has more than one chunk.
    grad_dtype (seat): the compact gradient's dtype, "float32" (default) or "bfloat16"
        (SparseAdamW(grad_dtype=torch.bfloat16); one micro-batch per step: a second one
        turns the buffer fp32 until zero_grad(), which is not modelled).
    optimizer_in_backward (seat): SparseAdamW(update_in_backward=True): each weight's update
        runs in its gradient hook, so no compact gradient buffer exists between steps; the
        hook gathers into a transient compact gradient (grad_dtype) while the weight's
        dense gradient is still alive, frees the dense one, then updates.
    optimizer_bits (seat): 32 (fp32 exp_avg / exp_avg_sq) or 8 (SparseAdamW(state_bits=8):
        bitsandbytes blockwise, 1 B per entry and an fp32 absmax per quant_block entries,
        each moment, plus the two 256-entry fp32 code books). A weight's step dequantizes
        at most state_chunk entries at a time, whatever the index_encoding (+ the chunk's
        int32 indices, 4 B per entry, for "implicit"), into transient fp32 moments (8 B
        per entry of the chunk), and bitsandbytes makes new codes and absmax (1 B +
        4 / quant_block per entry) while requantizing them: in the optimizer step, or with
        optimizer_in_backward in the gradient hook, next to the transient compact gradient.
    master_weights (seat): fp32 copy of the trained entries of a low-precision model.
    lora_rank (lora). chunk_size (seat): rows per chunk of the fused loss, 0 = the
        kernel's choice (fp32 logits of a chunk under 64 MiB).
    padded: the batch carries padding (x and x~ padded to one length: the usual case),
        so transformers passes an explicit attention mask to SDPA (grouped-query keys and
        values are then repeated to every head, and a float mask exists per layer).
    base_bits (seat): None (the target weights in the model's dtype) or 4: QSEAT, the
        targets as bitsandbytes 4-bit weights (nf4 / fp4: the same storage) with a
        trained delta each, in the model's dtype as the compute dtype (see _quant.py).
        quant_blocksize: elements per absmax (bnb's default 64); double_quant: the
        absmax 8-bit quantized (bnb_4bit_use_double_quant).
    ce_rows, kl_rows: rows that enter the CE (answer tokens of x) and the KL (positions
        of x~); None: every position but the last of each sequence (batch * (seq - 1)).
    gpus: GPUs training together (1: one GPU, the strategy changes nothing). With more,
        batch is each GPU's micro-batch and the estimate is one GPU's share (see
        _multi_gpu.py); device must be "cuda".
    strategy: "dp" (seat: compact gradients all-reduced in buckets of bucket_bytes;
        naive / full / lora: torch DDP) or "fsdp" (FSDP2 per decoder layer and the root;
        seat and full only, not with base_bits 4).
    """

    method: str = "seat"
    density: float = 0.05
    seq: int = 1024
    batch: int = 1
    gradient_checkpointing: bool = False
    dtype: str = "bfloat16"
    device: str = "cuda"
    index_encoding: str = "int32"
    grad_dtype: str = "float32"
    optimizer_in_backward: bool = False
    optimizer_bits: int = 32
    master_weights: bool = False
    lora_rank: int = 8
    chunk_size: int = 0
    padded: bool = True
    ce_rows: int | None = None
    kl_rows: int | None = None
    base_bits: int | None = None
    quant_blocksize: int = 64
    double_quant: bool = False
    block16_size: int = 65536
    implicit_block: int = 4096
    quant_block: int = 256  # seat.optim.QUANT_BLOCK
    state_chunk: int = 2**20  # seat.optim.STATE_CHUNK
    gpus: int = 1
    strategy: str = "dp"
    bucket_bytes: int = BUCKET_BYTES

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)) \
                or not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be a number in (0, 1] (the fraction of each weight that trains, e.g. "
                             f"0.05); got {self.density!r}")
        _int("seq", self.seq, 2)
        _int("batch", self.batch, 1)
        _choice("dtype", self.dtype, tuple(DTYPES))
        _choice("device", self.device, DEVICES)
        _choice("index_encoding", self.index_encoding, INDEX_ENCODINGS)
        _choice("grad_dtype", self.grad_dtype, tuple(GRAD_DTYPES))
        _choice("optimizer_bits", self.optimizer_bits, OPTIMIZER_BITS)
        _int("lora_rank", self.lora_rank, 1)
        if self.base_bits is not None:
            _choice("base_bits", self.base_bits, BASE_BITS)
            if self.method != "seat":
                raise ValueError(f"base_bits {self.base_bits} (QSEAT) is modelled for method 'seat' only; got "
                                 f"method {self.method!r}")
        _int("quant_blocksize", self.quant_blocksize, 1)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be a bool; got {self.double_quant!r}")
        _int("chunk_size", self.chunk_size, 0)
        for name in ("block16_size", "implicit_block", "quant_block", "state_chunk"):
            _int(name, getattr(self, name), 1)
        if self.state_chunk % self.quant_block:
            raise ValueError(f"state_chunk must be a multiple of quant_block = {self.quant_block} (chunks "
                             f"quantize whole blocks); got {self.state_chunk}")
        if self.block16_size > 65536:
            raise ValueError(f"block16_size must be <= 65536 (uint16 offsets); got {self.block16_size}")
        for name in ("ce_rows", "kl_rows"):
            value = getattr(self, name)
            if value is not None:
                _int(name, value, 0)
                if value > self.batch * self.seq:
                    raise ValueError(f"{name} must be <= batch * seq = {self.batch * self.seq}; got {value}")
        self._check_gpus()

    def _check_gpus(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"gpus must be a whole number >= 1 (GPUs training together; 1 = one GPU); "
                             f"got {self.gpus!r}")
        _choice("strategy", self.strategy, STRATEGIES)
        _int("bucket_bytes", self.bucket_bytes, 1)
        if self.gpus == 1:
            return
        if self.device != "cuda":
            raise ValueError(f"gpus {self.gpus} is modelled on device 'cuda' only; got device {self.device!r} "
                             "(pass device 'cuda', or gpus 1)")
        if self.strategy == "fsdp" and self.method not in ("seat", "full"):
            raise ValueError(f"strategy 'fsdp' is modelled for methods 'seat' and 'full'; got method "
                             f"{self.method!r} (use strategy 'dp', torch DDP for the baselines, or gpus 1)")
        if self.strategy == "fsdp" and self.base_bits is not None:
            raise ValueError(f"strategy 'fsdp' is not modelled with base_bits {self.base_bits} (QSEAT's 4-bit "
                             "weights are not sharded); use strategy 'dp'")

    @property
    def es(self) -> int:
        """Bytes per element of the model's dtype."""
        return DTYPES[self.dtype]

    @property
    def n_ce(self) -> int:
        return self.batch * (self.seq - 1) if self.ce_rows is None else self.ce_rows

    @property
    def n_kl(self) -> int:
        return self.batch * (self.seq - 1) if self.kl_rows is None else self.kl_rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
