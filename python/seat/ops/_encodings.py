"""The mask encodings of the sparse-update ops, as the ops and kernels see them.

Every sparse-update op (masked_gather_, masked_swap_, sparse_adamw_) takes a mask in any
encoding as ``MaskArgs(encoding, index, offsets, ints)``; compact slot j is the j-th
trained entry in increasing position order in every encoding, so optimizer state and
trajectories do not depend on it:

  INDEX    index   (nnz,) int32 sorted unique flat indices in [0, numel)
           offsets empty uint16; ints (0, 0, 0)
  BLOCK16  index   (ceil(numel / 65536) + 1,) int32 block_starts: entries before
                   element b * 65536 ([0] = 0, [-1] = nnz)
           offsets (nnz,) uint16: each entry's index minus 65536 * its block
           ints (0, 0, 0). 2 bytes per entry + 4 per 65536 elements.
  HASH     element e is trained iff mix32(key ^ mix32(e)) < threshold (threshold =
           round(density * 2**32) in [0, 2**32]: each element independently, so nnz is
           Binomial(numel, density)); index (ceil(numel / block) + 1,) int32
           block_offsets: members before each block of `block` elements (a power of
           two); offsets empty; ints (key, threshold, block). 4 bytes per block.
  FULL     every element, in order: position = slot = j for j < numel (compact arrays
           of numel entries: a compact parameter trained whole, e.g. QSEAT's delta);
           index an empty int32 tensor (it only says the device); offsets empty;
           ints (0, 0, 0). No bytes per entry.

The same definitions are csrc/include/seat/masks.h (C++/CUDA policies) and the ENC
constexpr of seat_kernels/sparse_update.py. ``decode`` turns any encoding into INDEX:
the oracle every kernel is tested against and what the references run. The Python
classes users hold (seat.masks.IndexMask, Block16Mask, ImplicitMask) produce MaskArgs
with ``op_args()``; a bare int32 tensor is an INDEX mask.

Safety and validation: no kernel touches memory outside its tensors, whatever a mask
holds (an entry whose position or slot lies outside them is skipped; ``entries`` is what
every backend visits). The ops refuse a mask that breaks its encoding's contract with a
ValueError before anything is written: a CPU mask is checked on every call (one
vectorized pass on the host, ~1% of a gather), so a write torch does not see (through
.numpy(), .data, DLPack) cannot slip past; a mask on another device is checked once per
in-place version (a copy to the host), and there the kernels' bounds are the safety.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .._constants import BLOCK16_SIZE, DEFAULT_HASH_BLOCK, INT32_MAX, MAX_HASH_BLOCK, MIN_HASH_BLOCK
from . import _adamw, _checks

INDEX, BLOCK16, HASH, FULL = 0, 1, 2, 3
NAMES = {INDEX: "int32", BLOCK16: "block16", HASH: "implicit", FULL: "full"}  # the encodings' names
MASK_INTS = 3  # ints per mask in the op schemas: (key, threshold, block) of HASH, zeros otherwise
NO_INTS = (0, 0, 0)

FULL_THRESHOLD = 2**32  # threshold of density 1: every element
M32 = _adamw.M32
_MASK_DOMAIN = 0x6D61736B  # "mask": separates mask keys from stochastic-rounding keys
_CHUNK = 1 << 20  # elements hashed at a time by the references (bounds their int64 scratch)


class MaskArgs(NamedTuple):
    """One mask as the ops take it (see the module docstring)."""

    encoding: int
    index: Tensor
    offsets: Tensor
    ints: tuple[int, int, int]


_NO_OFFSETS: dict[torch.device, Tensor] = {}  # one empty uint16 tensor per device, never written


def no_offsets(device: torch.device) -> Tensor:
    """The empty `offsets` of an INDEX or HASH mask on `device` (shared: kernels never write it)."""
    t = _NO_OFFSETS.get(device)
    if t is None:
        t = torch.empty(0, dtype=torch.uint16, device=device)
        if not _checks.is_fake(t):  # a tensor made while torch.compile traces is not kept
            _NO_OFFSETS[device] = t
    return t


_NO_INDEX: dict[torch.device, Tensor] = {}  # one empty int32 tensor per device, never written


def no_index(device: torch.device) -> Tensor:
    """The empty `index` of a FULL mask on `device` (shared: kernels never write it)."""
    t = _NO_INDEX.get(device)
    if t is None:
        t = torch.empty(0, dtype=torch.int32, device=device)
        if not _checks.is_fake(t):
            _NO_INDEX[device] = t
    return t


def as_mask_args(name: str, mask, numel: int | None = None) -> MaskArgs:
    """MaskArgs of `mask`: an int32 index tensor, a MaskArgs, or an object with
    ``op_args()`` (the seat.masks encodings; with `numel`, its own numel must equal it)."""
    if isinstance(mask, MaskArgs):
        return mask
    if isinstance(mask, Tensor):
        return MaskArgs(INDEX, mask, no_offsets(mask.device), NO_INTS)
    op_args = getattr(mask, "op_args", None)
    if callable(op_args):
        covers = getattr(mask, "numel", numel)
        if numel is not None and covers != numel:
            raise ValueError(f"{name} ({type(mask).__name__}) was built for a tensor of {covers} elements; this one "
                             f"has {numel}")
        return op_args()
    raise TypeError(f"{name} must be a mask: int32 flat indices (a torch.Tensor) or a seat.masks mask "
                    f"(IndexMask, Block16Mask, ImplicitMask, FullMask); got {type(mask).__name__}")


def from_op_args(index, offsets, encoding, ints) -> MaskArgs:
    """A single-mask op's mask arguments as MaskArgs (omitted ones: an INDEX mask's)."""
    if offsets is None and isinstance(index, Tensor):
        offsets = no_offsets(index.device)
    return MaskArgs(encoding, index, offsets, NO_INTS if ints is None else tuple(ints))


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


# ----------------------------------------------------------------------------- HASH


def mask_key(seed: int, param_id: int) -> int:
    """The 32-bit key of the hash mask of (seed, param_id): seed an int64, param_id in [0, 2**32)."""
    seed_key = _adamw.mix32((seed & M32) ^ _adamw.mix32((seed >> 32) & M32))
    return _adamw.mix32(_adamw.mix32(seed_key ^ _MASK_DOMAIN) ^ _adamw.mix32(param_id & M32))


def threshold_for(density: float) -> int:
    """round(density * 2**32): the membership threshold of a density in [0, 1]."""
    return int(round(float(density) * FULL_THRESHOLD))


def members(key: int, start: int, stop: int, threshold: int, device=None) -> Tensor:
    """bool (stop - start,): hash-mask membership of elements [start, stop)."""
    e = torch.arange(start, stop, dtype=torch.int64, device=device)
    return _adamw.mix32_tensor(key ^ _adamw.mix32_tensor(e & M32)) < threshold


def hash_indices(numel: int, key: int, threshold: int, device=None) -> Tensor:
    """The hash mask as sorted int32 flat indices (what the INDEX encoding holds)."""
    parts = [members(key, s, min(numel, s + _CHUNK), threshold, device).nonzero().squeeze(1) + s
             for s in range(0, numel, _CHUNK)]
    if not parts:
        return torch.empty(0, dtype=torch.int32, device=device)
    return torch.cat(parts).to(torch.int32)


def hash_block_counts(numel: int, key: int, threshold: int, block: int, device) -> Tensor:
    """int32 (n_blocks,): members per block (the reference of implicit_block_offsets_)."""
    counts = []
    step = max(block, _CHUNK - _CHUNK % block)  # whole blocks per chunk
    for s in range(0, numel, step):
        hit = members(key, s, min(numel, s + step), threshold, device)
        pad = (-hit.numel()) % block
        if pad:
            hit = torch.cat([hit, hit.new_zeros(pad)])
        counts.append(hit.view(-1, block).sum(1, dtype=torch.int32))
    return torch.cat(counts) if counts else torch.empty(0, dtype=torch.int32, device=device)


def check_hash_params(prefix: str, *, threshold, block, **ints) -> None:
    """The scalars of a hash mask (seed, param_id or key, threshold, block); `prefix`
    names them in errors."""
    for name, value in (*ints.items(), ("threshold", threshold), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{prefix}{name} must be an int; got {type(value).__name__}")
    if "seed" in ints and not -(2**63) <= ints["seed"] < 2**63:
        raise ValueError(f"{prefix}seed must be in [-2**63, 2**63) (an int64); got {ints['seed']}")
    for name in ("param_id", "key"):
        if name in ints and not 0 <= ints[name] < 2**32:
            raise ValueError(f"{prefix}{name} must be in [0, 2**32); got {ints[name]}")
    if not 0 <= threshold <= FULL_THRESHOLD:
        raise ValueError(f"{prefix}threshold must be in [0, 2**32] (round(density * 2**32)); got {threshold}")
    if not (MIN_HASH_BLOCK <= block <= MAX_HASH_BLOCK and block & (block - 1) == 0):
        raise ValueError(f"{prefix}block must be a power of two in [{MIN_HASH_BLOCK}, {MAX_HASH_BLOCK}]; got {block}")


# block_offsets whose prefix counts were recounted from (key, threshold): (version,
# numel, block, nnz, key, threshold) by tensor identity (a weak key: the entry goes with
# the tensor). Recounting hashes every element, as much work as a step, so it is done
# once per in-place version; the cheap structural checks run on every call on CPU. Offsets
# edited behind torch's back keep their slots inside [0, nnz) (the structure is checked):
# they number the members differently (`entries` says how), they never reach past them.
_checked_offsets: WeakIdKeyDictionary = WeakIdKeyDictionary()


def record_block_offsets(block_offsets: Tensor, numel: int, block: int, key: int, threshold: int) -> None:
    """Record block_offsets that implicit_block_offsets_ computed for (key, threshold)
    (or a copy of such) as checked, so their first use does not count the members again."""
    if not _checks.is_fake(block_offsets):
        _checked_offsets[block_offsets] = (block_offsets._version, numel, block, int(block_offsets[-1]), key,
                                           threshold)


def check_block_offsets(name: str, block_offsets, numel: int, block: int, nnz: int | None, *, values: bool,
                        key: int | None = None, threshold: int | None = None) -> None:
    """block_offsets: 1-D int32 of ceil(numel / block) + 1 entries; with values, also
    0 at [0], steps in [0, block], [-1] == nnz (on every call on CPU, once per in-place
    version elsewhere) and, given (key, threshold), equal to the mask's own prefix counts
    (counted again once per in-place version unless recorded).
    nnz None: the compact arrays are not known (implicit_block_offsets_ fills them)."""
    _checks.tensor(name, block_offsets, dtypes=(torch.int32,), ndim=1)
    if numel > INT32_MAX:
        raise ValueError(f"{name} belongs to a tensor of {numel} elements; masks reach at most 2**31-1")
    expected = n_blocks(numel, block) + 1
    if block_offsets.numel() != expected:
        raise ValueError(f"{name} must have ceil(numel / block) + 1 = {expected} entries for {numel} elements in "
                         f"blocks of {block}; got {block_offsets.numel()} (build it with "
                         "seat.masks.ImplicitMask or implicit_block_offsets_)")
    if not values or nnz is None or _checks.is_fake(block_offsets):
        return
    seen = (block_offsets._version, numel, block, nnz, key, threshold)
    recorded = _checked_offsets.get(block_offsets) == seen
    if recorded and not _checks.checked_every_call(block_offsets):
        return
    offsets = _checks.host_values(block_offsets)
    steps = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != nnz or (steps.size and not bool(((steps >= 0) & (steps <= block)).all())):
        raise ValueError(f"{name} is not a prefix count of a mask with {nnz} entries (it must start at 0, grow by "
                         f"0..{block} per block and end at {nnz}); got [{int(offsets[0])}, ..., "
                         f"{int(offsets[-1])}]. Build it with implicit_block_offsets_ for the same mask")
    if key is not None and not recorded:  # offsets of another mask (or edited) would number the slots wrongly
        counts = hash_block_counts(numel, key, threshold, block, block_offsets.device)
        if not torch.equal(torch.cumsum(counts, 0, dtype=torch.int32), block_offsets[1:]):
            raise ValueError(f"{name} are not the prefix counts of this mask (key={key}, threshold={threshold}): "
                             "they belong to another mask or were edited. Build them with "
                             "implicit_block_offsets_ (seat.masks.ImplicitMask does)")
    _checked_offsets[block_offsets] = seen


# ----------------------------------------------------------------------------- BLOCK16


def encode_block16(idx: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Sorted unique int32 indices into a tensor of numel elements -> (block_starts int32
    (n_blocks + 1,), offsets uint16 (nnz,)), on idx's device."""
    _checks.index_tensor("idx", idx, numel)
    _checks.index_values("idx", idx, numel)
    pos = idx.long()
    bounds = torch.arange(n_blocks(numel, BLOCK16_SIZE) + 1, dtype=torch.int64, device=idx.device) * BLOCK16_SIZE
    starts = torch.searchsorted(pos, bounds).to(torch.int32)
    offsets = (pos % BLOCK16_SIZE).to(torch.int32).to(torch.uint16)  # via int32: values in [0, 65536)
    return starts, offsets


