"""SEAT on a model sharded with FSDP2 (torch.distributed.fsdp.fully_shard).

``shard(handle)`` shards a patched model: each decoder layer is a unit of its own and the
model is the root, as FSDP2's own examples do. Every parameter becomes a DTensor sharded
along dim 0 (rank r holds rows [r * c, (r + 1) * c), c = ceil(dim0 / N)), and each trained
weight's mask, base values and (later) optimizer state are cut to the rank's rows:

  * the mask: the entries at flat positions [lo, hi) of the rank's rows (Mask.slots_in /
    positions_in), re-based to the shard, in the weight's encoding (an implicit mask is
    evaluated on the global element index over [lo, hi) only, and kept as int32 positions
    of the shard: 4 bytes per local entry);
  * the base values: the slots of those entries;
  * SparseAdamW built afterwards (handle.optimizer()) holds state for the local entries
    only, its hooks compact the reduce-scattered shard gradient FSDP2 hands each
    parameter, and its step writes the rank's rows (seat.distributed._local).

Gradients travel as FSDP2 sends them (a dense reduce-scatter of each trained weight's
gradient; frozen weights send none); the all-gathers are FSDP2's. ``reduce="sum"`` sums
the ranks' gradients instead of averaging them (for losses normalized by the global
batch's token counts, seat.distributed.global_counts).

handle.reference() swaps the base values into the local shards, so the next all-gather
of each layer gives the base model: the layers are resharded after every forward
(reshard_after_forward=True), and a swap while a layer is unsharded (between a forward
and its backward with reshard_after_forward=False, e.g.) is refused. SEAT's loss runs the
root module's forward (so FSDP2 all-gathers the root and schedules its backward) with
logits for the last position only, and reads the decoder's hidden states there; the
lm_head weight is then the root's unsharded weight.

save_delta gathers every rank's trained values, positions and base values to rank 0,
which writes the same delta as a one-process run (atomically); every rank returns or
raises together.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from ..masks import as_mask, encode_chosen, from_spec, mask_indices
from ._local import is_dtensor, local

REDUCE = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Where a trained weight's local shard sits in the whole weight (flat positions
    [lo, hi)) and what the whole weight's mask is (for the delta and the counts)."""

    lo: int
    hi: int
    numel: int  # the whole weight's elements
    shape: tuple
    nnz: int  # the whole mask's entries
    spec: dict | None  # the whole mask's spec (implicit masks), else None: the positions are gathered at save
    fingerprint: dict  # the whole mask's spec or indices' sha256 (seat.trainer_resume.mask_fingerprint)


@dataclasses.dataclass
class Sharding:
    """A handle's FSDP2 set-up: its process group and how gradients are reduced."""

    group: object
    world_size: int
    rank: int
    reduce: str
    units: list  # the modules given to fully_shard, the root last


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("seat.distributed.shard needs torch.distributed initialized: launch with torchrun and call "
                         "torch.distributed.init_process_group() first")
    return dist


def _layers(handle) -> list[torch.nn.Module]:
    """The decoder's blocks: the modules of the model's _no_split_modules classes (what
    transformers keeps whole on a device), else the items of the decoder's largest
    ModuleList."""
    names = set(getattr(handle.model, "_no_split_modules", None) or ())
    found = [m for m in handle.decoder.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in handle.decoder.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def _check(handle, mesh, reduce, mp_policy) -> None:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

    from ..quant import QuantTarget

    handle._check_patched()
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be 'mean' (FSDP2's average of the ranks' gradients) or 'sum' (losses "
                         f"normalized by the global batch's token counts); got {reduce!r}")
    if getattr(handle, "_sharding", None) is not None:
        raise RuntimeError("this handle's model is already sharded (seat.distributed.shard runs once)")
    if isinstance(handle.model, FSDPModule) or any(is_dtensor(p) for p in handle.model.parameters()):
        raise ValueError("the model is already sharded (fully_shard was called on it): patch the unsharded model, "
                         "then call seat.distributed.shard(handle), which applies fully_shard itself")
    if handle._optimizer is not None:
        raise RuntimeError("shard the model before making its optimizer: call seat.distributed.shard(handle), then "
                           "handle.optimizer() (the optimizer's hooks and state belong to the sharded parameters)")
    handle._refuse_in_reference("shard the model")
    quant = [name for name, t in handle.targets.items() if isinstance(t, QuantTarget)]
    if quant:
        raise ValueError(f"seat.distributed.shard does not take 4-bit weights (QSEAT), e.g. {quant[0]}: FSDP2 "
                         "cannot shard a bitsandbytes packed weight. Use data parallelism "
                         "(seat.distributed.DataParallel) for a 4-bit model")
    if "logits_to_keep" not in inspect.signature(type(handle.model).forward).parameters:
        raise ValueError(f"{type(handle.model).__name__}.forward has no logits_to_keep argument: under FSDP2 seat "
                         "runs the root's forward for the hidden states and needs it to skip the full logits")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise ValueError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None; got "
                         f"{type(mp_policy).__name__}")
    if mesh is not None and getattr(mesh, "ndim", None) != 1:
        raise ValueError("mesh must be a 1-D DeviceMesh (FSDP2's shard dimension) or None (all ranks)")
    if not _layers(handle):
        raise ValueError(f"found no decoder layers in {type(handle.decoder).__name__} to shard one by one (no "
                         "_no_split_modules class and no ModuleList)")


