"""The analytic memory model of one training step: what is alive, phase by phase.

Everything is counted in bytes of tensors (what torch's allocator hands out: on CUDA what
torch.cuda.max_memory_allocated reports; not the CUDA context, the caching allocator's
reserve or fragmentation). A step is modelled as a few phases, each the sum of the
tensors alive at its worst moment; the peak is the largest phase:

  state       alive between steps: weights (+ a reference copy for naive), optimizer state,
              masks, original values, compact gradients
  ref_forward seat / naive: the no-grad forward of the base model on x~ (B sequences)
  loss        end of the trained forward (saved activations) + the loss's buffers
  backward    saved activations + gradients flowing back through the last block + the
              dense weight gradient(s) alive (seat: one, in its gradient hook; with the
              update in backward, also that hook's transients: see _gradient_hook_bytes)
  optimizer   dense methods: every dense gradient + the optimizer step's temporaries;
              seat with 8-bit state: one chunk's fp32 moments (see _chunk_update_bytes)

Activations follow what transformers' Llama-style decoder (SDPA attention) saves for
backward, per token and block, in bytes (es = bytes of the model dtype, H hidden,
I intermediate, q = heads * head_dim, kv = kv_heads * head_dim, T tokens per sequence):

  two RMSNorms   2 * (4H + es*H + 4)   fp32 input (the upcast copy, or the fp32 input
                                        itself), the normalized output, 1/rms
  attention      es*(2q + 2kv') + 4*heads (+ es*T with a padding mask)
                 q after RoPE, k and v (kv' = q when transformers repeats grouped
                 keys/values to every head, which it does when a mask is passed), the
                 output (also o_proj's input), SDPA's logsumexp, SDPA's float mask
  MLP            4 * es*I                gate and up outputs, SiLU output, their product
                                        (mixture of experts: I = k * I_e + I_s, the
                                        hidden layers a token is routed through)

The same counts were checked against torch.profiler on CPU (float32 and bfloat16,
grouped and plain attention): see tests/test_memory.py. Several GPUs (Options.gpus):
the single-GPU estimate is turned into one GPU's share by _multi_gpu.distribute.
"""
from __future__ import annotations

import dataclasses

from . import _multi_gpu, _quant
from ._arch import Architecture
from ._options import GRAD_DTYPES, Options
from ._units import parse_bytes

FUSED_LOSS_CHUNK_BYTES = 64 * 2**20  # seat.ops.fused_linear_paired_loss.CHUNK_BYTES
FUSED_LOSS_ROW_MULTIPLE = 16  # seat.ops.fused_linear_paired_loss.ROW_MULTIPLE