def decode_block16(block_starts: Tensor, offsets: Tensor) -> Tensor:
    """(block_starts, offsets) -> the sorted int32 indices."""
    counts = block_starts.diff().long()
    blocks = torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts)
    return (blocks * BLOCK16_SIZE + offsets.to(torch.int32).long()).to(torch.int32)


# offsets -> (weakref to block_starts, versions, numel) of non-CPU masks checked (CPU
# ones are checked on every call): a reference, not id(), so a freed block_starts whose
# address is reused is not mistaken for the checked one. A fast path to a clear error
# only: the kernels skip a position outside the tensor whatever the mask holds.
_checked_block16: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_block16(prefix: str, block_starts, offsets, numel: int, *, values: bool) -> None:
    """block_starts int32 (ceil(numel / 65536) + 1,), offsets uint16 1-D; with values,
    also: starts from 0, non-decreasing, ends at offsets.numel(), and the decoded indices
    strictly increasing and < numel (one pass over offsets: on every call on CPU, once per
    in-place version elsewhere)."""
    _checks.tensor(f"{prefix}block_starts", block_starts, dtypes=(torch.int32,), ndim=1)
    _checks.tensor(f"{prefix}offsets", offsets, dtypes=(torch.uint16,), ndim=1)
    if numel > INT32_MAX:
        raise ValueError(f"{prefix}block_starts belongs to a tensor of {numel} elements; masks reach at most 2**31-1")
    expected = n_blocks(numel, BLOCK16_SIZE) + 1
    if block_starts.numel() != expected:
        raise ValueError(f"{prefix}block_starts must have ceil(numel / 65536) + 1 = {expected} entries for {numel} "
                         f"elements; got {block_starts.numel()} (build it with encode_block16)")
    if block_starts.device != offsets.device:
        raise ValueError(f"{prefix}offsets is on {offsets.device} but {prefix}block_starts is on "
                         f"{block_starts.device}; move them to the same device")
    if not values or _checks.is_fake(offsets) or _checks.is_fake(block_starts):
        return
    every_call = _checks.checked_every_call(offsets)
    seen = _checked_block16.get(offsets)
    if (not every_call and seen is not None and seen[0]() is block_starts
            and seen[1:] == _block16_versions(block_starts, offsets, numel)):
        return
    starts, offs = _checks.host_values(block_starts), _checks.host_values(offsets)
    nnz = offs.size
    if starts[0] != 0 or starts[-1] != nnz or (starts.size > 1 and bool((np.diff(starts) < 0).any())):
        raise ValueError(f"{prefix}block_starts must start at 0, never decrease and end at offsets.numel() = {nnz}; "
                         f"got [{int(starts[0])}, ..., {int(starts[-1])}] (build it with encode_block16)")
    if nnz > 1:  # increasing within a block; across a block boundary the position always grows
        rising = offs[1:] > offs[:-1]
        cuts = starts[(starts > 0) & (starts < nnz)]
        rising[cuts - 1] = True
        if not bool(rising.all()):
            raise ValueError(f"{prefix}offsets must be strictly increasing within each block (sorted, unique "
                             "entries)")
    if nnz:
        last = (int(np.searchsorted(starts, nnz - 1, side="right")) - 1) * BLOCK16_SIZE + int(offs[-1])
        if last >= numel:
            raise ValueError(f"{prefix}offsets reach element {last}, outside a tensor of {numel} elements")
    if not every_call:
        _record_block16(block_starts, offsets, numel)