def shard(handle, *, mesh=None, reduce: str = "mean", mp_policy=None) -> None:
    """Shard `handle`'s model with FSDP2 and cut its masks, base values and (from now on)
    optimizer state to each rank's rows (see the module docstring). Call it on every rank,
    after seat.patch and before handle.optimizer().

    mesh: a 1-D torch DeviceMesh (None: every rank, on the model's device type).
    reduce: "mean" (FSDP2's default: the ranks' gradients averaged) or "sum".
    mp_policy: an FSDP2 MixedPrecisionPolicy (None: FSDP2's default, the params' dtype).
    """
    from torch.distributed.fsdp import fully_shard

    dist = _dist()
    _check(handle, mesh, reduce, mp_policy)
    kwargs = {"mesh": mesh} if mesh is not None else {}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    layers = _layers(handle)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    # a trained weight outside the layers (lm_head, say) gets a unit of its own: the root
    # stays unsharded from forward to backward, where a reference swap would not reach it
    lone = [t.module for t in handle.targets.values() if id(t.param) not in inside]
    units = [*layers, *dict.fromkeys(lone)]
    for unit in units:
        fully_shard(unit, reshard_after_forward=True, **kwargs)
    fully_shard(handle.model, **kwargs)
    units.append(handle.model)
    if reduce == "sum":
        for unit in units:  # a plain SUM (gloo has no pre-multiplied sum)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    group = None
    for name, t in handle.targets.items():
        param = getattr(t.module, name.rsplit(".", 1)[-1])
        group = param.device_mesh.get_group()
        _cut(t, param)
    handle._sharding = Sharding(group, dist.get_world_size(group), dist.get_rank(group), reduce, units)


def _cut(t, param) -> None:
    """Rebind target `t` to its sharded parameter: the mask, base values and bookkeeping
    of the rank's rows only."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ..trainer_resume import mask_fingerprint

    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"{t.name} is sharded as {param.placements}; seat takes FSDP2's dim-0 sharding only")
    whole = as_mask(t.idx, param.numel(), t.name)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    inner = param.numel() // param.shape[0] if param.shape[0] else 0
    lo = int(offset[0]) * inner if shape[0] else 0
    hi = lo + int(shape[0]) * inner
    s0, s1 = whole.slots_in(lo, hi)
    positions = whole.positions_in(lo, hi)
    info = ShardInfo(lo, hi, param.numel(), tuple(param.shape), whole.nnz, whole.spec(), mask_fingerprint(whole))
    t.param = param
    t.idx = encode_chosen(positions.to(local(param).device), hi - lo, whole.encoding)  # implicit -> int32
    t.original = t.original[s0:s1].clone()
    t.shard = info


# ---------------------------------------------------------------------- delta
def delta_entries(handle) -> dict | None:
    """{name: (mask, values, original)} of the whole weights, gathered to rank 0 (None on
    the other ranks): what a one-process run's targets hold at the masks."""
    import torch.distributed as dist

    sharding = handle._sharding
    mine = {}
    for name, t in handle.targets.items():
        where = mask_indices(t.idx).long()
        values = local(t.param).detach().view(-1)[where].cpu()
        positions = None if t.shard.spec is not None else (where + t.shard.lo).int().cpu()
        mine[name] = (values, positions, t.original.detach().cpu())
    root = dist.get_global_rank(sharding.group, 0)
    gathered = [None] * sharding.world_size if sharding.rank == 0 else None
    dist.gather_object(mine, gathered, dst=root, group=sharding.group)
    if sharding.rank != 0:
        return None
    out = {}
    for name, t in handle.targets.items():
        parts = [g[name] for g in gathered]
        values = torch.cat([p[0] for p in parts])
        original = torch.cat([p[2] for p in parts])
        if t.shard.spec is not None:
            mask = from_spec(t.shard.spec)
        else:
            mask = as_mask(torch.cat([p[1] for p in parts]), t.shard.numel, name)
        out[name] = (mask, values, original)
    return out


