"""Training on N GPUs (Options.gpus > 1): the per-GPU memory and the bytes each GPU sends.

A single-GPU estimate (one GPU's micro-batch: `batch` is per GPU) is turned into one GPU's
share of an N-GPU step (`distribute`), as seat.distributed runs it:

dp (compact-gradient data parallelism; DDP for the baselines)
  seat: every GPU holds what one GPU holds. The compact gradients (nnz entries, 4 B fp32 or
  2 B bf16) are all-reduced in buckets of bucket_bytes (25 MiB): up to two buckets' flat
  copies are alive at once (one communicating while the next fills), counted in the
  backward phase, overlapping it: 2 * min(bucket_bytes, compact gradient bytes). With the
  update in backward each weight's transient compact gradient is all-reduced in place in
  its hook: nothing more is alive.
  naive, full, lora: torch DDP with its defaults (gradient_as_bucket_view=False): its
  buckets are a flat copy of every trained gradient (model dtype; fp32 for LoRA's
  adapters), allocated once, so between steps as well.
fsdp (FSDP2 fully_shard per decoder layer and on the root; seat and full only)
  Each parameter is sharded along dim 0 (ceil(dim0 / N) rows per GPU, padded): weights,
  and for seat the masks, original values, optimizer state, compact gradients and fp32
  masters of the trained entries in a GPU's rows (the mean share of a weight's nnz, rounded
  up: ceil(nnz * rows / dim0)); an implicit mask is kept as int32 positions of the shard (4
  B per entry: seat.distributed.shard), so its 8-bit steps need no chunk indices. The root
  (embeddings, lm_head, final norm) is all-gathered once and stays whole from the first
  forward (seat: the reference forward, which runs the root's forward as the loss does) to
  the end of backward (FSDP2 does not reshard the root after forward); a decoder layer is
  all-gathered for each pass (seat: the reference forward, the trained forward, the
  backward; dense: forward, backward) with prefetch, so two layers' whole weights are
  alive while one runs.
  Backward, as FSDP2 runs it (torch's foreach_reduce), for seat and full alike: a layer's
  trained weights' whole dense gradients (model dtype; frozen weights have none) are copied
  into the reduce-scatter input, which stays alive until the next layer's reduce-scatter
  (one in flight), so a layer's whole gradients and a copy of them coexist. The
  reduce-scatter output is one buffer per layer holding the GPU's dense shard of each
  trained weight's gradient; seat's post-accumulate-grad hook (seat.optim.grads) runs on
  each shard gradient, a view of that buffer, after the layer's whole gradients are freed:
  it gathers the masked entries into the compact gradient (state), or, with the update in
  backward, into a transient compact gradient of the GPU's share (grad_dtype) and updates
  the share (8-bit: a chunk at a time). The buffer is freed after the layer's last hook.
  The backward phase holds the worse of the two moments: the whole gradients and their
  copy, or the copy, the layer's shard gradients and the worst hook's transients (only
  the update in backward has any; at N >= 2 the first moment is the larger, short of a
  compact gradient larger than the dense shards). full: sharded gradients and AdamW
  temporaries in the optimizer step.
  Not done: a compact reduce-scatter of seat's masked entries only (e.g. via
  FSDPModule.set_custom_reduce_scatter); FSDP2 reduce-scatters the dense gradients.

Bytes sent per GPU and step, as a ring runs the collective over N GPUs: an all-reduce of P
bytes sends 2 (N - 1) ceil(P / N); an all-gather or reduce-scatter whose share per GPU is S
bytes sends (N - 1) S. The payload is the size of the whole buffer each collective works
on. Baselines at the same N: DDP dense (all-reduce of every trained gradient in the model's
dtype) and FSDP dense (the layers' weights all-gathered twice, the root once, the trained
gradients reduce-scattered, all in the model's dtype). seat under fsdp sends FSDP dense's
bytes and one more all-gather of the layers (its reference forward): more than FSDP dense,
by about half of dense's all-gathers; under dp it sends only its compact gradients.
"""
from __future__ import annotations

import dataclasses

from . import _estimate as E
from ._options import GRAD_DTYPES