def nnz_for(numel: int, density: float) -> int:
    """Trained entries of a weight of `numel` elements (as seat.masks.nnz_for)."""
    if density >= 1.0:
        return numel
    return min(numel, max(1, round(density * numel)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------- activations
def block_activation_bytes(arch: Architecture, opts: Options, seq: int) -> int:
    """Bytes one decoder block saves for backward, per token (see the module docstring)."""
    es, H, I = opts.es, arch.hidden, arch.active_intermediate
    norms = 2 * (4 * H + es * H + 4)
    # transformers repeats grouped keys / values to every head (a copy) when it passes a
    # mask to SDPA; with kv_heads == 1 the repeat is a view of the original
    repeated = opts.padded and 1 < arch.kv_heads < arch.heads
    kv = arch.q_dim if repeated else arch.kv_dim
    attention = es * (2 * arch.q_dim + 2 * kv) + 4 * arch.heads + (es * seq if opts.padded else 0)
    mlp = 4 * es * I
    return norms + attention + mlp


def stack_activation_bytes(arch: Architecture, opts: Options, tokens: int, checkpointing: bool) -> int:
    """Saved activations of the decoder for `tokens` tokens at the end of its forward:
    every block's (or, with checkpointing, every block's input hidden state), the final
    norm's (fp32 input, 1/rms) and its output (the hidden states), and the rotary cos/sin."""
    es, H = opts.es, arch.hidden
    per_block = es * H if checkpointing else block_activation_bytes(arch, opts, opts.seq)
    final = 4 * H + 4 + es * H
    rotary = 2 * es * arch.head_dim
    return tokens * (arch.layers * per_block + final + rotary)


def block_backward_bytes(arch: Architecture, opts: Options, tokens: int, checkpointing: bool) -> int:
    """What backward through a block adds on top of the saved activations: the gradient
    of the hidden state flowing back (the gradients a block makes inside, e.g. the MLP's
    intermediate-size ones, are offset by the saved tensors each backward node releases as
    it runs: measured on CPU, the peak stays within a hidden state of the saved
    activations plus one dense weight gradient), and with checkpointing the block's
    recomputed activations."""
    work = tokens * opts.es * arch.hidden
    if checkpointing:
        work += tokens * block_activation_bytes(arch, opts, opts.seq)
    return work


# ---------------------------------------------------------------------- the estimate
@dataclasses.dataclass
class MemoryEstimate:
    """Bytes of one training step's tensors (see the module docstring), on one GPU: with
    options.gpus > 1 one GPU's share (see _multi_gpu.py).

    state: {item: bytes} alive between steps. phases: {phase: {item: bytes}} the step's
    additional tensors at each phase's worst moment. peak / total: the largest
    state + phase (per GPU). activations: the saved activations of the trained forward with
    the options' checkpointing; activations_no_checkpointing / activations_checkpointing:
    both. communication: the bytes each GPU sends per optimizer step (all zero on one GPU).
    """

    arch: Architecture
    options: Options
    trainable: int  # entries that train (masked entries for seat / naive, LoRA params for lora)
    target_params: int  # elements of the target weights
    state: dict[str, int]
    phases: dict[str, dict[str, int]]
    activations_no_checkpointing: int
    activations_checkpointing: int
    communication: _multi_gpu.Communication = dataclasses.field(default_factory=_multi_gpu.Communication)

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    def phase_bytes(self, phase: str) -> int:
        return self.state_bytes + sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        return self.phase_bytes(self.peak_phase)

    total = peak  # the number to compare with a GPU's memory

    @property
    def activations(self) -> int:
        return (self.activations_checkpointing if self.options.gradient_checkpointing
                else self.activations_no_checkpointing)

    @property
    def breakdown(self) -> dict[str, int]:
        """{item: bytes} at the peak: the state, then the peak phase's items."""
        return {**self.state, **self.phases[self.peak_phase]}

    def headroom(self, gpu_bytes: int | str, reserve: int | str = 0) -> int:
        """gpu_bytes - reserve - peak in bytes (negative: does not fit). Sizes are bytes
        or strings like "24GiB" / "24GB"."""
        gpu = parse_bytes(gpu_bytes, argument="gpu_bytes")
        spare = 0 if reserve in (0, "0") else parse_bytes(reserve, argument="reserve")
        return gpu - spare - self.peak

    def fits(self, gpu_bytes: int | str, reserve: int | str = 0) -> bool:
        """Whether the peak plus `reserve` (CUDA context, allocator slack: not modelled)
        fits in gpu_bytes."""
        return self.headroom(gpu_bytes, reserve) >= 0

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.arch), "options": self.options.to_dict(),
                "total_params": self.arch.total_params, "target_params": self.target_params,
                "trainable": self.trainable, "state": dict(self.state),
                "phases": {k: dict(v) for k, v in self.phases.items()},
                "phase_totals": {k: self.phase_bytes(k) for k in self.phases},
                "peak_phase": self.peak_phase, "peak_bytes": self.peak, "breakdown": self.breakdown,
                "activations_no_checkpointing": self.activations_no_checkpointing,
                "activations_checkpointing": self.activations_checkpointing,
                "communication": self.communication.to_dict()}


def implicit_nnz(numel: int, density: float) -> int:
    """The expected entries of an implicit random mask of a weight of `numel` elements:
    each element is in with probability threshold / 2**32, threshold = round(density *
    2**32) (seat.ops._encodings.threshold_for), so nnz is Binomial(numel, that) and
    the estimate uses its mean. The drawn size differs by about sqrt(density * numel)
    entries per weight (a relative 1 / sqrt(nnz) over the model: 5e-5 at Llama-3-8B's
    350M entries, 3e-3 for the small models of tests/test_memory.py)."""
    if density >= 1.0:
        return numel
    return round(numel * round(density * 2**32) / 2**32)