def agree(sharding, error: BaseException | None) -> None:
    """Every rank raises if any did (rank 0 writing a delta, say): the first failed rank's
    error, as its own type where it survives pickling (so that an `except` clause catches it
    on every rank alike), else as a RuntimeError with its text."""
    import pickle

    import torch.distributed as dist

    sent = None
    if error is not None:
        try:
            sent = pickle.loads(pickle.dumps(error))
        except Exception:  # an error that does not travel: its text does
            sent = RuntimeError(f"{type(error).__name__}: {error}")
    errors = [None] * sharding.world_size
    dist.all_gather_object(errors, sent, group=sharding.group)
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, theirs = failed[0]
        try:
            mine = type(theirs)(f"rank {rank} failed: {theirs}")
        except Exception:  # a constructor that takes no single message
            mine = RuntimeError(f"rank {rank} failed: {type(theirs).__name__}: {theirs}")
        raise mine


def load_delta_shards(handle, directory) -> None:
    """Write a delta of the whole weights (save_delta's, from any number of ranks) into
    this rank's rows: every rank calls it. Checked first, on every rank alike: the files
    (read_delta), the model class, each weight's shape, dtype and mask, and the base values
    at each mask equal to the ones this model started from (gathered to rank 0). A failed
    load writes nothing on any rank and raises on every rank."""
    import torch.distributed as dist

    from ..delta import DeltaMismatchError, read_delta
    from ..delta._format import bytes_sha256, dtype_name
    from ..masks import from_spec
    from ..trainer_resume import mask_fingerprint

    sharding = handle._sharding
    error, meta, tensors = None, None, None
    try:
        meta, tensors = read_delta(directory)
    except Exception as e:  # raised on every rank below, after the ranks agree
        error = e
    agree(sharding, error)
    originals = {name: t.original.detach().cpu() for name, t in handle.targets.items()}
    gathered = [None] * sharding.world_size if sharding.rank == 0 else None
    dist.gather_object(originals, gathered, dst=dist.get_global_rank(sharding.group, 0), group=sharding.group)
    writes = []
    try:
        from ..delta import _class_name

        if meta["model_class"] != _class_name(handle.model):
            raise DeltaMismatchError(f"{directory}: the delta was trained on a {meta['model_class']}, this model is "
                                     f"a {_class_name(handle.model)}")
        for name, t in handle.targets.items():
            entry = meta["weights"].get(name)
            if entry is None:
                raise DeltaMismatchError(f"{directory} has no values for {name}")
            if entry["shape"] != list(t.shard.shape) or entry["dtype"] != dtype_name(t.param.dtype):
                raise DeltaMismatchError(f"{directory}: {name} is {entry['dtype']} {entry['shape']} in the delta, "
                                         f"{dtype_name(t.param.dtype)} {list(t.shard.shape)} here")
            whole = from_spec(entry["mask"]) if "mask" in entry else as_mask(tensors[f"idx/{name}"], t.shard.numel,
                                                                                name)
            if mask_fingerprint(whole) != t.shard.fingerprint:
                raise DeltaMismatchError(f"{directory}: the mask of {name} differs from this model's")
            if gathered is not None and bytes_sha256(torch.cat([g[name] for g in gathered])) != entry["base_sha256"]:
                raise DeltaMismatchError(f"{directory}: the base values at the mask of {name} differ from this "
                                         "model's: load a delta trained from this base model")
            s0, s1 = whole.slots_in(t.shard.lo, t.shard.hi)
            writes.append((t, tensors[f"values/{name}"][s0:s1]))
    except Exception as e:
        error = e
    agree(sharding, error)
    with torch.no_grad():
        for t, values in writes:
            local(t.param).view(-1)[mask_indices(t.idx).long()] = values.to(local(t.param).device)