@dataclasses.dataclass(frozen=True)
class Communication:
    """Bytes one GPU moves per optimizer step. collectives: {what: (payload, sent)}: the
    whole buffer each collective works on, and the bytes this GPU sends (ring). ddp_dense
    and fsdp_dense: (payload, sent) of dense training of the same targets at the same N.
    All zero on one GPU."""

    gpus: int = 1
    strategy: str = "dp"
    collectives: dict = dataclasses.field(default_factory=dict)
    ddp_dense: tuple = (0, 0)
    fsdp_dense: tuple = (0, 0)

    @property
    def payload(self) -> int:
        return sum(p for p, _ in self.collectives.values())

    @property
    def sent(self) -> int:
        return sum(s for _, s in self.collectives.values())

    def to_dict(self) -> dict:
        return {"gpus": self.gpus, "strategy": self.strategy, "payload_bytes": self.payload,
                "sent_bytes_per_gpu": self.sent,
                "collectives": {k: {"payload_bytes": p, "sent_bytes_per_gpu": s}
                                for k, (p, s) in self.collectives.items()},
                "ddp_dense": {"payload_bytes": self.ddp_dense[0], "sent_bytes_per_gpu": self.ddp_dense[1]},
                "fsdp_dense": {"payload_bytes": self.fsdp_dense[0], "sent_bytes_per_gpu": self.fsdp_dense[1]}}


# ---------------------------------------------------------------------- the tensors FSDP shards
def layer_tensors(arch, sparse: bool) -> list[tuple[int, int, bool]]:
    """(dim0, numel, trained) of every parameter of one decoder layer (sparse: a
    mixture-of-experts layer), in the order seat.patch targets them."""
    H, hd = arch.hidden, arch.head_dim
    out = []
    shapes = arch.attention_shapes() if sparse else arch.block_linear_shapes()
    out += [(o, o * i, True) for o, i in shapes.values()]
    if sparse:
        E_, Ie, Is = arch.experts, arch.expert_intermediate, arch.shared_intermediate
        out += [(E_, E_ * 2 * Ie * H, True), (E_, E_ * H * Ie, True)]
        if Is:
            out += [(Is, Is * H, True), (Is, Is * H, True), (H, H * Is, True), (1, H, True)]
        out.append((E_, E_ * H, False))  # the router
    out += [(H, H, False), (H, H, False)]  # the two RMSNorms
    if arch.qk_norm:
        out += [(hd, hd, False), (hd, hd, False)]
    if arch.qkv_bias or arch.attention_bias:
        out += [(arch.q_dim, arch.q_dim, False), (arch.kv_dim, arch.kv_dim, False), (arch.kv_dim, arch.kv_dim, False)]
    if arch.attention_bias:
        out.append((H, H, False))
    if arch.mlp_bias and not sparse:
        I = arch.intermediate
        out += [(I, I, False), (I, I, False), (H, H, False)]
    return out


def root_tensors(arch) -> list[tuple[int, int, bool]]:
    """(dim0, numel, trained) of the root's own parameters: the embeddings, the lm_head
    (when untied) and the final norm."""
    V, H = arch.vocab, arch.hidden
    return [(V, V * H, False)] * (1 if arch.tied_embeddings else 2) + [(H, H, False)]


def layers(arch) -> list[list[tuple[int, int, bool]]]:
    """Every decoder layer's tensors: the dense layers, then the sparse ones (the order
    of Architecture.target_numels)."""
    return [layer_tensors(arch, False)] * arch.dense_layers + [layer_tensors(arch, True)] * arch.sparse_layers