def _block16_versions(block_starts: Tensor, offsets: Tensor, numel: int) -> tuple:
    return block_starts._version, offsets._version, numel


def _record_block16(block_starts: Tensor, offsets: Tensor, numel: int) -> None:
    _checked_block16[offsets] = (weakref.ref(block_starts), *_block16_versions(block_starts, offsets, numel))


def record_block16_piece(block_starts: Tensor, offsets: Tensor, piece_starts: Tensor, piece_offsets: Tensor,
                         numel: int) -> None:
    """Record a piece of a block16 mask (entries [start, stop): offsets[start:stop], block
    starts shifted by -start and clamped to [0, stop - start]; Block16Mask.chunk) as
    checked: a piece of a valid mask is valid. The whole mask is checked first."""
    check_block16("", block_starts, offsets, numel, values=True)
    if not (_checks.is_fake(piece_offsets) or _checks.is_fake(piece_starts)):
        _record_block16(piece_starts, piece_offsets, numel)


# ----------------------------------------------------------------------------- every encoding


def decode(mask: MaskArgs, numel: int) -> Tensor:
    """The mask as (nnz,) sorted unique int32 flat indices: the oracle of every kernel."""
    if mask.encoding == INDEX:
        return mask.index
    if mask.encoding == BLOCK16:
        return decode_block16(mask.index, mask.offsets)
    if mask.encoding == FULL:
        return torch.arange(numel, dtype=torch.int32, device=mask.index.device)
    key, threshold, _ = mask.ints
    return hash_indices(numel, key, threshold, mask.index.device)