def _mask_index_bytes(opts: Options, numel: int, nnz: int) -> int:
    """Bytes that say which entries of one weight train: int32 indices; block16's uint16
    offsets + its int32 block starts (one per block16_size elements, + 1:
    Block16Mask.block_starts); implicit's int32 prefix counts (one per implicit_block
    elements, + 1: ImplicitMask.block_offsets). As seat.masks' nbytes, to the byte."""
    if opts.index_encoding == "int32":
        return 4 * nnz
    if opts.index_encoding == "block16":
        return 2 * nnz + 4 * (-(-numel // opts.block16_size) + 1)
    return 4 * (-(-numel // opts.implicit_block) + 1)  # implicit: a prefix count per block


def _adam_state_bytes(opts: Options, nnzs: list[int]) -> int:
    """exp_avg + exp_avg_sq of weights with nnzs trained entries each (8-bit: uint8 codes
    and one fp32 absmax per quant_block entries of each weight, each moment)."""
    if opts.optimizer_bits == 8:
        return sum(2 * (k + 4 * -(-k // opts.quant_block)) for k in nnzs)
    return 2 * 4 * sum(nnzs)


QUANT_CODE_BOOK_BYTES = 2 * 256 * 4  # the signed and unsigned 8-bit maps, fp32 (seat.optim.quantization_maps)


def _chunk_update_bytes(opts: Options, nnz: int) -> int:
    """The transients of an 8-bit step of one weight with nnz trained entries (see
    seat.optim.state.QuantizedState and SparseAdamW._adamw_span), whatever the mask's
    encoding: at most state_chunk entries at a time are dequantized to fp32 exp_avg and
    exp_avg_sq (8 B per entry), stepped in place, and requantized; bitsandbytes'
    quantize_blockwise returns new codes and absmax (1 B + 4 / quant_block per entry),
    copied into the state, while both fp32 moments are alive. (The index check of an int32
    chunk, 1 B per entry, comes and goes before that.) A weight of several chunks is
    stepped with each chunk of its mask (Mask.chunk): a view for int32 and block16, int32
    indices for implicit (4 B per entry of the chunk, alive through the chunk's step; the
    hashing that finds them, in pieces, stays below that step's transients). A weight of
    one chunk is stepped with its mask itself."""
    if opts.optimizer_bits != 8 or nnz == 0:
        return 0
    chunk = min(nnz, opts.state_chunk)
    indices = 4 * chunk if opts.index_encoding == "implicit" and nnz > chunk else 0
    return 8 * chunk + chunk + 4 * -(-chunk // opts.quant_block) + indices


def _gradient_hook_bytes(opts: Options, weights: list[tuple[int, int]]) -> dict[str, int]:
    """What seat holds for one weight's gradient in backward, at the worst weight, on top
    of the backward's working set. weights: (numel, nnz) of each target weight.

    Default: the weight's dense gradient, until its post-accumulate-grad hook gathers it
    into the persistent compact gradient and frees it. update_in_backward: the hook first
    allocates a transient compact gradient (grad_dtype, nnz entries) and gathers into it
    while the dense gradient is still alive (both coexist), frees the dense one, then
    updates: with 8-bit state, one chunk's transients next to the compact gradient. The
    gather writes the compact gradient in its own dtype for every mask encoding (no fp32
    copy of a bf16 one)."""
    es = opts.es
    if not opts.optimizer_in_backward:
        return {"transient dense gradient (one weight)": max(n for n, _ in weights) * es}
    gs = GRAD_DTYPES[opts.grad_dtype]
    worst: dict[str, int] = {}
    for numel, nnz in sorted(set(weights)):
        compact = {"its transient compact gradient (update in backward)": gs * nnz}
        moments = [{"transient dense gradient (one weight)": numel * es, **compact}]
        if opts.optimizer_bits == 8:
            moments.append({**compact, "8-bit update in backward: one chunk's fp32 moments and new codes":
                            _chunk_update_bytes(opts, nnz)})
        for moment in moments:
            if sum(moment.values()) > sum(worst.values()):
                worst = moment
    return worst


def _fused_loss_bytes(arch: Architecture, opts: Options) -> dict[str, int]:
    """seat.ops.fused_linear_paired_loss's buffers while it runs (one chunk of rows at a
    time: fp32 logits, the reference rows' logits for KL chunks, their gradient)."""
    es, V, H = opts.es, arch.vocab, arch.hidden
    n_ce, n_kl = opts.n_ce, opts.n_kl
    auto = FUSED_LOSS_CHUNK_BYTES // (V * 4)
    chunk = opts.chunk_size or max(FUSED_LOSS_ROW_MULTIPLE, auto // FUSED_LOSS_ROW_MULTIPLE * FUSED_LOSS_ROW_MULTIPLE)
    c_ce = min(chunk, _round_up(n_ce, FUSED_LOSS_ROW_MULTIPLE))
    c_kl = min(chunk, _round_up(n_kl, FUSED_LOSS_ROW_MULTIPLE))
    low_precision = es != 4
    # per row of a chunk: fp32 logits and their gradient (+ the reference logits for KL
    # rows); on CUDA a low-precision gradient copy for the matmul back to the hidden size
    per_row = V * 4 * 2 + (V * es if low_precision and opts.device == "cuda" else 0) + H * (4 + es)
    chunk_bytes = max(c_ce * per_row, c_kl * (per_row + V * 4)) if (n_ce or n_kl) else 0
    out = {"loss: chunk buffers (logits, reference logits, their gradient)": chunk_bytes,
           "loss: gradient of the loss rows (computed in the forward)": (n_ce + n_kl) * (H * es + 4)}
    if low_precision and opts.device == "cpu":
        out["loss: fp32 copy of lm_head (CPU, low-precision weights)"] = V * H * 4
    return out


def estimate(config, *, method: str = "seat", density: float = 0.05, seq: int = 1024, batch: int = 1,
             gradient_checkpointing: bool = False, **options) -> MemoryEstimate:
    """The memory of one training step of `config` (a known name, a path to a config.json,
    a mapping of its fields or a transformers config). Keywords: see Options."""
    from ._arch import load_config

    opts = Options(method=method, density=density, seq=seq, batch=batch,
                   gradient_checkpointing=bool(gradient_checkpointing), **options)
    cfg = load_config(config)
    name = config if isinstance(config, str) else None
    arch = Architecture.from_config(cfg, name=name)
    return estimate_arch(arch, opts)


def estimate_arch(arch: Architecture, opts: Options) -> MemoryEstimate:
    if opts.method == "lora" and arch.sparse_layers:
        raise ValueError(f"method 'lora' is not modelled for mixture-of-experts configs ({arch.model_type}): "
                         "LoRA adapters on fused expert tensors are not counted; use method='seat', 'naive' or "
                         "'full'")
    es, V, H = opts.es, arch.vocab, arch.hidden
    B, T = opts.batch, opts.seq
    shapes = arch.target_numels()
    target = sum(shapes)
    weights = arch.total_params * es
    largest = arch.largest_block_linear
    paired = opts.method in ("seat", "naive")
    tokens = 2 * B * T if paired else B * T  # the trained forward: x and x~ as one batch for SEAT
    ckpt = opts.gradient_checkpointing
    acts = {c: stack_activation_bytes(arch, opts, tokens, c) for c in (False, True)}
    act = acts[ckpt]
    back = block_backward_bytes(arch, opts, tokens, ckpt)
    batch_bytes = (5 if paired else 3) * B * T * 8  # int64 ids, masks, labels
    state: dict[str, int] = {"weights": weights}
    phases: dict[str, dict[str, int]] = {}
    # a no-grad forward: one block's working set at a time (input, norm, q/k/v, MLP)
    ref_work = B * T * (es * (3 * H + arch.q_dim + 2 * arch.kv_dim + 3 * arch.active_intermediate) + 4 * H)

    if opts.method == "seat":
        count = implicit_nnz if opts.index_encoding == "implicit" else nnz_for
        nnzs = [count(n, opts.density) for n in shapes]
        nnz = sum(nnzs)
        state["mask indices"] = sum(_mask_index_bytes(opts, n, k) for n, k in zip(shapes, nnzs))
        if opts.base_bits == 4:  # QSEAT: a packed base that is never written, and a delta per target
            del state["weights"]
            state = {**_quant.weights_bytes(arch, opts, shapes), **state}
            state["trained deltas (compute dtype)"] = es * nnz
        else:
            state["original values at the mask"] = es * nnz
        state["optimizer state (exp_avg, exp_avg_sq)"] = _adam_state_bytes(opts, nnzs)
        if opts.optimizer_bits == 8 and nnz:
            state["8-bit code books"] = QUANT_CODE_BOOK_BYTES
        if opts.master_weights and es != 4:
            state["fp32 master values"] = 4 * nnz
        if not opts.optimizer_in_backward:
            state["compact gradient"] = GRAD_DTYPES[opts.grad_dtype] * nnz
        state["batch"] = batch_bytes
        ref_rows = opts.n_kl * H * es
        phases["ref_forward"] = {"reference forward (one block at a time)": ref_work}
        phases["loss"] = {"activations": act, "reference hidden states (KL rows)": ref_rows,
                          "loss rows of the hidden states": (opts.n_ce + opts.n_kl) * H * es,
                          **_fused_loss_bytes(arch, opts)}
        if opts.base_bits == 4:
            weff = {"4-bit: one layer's effective weight": _quant.forward_transient(opts, shapes)}
            phases["ref_forward"].update(weff)
            weights4 = list(zip(_quant.target_shapes(arch), nnzs))
            # (the trained forward and its recomputation under gradient checkpointing work in
            # the same row chunks: their moments are among backward_transients')
            hook = _quant.backward_transients(opts, weights4, _chunk_update_bytes, tokens)
        else:
            hook = _gradient_hook_bytes(opts, list(zip(shapes, nnzs)))
        phases["backward"] = {"activations": act, "backward through one block": back, **hook}
        if opts.optimizer_bits == 8 and not opts.optimizer_in_backward:
            # the step updates one weight at a time, a chunk at a time; the compact
            # gradients are state. (32-bit: sparse_adamw_ works in place, no transients.)
            phases["optimizer"] = {"8-bit update: one chunk's fp32 moments and new codes":
                                   max(_chunk_update_bytes(opts, k) for k in nnzs)}
        trainable = nnz
    elif opts.method == "naive":
        nnz = sum(nnz_for(n, opts.density) for n in shapes)
        state["reference model copy"] = weights
        state["optimizer state (exp_avg, exp_avg_sq)"] = 2 * target * es  # torch AdamW: param dtype, dense
        state["bool masks"] = target
        state["batch"] = batch_bytes
        btv = B * T * V
        # logits of x and x~ (model dtype) + their fp32 log-softmax, the CE's flattened copy
        # of x's rows, the reference logits + log-softmax + its exp, the KL's difference
        # and product: 3 BTV in the model dtype and 8 BTV in fp32 at the KL product
        phases["ref_forward"] = {"reference forward (one block at a time)": ref_work}
        phases["loss"] = {"activations": act,
                          "materialized logits and log-softmaxes": 3 * btv * es + 8 * btv * 4}
        # backward start: the saved log-softmaxes, exp and CE input (4 BTV fp32) and the
        # gradients of the log-softmaxes and the KL slice (3 BTV fp32)
        phases["backward"] = {"activations": act, "backward through one block": back,
                              "logits' gradients and saved log-softmaxes": 7 * btv * 4,
                              "transient dense gradient (one weight)": largest * es}
        phases["optimizer"] = _dense_optimizer_phase(opts, target, largest)
        trainable = nnz
    else:  # full, lora: CE on x only, through the model's own loss (fp32 log-softmax)
        btv = B * T * V
        ce = btv * es + btv * 4 + (btv * 4 if es != 4 else 0)  # logits, log-softmax, fp32 copy
        if opts.method == "full":
            state["optimizer state (exp_avg, exp_avg_sq)"] = 2 * target * es
            trainable = target
            adapter_acts = 0
            grads = "transient dense gradient (one weight)", largest * es
        else:
            r = opts.lora_rank
            lora = arch.layers * r * sum(o + i for o, i in arch.block_linear_shapes().values())
            # peft keeps adapters in fp32 (autocast_adapter_dtype), with fp32 AdamW state
            state["LoRA adapters"] = 4 * lora
            state["optimizer state (exp_avg, exp_avg_sq)"] = 2 * 4 * lora
            trainable = lora
            # each adapter saves its rank-r intermediate (and, for a low-precision model,
            # the fp32 copy of its input that peft makes)
            per_block = 7 * r * 4 + ((5 * H + arch.q_dim + arch.intermediate) * 4 if es != 4 else 0)
            adapter_acts = tokens * arch.layers * per_block if not ckpt else 0
            grads = "adapter gradients", 4 * lora
        state["batch"] = batch_bytes
        phases["loss"] = {"activations": act + adapter_acts, "logits and fp32 log-softmax": ce}
        phases["backward"] = {"activations": act + adapter_acts, "backward through one block": back,
                              "logits' gradient and saved log-softmax": btv * 4 * 2, grads[0]: grads[1]}
        if opts.method == "full":
            phases["optimizer"] = _dense_optimizer_phase(opts, target, largest)
    est = MemoryEstimate(arch, opts, trainable, target, state, phases, acts[False], acts[True],
                         _multi_gpu.Communication(strategy=opts.strategy))
    return _multi_gpu.distribute(est) if opts.gpus > 1 else est


def _dense_optimizer_phase(opts: Options, target: int, largest: int) -> dict[str, int]:
    """torch.optim.AdamW over dense gradients: every gradient is alive (accumulated during
    backward), plus the step's temporaries: on CUDA (foreach) sqrt(exp_avg_sq) of every
    parameter at once, on CPU (one tensor at a time) two of the largest parameter."""
    temps = target if opts.device == "cuda" else 2 * largest
    return {"dense gradients": target * opts.es, "AdamW step temporaries": temps * opts.es}