def shard_rows(dim0: int, gpus: int) -> int:
    """Rows of dim 0 each GPU holds (FSDP2's Shard(0), padded: ceil(dim0 / gpus))."""
    return -(-dim0 // gpus)


def shard_numel(dim0: int, numel: int, gpus: int) -> int:
    return shard_rows(dim0, gpus) * (numel // dim0)


def padded_numel(dim0: int, numel: int, gpus: int) -> int:
    """Elements of the whole (all-gathered, padded) tensor."""
    return gpus * shard_numel(dim0, numel, gpus)


def shard_nnz(nnz: int, dim0: int, gpus: int) -> int:
    """A GPU's share of a weight's nnz trained entries: those in its rows, the mean
    share of a full shard, rounded up."""
    return min(nnz, -(-nnz * shard_rows(dim0, gpus) // dim0))


def ring_all_reduce(payload: int, gpus: int) -> int:
    return 2 * (gpus - 1) * -(-payload // gpus)


# ---------------------------------------------------------------------- dp
def _dp(est, opts):
    state, phases = dict(est.state), {k: dict(v) for k, v in est.phases.items()}
    N, es = opts.gpus, opts.es
    if opts.method == "seat":
        compact = GRAD_DTYPES[opts.grad_dtype] * est.trainable
        if not opts.optimizer_in_backward:
            phases["backward"]["all-reduce buckets (two flat copies)"] = 2 * min(opts.bucket_bytes, compact)
            what = "all-reduce of the compact gradients (buckets)"
        else:
            what = "all-reduce of each compact gradient in its hook"
        collectives = {what: (compact, ring_all_reduce(compact, N))}
    else:
        grads = 4 * est.trainable if opts.method == "lora" else es * est.target_params
        state["DDP gradient buckets (a flat copy of every gradient)"] = grads
        collectives = {"all-reduce of the dense gradients (DDP)": (grads, ring_all_reduce(grads, N))}
    return state, phases, collectives


# ---------------------------------------------------------------------- fsdp
WHOLE_GRADS = "FSDP: one layer's whole dense weight gradients"
RS_INPUT = "FSDP: reduce-scatter input (a copy of them)"
RS_OUTPUT = "FSDP: the layer's reduce-scatter output (its weights' dense shard gradients, one buffer)"
DENSE_RS = "reduce-scatter of the trained weights' dense gradients (FSDP2)"


def shard_options(opts):
    """The options as seat.distributed.shard leaves a shard's mask: an implicit mask becomes
    int32 positions of the shard (4 B per entry, chunks stepped through views)."""
    return dataclasses.replace(opts, index_encoding="int32") if opts.index_encoding == "implicit" else opts


def _fsdp(est, opts):
    arch, N, es = est.arch, opts.gpus, opts.es
    layer_list, root = layers(arch), root_tensors(arch)
    every = [t for layer in layer_list for t in layer] + root
    targets = [(d0, n) for d0, n, trained in every if trained]
    state, phases = dict(est.state), {k: dict(v) for k, v in est.phases.items()}
    state["weights"] = es * sum(shard_numel(d0, n, N) for d0, n, _ in every)
    whole_root = es * sum(padded_numel(d0, n, N) for d0, n, _ in root)
    whole_layer = max(es * sum(padded_numel(d0, n, N) for d0, n, _ in layer) for layer in layer_list)
    unsharded = {"FSDP: the root's whole weights (embeddings, lm_head, final norm)": whole_root,
                 "FSDP: two decoder layers' whole weights (all-gathered, prefetch)": 2 * whole_layer}
    bwd = phases["backward"]
    backward = {"activations": bwd["activations"], "backward through one block": bwd["backward through one block"]}
    phases["loss"]["FSDP: the root's whole weights (embeddings, lm_head, final norm)"] = whole_root
    if opts.method == "seat":
        sharded = shard_options(opts)
        count = E.implicit_nnz if opts.index_encoding == "implicit" else E.nnz_for
        shares = [shard_nnz(count(n, opts.density), d0, N) for d0, n in targets]
        numels = [shard_numel(d0, n, N) for d0, n in targets]
        state["mask indices"] = sum(E._mask_index_bytes(sharded, n, k) for n, k in zip(numels, shares))
        state["original values at the mask"] = es * sum(shares)
        state["optimizer state (exp_avg, exp_avg_sq)"] = E._adam_state_bytes(opts, shares)
        if "fp32 master values" in state:
            state["fp32 master values"] = 4 * sum(shares)
        if "compact gradient" in state:
            state["compact gradient"] = GRAD_DTYPES[opts.grad_dtype] * sum(shares)
        phases["ref_forward"].update(unsharded)
        backward.update(_fsdp_gradients(opts, layer_list))
        if "optimizer" in phases:
            phases["optimizer"] = {"8-bit update: one chunk's fp32 moments and new codes":
                                   max(E._chunk_update_bytes(sharded, k) for k in shares)}
        collectives = _fsdp_dense(arch, opts, reference_forward=True)
    else:  # full: dense AdamW on the sharded targets
        shard_targets = sum(shard_numel(d0, n, N) for d0, n in targets)
        state["optimizer state (exp_avg, exp_avg_sq)"] = 2 * es * shard_targets
        layer_grads = max(es * sum(padded_numel(d0, n, N) for d0, n, trained in layer if trained)
                          for layer in layer_list)
        backward["logits' gradient and saved log-softmax"] = bwd["logits' gradient and saved log-softmax"]
        backward[WHOLE_GRADS] = layer_grads
        backward[RS_INPUT] = layer_grads
        largest = max(shard_numel(d0, n, N) for d0, n in targets)
        phases["optimizer"] = E._dense_optimizer_phase(opts, shard_targets, largest)
        collectives = _fsdp_dense(arch, opts)
    phases["backward"] = {**backward, **unsharded}
    return state, phases, collectives


def _fsdp_gradients(opts, layer_list) -> dict[str, int]:
    """seat's gradients in backward under fsdp, at the worst layer and moment (see the
    module docstring): a layer's whole dense gradients and FSDP2's reduce-scatter copy of
    them; or that copy, the reduce-scatter output (the layer's dense shard gradients, of
    which each hook's gradient is a view) and, with the update in backward, the hook's
    transient compact gradient of the GPU's share (grad_dtype) and, 8-bit, one chunk's
    update of that share."""
    N, es, gs = opts.gpus, opts.es, GRAD_DTYPES[opts.grad_dtype]
    sharded = shard_options(opts)
    count = E.implicit_nnz if opts.index_encoding == "implicit" else E.nnz_for
    worst: dict[str, int] = {}
    for layer in layer_list:
        trained = [(d0, n) for d0, n, t in layer if t]
        whole = es * sum(padded_numel(d0, n, N) for d0, n in trained)
        out = es * sum(shard_numel(d0, n, N) for d0, n in trained)
        moments = [{WHOLE_GRADS: whole, RS_INPUT: whole}]
        for d0, n in trained:
            hook = {RS_INPUT: whole, RS_OUTPUT: out}
            if opts.optimizer_in_backward:
                share = shard_nnz(count(n, opts.density), d0, N)
                hook["its transient compact gradient of the GPU's share (update in backward)"] = gs * share
                if opts.optimizer_bits == 8:
                    hook["8-bit update in backward: one chunk's fp32 moments and new codes"] = \
                        E._chunk_update_bytes(sharded, share)
            moments.append(hook)
        for moment in moments:
            if sum(moment.values()) > sum(worst.values()):
                worst = moment
    return worst


def _fsdp_dense(arch, opts, reference_forward: bool = False) -> dict[str, tuple[int, int]]:
    """FSDP2's collectives: the layers' weights all-gathered for the forward and the
    backward (reference_forward: also for seat's reference forward), the root's once, the
    trained weights' dense gradients reduce-scattered in the model's dtype. Without
    reference_forward: FSDP dense training of the same targets."""
    N, es = opts.gpus, opts.es
    layer_list, root = layers(arch), root_tensors(arch)
    layer_bytes = es * sum(shard_numel(d0, n, N) for layer in layer_list for d0, n, _ in layer)
    root_bytes = es * sum(shard_numel(d0, n, N) for d0, n, _ in root)
    grad_bytes = es * sum(shard_numel(d0, n, N) for layer in layer_list for d0, n, t in layer if t)
    passes, what = (3, "reference forward, forward, backward") if reference_forward else (2, "forward, backward")
    return {f"all-gather of the decoder layers' weights ({what})": (passes * N * layer_bytes,
                                                                    passes * (N - 1) * layer_bytes),
            "all-gather of the root's weights (once)": (N * root_bytes, (N - 1) * root_bytes),
            DENSE_RS: (N * grad_bytes, (N - 1) * grad_bytes)}


def _total(collectives: dict) -> tuple[int, int]:
    return sum(p for p, _ in collectives.values()), sum(s for _, s in collectives.values())


def distribute(est):
    """One GPU's share of an N-GPU step, from the single-GPU estimate `est` of the same
    options (est.options.gpus > 1): a new MemoryEstimate with the per-GPU state and phases
    and its Communication."""
    opts = est.options
    state, phases, collectives = (_fsdp if opts.strategy == "fsdp" else _dp)(est, opts)
    dense = est.options.es * est.target_params
    comm = Communication(gpus=opts.gpus, strategy=opts.strategy, collectives=collectives,
                         ddp_dense=(dense, ring_all_reduce(dense, opts.gpus)),
                         fsdp_dense=_total(_fsdp_dense(est.arch, opts)))
    return dataclasses.replace(est, state=state, phases=phases, communication=comm)