def entries(mask: MaskArgs, numel: int, nnz: int) -> tuple[Tensor, Tensor]:
    """(positions, slots), int64: the entries an op visits, as every kernel visits them
    (what the references run). For a valid mask slot j holds the j-th position. A hash
    mask numbers each block's members from block_offsets[b] and skips slots at or past
    block_offsets[b + 1]: block_offsets that pass the per-call structural checks but
    were edited where torch does not see it (no version bump, so not recounted) number
    the slots that way on every backend."""
    pos = decode(mask, numel).long()
    if mask.encoding != HASH:
        return pos, torch.arange(nnz, device=pos.device)
    offsets = mask.index.long()
    block = pos // mask.ints[2]
    rank = torch.arange(pos.numel(), device=pos.device) - torch.searchsorted(block, block)
    slot = offsets[block] + rank
    keep = slot < offsets[block + 1]
    return pos[keep], slot[keep]


def check(name: str, mask: MaskArgs, numel: int, compact_name: str, compact: Tensor, *, values: bool) -> None:
    """Validate one mask of a tensor of `numel` elements whose compact arrays (such as
    `compact`, 1-D) hold one entry per trained element. `name` names the mask in
    errors (e.g. 'masks[2]'); with values, the data-dependent checks too."""
    encoding, index, offsets, ints = mask
    if isinstance(encoding, bool) or encoding not in NAMES:
        raise ValueError(f"{name}: encoding must be one of {sorted(NAMES)} ({', '.join(NAMES.values())}); "
                         f"got {encoding!r}")
    if not isinstance(ints, (list, tuple)) or len(ints) != MASK_INTS:
        raise ValueError(f"{name}: mask ints must be {MASK_INTS} ints (key, threshold, block); got {ints!r}")
    _checks.tensor(f"{compact_name}", compact, ndim=1)
    if encoding == INDEX:
        _checks.index_tensor(name, index, numel)
        _checks.same_numel(compact_name, compact, name, index)
        if values:
            _checks.index_values(name, index, numel)
    elif encoding == BLOCK16:
        check_block16(f"{name}.", index, offsets, numel, values=values)
        _checks.same_numel(compact_name, compact, f"{name}.offsets", offsets)
    elif encoding == FULL:
        _checks.tensor(name, index, dtypes=(torch.int32,), ndim=1)
        if index.numel():
            raise ValueError(f"{name}: a full mask holds no indices (an empty int32 tensor); got {index.numel()}")
        if numel > INT32_MAX:
            raise ValueError(f"{name} covers a tensor of {numel} elements; masks reach at most 2**31-1")
        if compact.numel() != numel:
            raise ValueError(f"{compact_name} must have one entry per element ({numel}) for a full mask; got "
                             f"shape {tuple(compact.shape)}")
    else:
        key, threshold, block = ints
        check_hash_params(f"{name}.", key=key, threshold=threshold, block=block)
        check_block_offsets(f"{name}.block_offsets", index, numel, block, compact.numel(), values=values, key=key,
                            threshold=threshold)
    if encoding != HASH and tuple(ints) != NO_INTS:
        raise ValueError(f"{name}: the mask ints of a {NAMES[encoding]} mask must be {NO_INTS}; got {tuple(ints)}")
    if encoding != BLOCK16:
        _checks.tensor(f"{name}.offsets", offsets, dtypes=(torch.uint16,), ndim=1)
        if offsets.numel():
            raise ValueError(f"{name}: a {NAMES[encoding]} mask has no offsets (an empty uint16 tensor); "
                             f"got {offsets.numel()}")
