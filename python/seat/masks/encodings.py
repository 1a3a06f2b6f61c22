"""Mask encodings: how a mask's entries are stored. One class per encoding, one registry.

Every encoding holds the same thing, the sorted flat positions of a weight's trained
entries, and numbers them the same way (compact slot j = the j-th entry), so the
optimizer state and the training trajectory do not depend on the encoding; only the
mask's own memory does:

  IndexMask     "int32"     sorted unique int32 indices: 4 bytes per entry. A bare int32
                            tensor is this encoding wherever a mask is taken.
  Block16Mask   "block16"   any explicit mask in 2 bytes per entry: uint16 offsets within
                            blocks of 65536 elements + an int32 per block.
  ImplicitMask  "implicit"  a random mask that stores no indices: element e is trained iff
                            a counter-based hash of (seed, param_id, e) falls below the
                            density; 4 bytes per block of 4096 elements. Its size is
                            Binomial(numel, density), not exactly ``nnz_for``.

The ``Mask`` protocol is what the rest of seat uses (optim, patching, delta, memory):
``numel``, ``nnz``, ``nbytes``, ``device``, ``indices()``, ``to(device)``,
``op_args()`` (the arguments of the seat.ops sparse-update ops), ``chunk(start, stop)``
(entries [start, stop) as a mask of the same tensor, for stepping state in pieces),
``state_dict()`` / ``from_state_dict()`` (what an optimizer checkpoint holds), ``spec()``
(a JSON-able definition, for masks defined by a few numbers) and ``==``. ``as_mask``
turns anything a user may pass (int32 indices, a bool mask, a Mask) into a Mask; no
module outside seat.masks looks at the encoding.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._constants import MASK_ENCODINGS
from ..ops import _checks, _encodings
from ..ops._encodings import MaskArgs
from .select import _check_density, _check_numel, _check_seed, _numel_of, dense_to_indices

__all__ = ["Mask", "IndexMask", "Block16Mask", "ImplicitMask", "ENCODINGS", "as_mask", "encode", "encode_chosen",
           "from_state_dict",
           "from_spec", "param_id_for", "implicit_random_mask"]


@runtime_checkable
class Mask(Protocol):
    """What every encoding provides (see the module docstring)."""

    encoding: str
    numel: int

    @property
    def nnz(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    def indices(self) -> Tensor: ...
    def to(self, device) -> "Mask": ...
    def op_args(self) -> MaskArgs: ...
    def chunk(self, start: int, stop: int) -> "Mask": ...
    def state_dict(self) -> dict: ...
    def spec(self) -> dict | None: ...


class _MaskBase:
    """The operations every encoding shares, written once over op_args()."""

    encoding: str
    numel: int
    __hash__ = None  # value objects holding tensors: compare, do not hash

    def gather_(self, out: Tensor, dense: Tensor) -> Tensor:
        """out += dense.view(-1)[entries] (seat.ops.masked_gather_)."""
        from .. import ops

        self._check_numel("dense", dense)
        return ops.masked_gather_(out, dense, self)

    def swap_(self, param: Tensor, values: Tensor) -> None:
        """Exchange param.view(-1)[entries] and values, bit-exact (seat.ops.masked_swap_)."""
        from .. import ops

        self._check_numel("param", param)
        ops.masked_swap_(param, self, values)

    def spec(self) -> dict | None:
        """A JSON-able definition of the mask, or None when only its entries define it."""
        return None

    def unwrap(self):
        """The form build_masks returns for this encoding (the mask itself)."""
        return self

    def _check_numel(self, name: str, t) -> None:
        if isinstance(t, Tensor) and t.numel() != self.numel:
            raise ValueError(f"{name} has {t.numel()} elements; this mask was built for {self.numel}")


# ----------------------------------------------------------------------------- int32


class IndexMask(_MaskBase):
    """Sorted unique int32 flat indices (4 bytes per entry).

    Args:
        idx: (nnz,) int32, sorted, unique, in [0, numel) (validated).
        numel_or_tensor: elements of the weight (or the weight).
    """

    encoding = "int32"
    holds_chosen_entries = True  # can it store any given set of entries

    def __init__(self, idx: Tensor, numel_or_tensor, *, _checked: bool = False):
        self.numel = _numel_of("numel_or_tensor", numel_or_tensor)
        if not _checked:
            _checks.index_tensor("idx", idx, self.numel)
            _checks.index_values("idx", idx, self.numel)
        self.idx = idx
        self._no_offsets = idx.new_empty(0, dtype=torch.uint16)

    @classmethod
    def from_indices(cls, idx: Tensor, numel: int) -> "IndexMask":
        return cls(idx, numel)

    @property
    def nnz(self) -> int:
        return self.idx.numel()

    @property
    def nbytes(self) -> int:
        return self.idx.numel() * self.idx.element_size()

    @property
    def device(self) -> torch.device:
        return self.idx.device

    def indices(self) -> Tensor:
        return self.idx

    def to(self, device) -> "IndexMask":
        return IndexMask(self.idx.to(device), self.numel, _checked=True)

    def op_args(self) -> MaskArgs:
        return MaskArgs(_encodings.INDEX, self.idx, self._no_offsets, _encodings.NO_INTS)

    def chunk(self, start: int, stop: int) -> "IndexMask":
        return IndexMask(self.idx[start:stop], self.numel, _checked=True)

    def state_dict(self) -> dict:
        return {"idx": self.idx}

    @classmethod
    def from_state_dict(cls, state: dict, numel: int) -> "IndexMask":
        return cls(state["idx"], numel)

    def unwrap(self) -> Tensor:
        """The bare int32 indices: what build_masks returns for "int32"."""
        return self.idx

    def __eq__(self, other) -> bool:
        if not isinstance(other, IndexMask):
            return NotImplemented
        return self.numel == other.numel and torch.equal(self.idx, other.idx.to(self.idx.device))

    def __repr__(self) -> str:
        return f"IndexMask(numel={self.numel}, nnz={self.nnz}, device={self.device})"


# ----------------------------------------------------------------------------- block16


class Block16Mask(_MaskBase):
    """An explicit mask (any sorted unique entries: magnitude, importance, random) in 2
    bytes per entry: the weight is cut into blocks of 65536 elements, and

        block_starts  (ceil(numel / 65536) + 1,) int32: entries before each block
        offsets       (nnz,) uint16: each entry's index within its block

    Args:
        idx: (nnz,) sorted unique int32 flat indices (any seat.masks mask).
        numel_or_tensor: elements of the weight (or the weight).
    """

    encoding = "block16"
    holds_chosen_entries = True  # can it store any given set of entries

    def __init__(self, idx: Tensor, numel_or_tensor):
        self.numel = _numel_of("numel_or_tensor", numel_or_tensor)
        if not isinstance(idx, Tensor):
            raise TypeError(f"idx must be a torch.Tensor of int32 indices; got {type(idx).__name__}")
        self.block_starts, self.offsets = _encodings.encode_block16(idx, self.numel)

    @classmethod
    def from_indices(cls, idx: Tensor, numel: int) -> "Block16Mask":
        return cls(idx, numel)

    @classmethod
    def from_encoding(cls, numel: int, block_starts: Tensor, offsets: Tensor, *,
                      _checked: bool = False) -> "Block16Mask":
        """Wrap an encoding (validated: seat.ops._encodings.check_block16)."""
        n = _check_numel("numel", numel)
        if not _checked:
            _encodings.check_block16("", block_starts, offsets, n, values=True)
        mask = cls.__new__(cls)
        mask.numel, mask.block_starts, mask.offsets = n, block_starts, offsets
        return mask

    @property
    def nnz(self) -> int:
        return self.offsets.numel()

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def nbytes(self) -> int:
        """Bytes the mask holds: 2 per entry + 4 per block of 65536 elements."""
        return self.offsets.numel() * 2 + self.block_starts.numel() * 4

    def indices(self) -> Tensor:
        return _encodings.decode_block16(self.block_starts, self.offsets)

    def to(self, device) -> "Block16Mask":
        return Block16Mask.from_encoding(self.numel, self.block_starts.to(device), self.offsets.to(device),
                                         _checked=True)

    def op_args(self) -> MaskArgs:
        return MaskArgs(_encodings.BLOCK16, self.block_starts, self.offsets, _encodings.NO_INTS)

    def chunk(self, start: int, stop: int) -> "Block16Mask":
        """Entries [start, stop): the same offsets, block starts shifted by `start` and
        clamped to [0, stop - start] (a block's entries outside the chunk drop out)."""
        starts = (self.block_starts - start).clamp_(0, stop - start)
        piece = Block16Mask.from_encoding(self.numel, starts, self.offsets[start:stop], _checked=True)
        # a piece of a valid mask is valid: recorded as checked, so that the ops do not
        # decode it again (int64 scratch of ~28 bytes per entry, next to an 8-bit step's
        # fp32 moments) each time a step cuts the same mask
        _encodings.record_block16_piece(self.block_starts, self.offsets, piece.block_starts, piece.offsets,
                                        self.numel)
        return piece

    def state_dict(self) -> dict:
        return {"block_starts": self.block_starts, "offsets": self.offsets}

    @classmethod
    def from_state_dict(cls, state: dict, numel: int) -> "Block16Mask":
        return cls.from_encoding(numel, state["block_starts"], state["offsets"])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Block16Mask):
            return NotImplemented
        return (self.numel == other.numel and torch.equal(self.block_starts, other.block_starts.to(self.device))
                and torch.equal(self.offsets.view(torch.int16), other.offsets.to(self.device).view(torch.int16)))

    def __repr__(self) -> str:
        return f"Block16Mask(numel={self.numel}, nnz={self.nnz}, device={self.device})"


# ----------------------------------------------------------------------------- implicit


def param_id_for(name: str) -> int:
    """A stable 32-bit parameter id for the implicit mask of parameter ``name``
    (SHA-256 of the name: the same in every process)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (the parameter name); got {type(name).__name__}")
    digest = hashlib.sha256(f"seat.masks.param_id:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big")


class ImplicitMask(_MaskBase):
    """A random mask stored as its seed: element e of the weight is in it iff
    mix32(key ^ mix32(e)) < round(density * 2**32), key from (seed, param_id) (see
    seat.ops._encodings). Each element is in independently with probability
    ``density``, so ``nnz`` is Binomial(numel, density).

    Args:
        numel_or_tensor: the number of elements of the weight, or the weight.
        density: fraction of entries in the mask, in [0, 1] (0: empty, 1: every entry).
        seed: an int64 seed; param_id: an int in [0, 2**32) telling the parameters of one
            seed apart (``param_id_for(name)``).
        block: elements per block of the prefix count, a power of two in [256, 65536].
        device: where block_offsets live (the weight's device; default CPU).

    Attributes:
        block_offsets: (ceil(numel / block) + 1,) int32: members before each block; the
            only memory the mask holds (4 bytes per block).
        nnz: the number of members (block_offsets[-1]).
        threshold: round(density * 2**32).
    """

    encoding = "implicit"
    holds_chosen_entries = False  # can it store any given set of entries

    def __init__(self, numel_or_tensor, density: float, *, seed: int, param_id: int = 0,
                 block: int = _encodings.DEFAULT_HASH_BLOCK, device=None, _block_offsets: Tensor | None = None):
        from ..ops import implicit_block_offsets_

        self.numel = _numel_of("numel_or_tensor", numel_or_tensor)
        self.density = _check_density(density)
        self.seed = _check_seed("seed", seed)
        if self.seed >= 2**63:
            raise ValueError(f"seed must be in [-2**63, 2**63) for an implicit mask (an int64); got {seed}")
        for name, value in (("param_id", param_id), ("block", block)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int; got {type(value).__name__}")
        self.param_id, self.block = int(param_id), int(block)
        self.threshold = _encodings.threshold_for(self.density)
        _encodings.check_hash_params("", seed=self.seed, param_id=self.param_id, threshold=self.threshold,
                                     block=self.block)
        self.key = _encodings.mask_key(self.seed, self.param_id)
        if _block_offsets is None:
            if device is None and isinstance(numel_or_tensor, Tensor):
                device = numel_or_tensor.device
            _block_offsets = torch.empty(_encodings.n_blocks(self.numel, self.block) + 1, dtype=torch.int32,
                                         device=device)
            implicit_block_offsets_(_block_offsets, numel=self.numel, seed=self.seed, param_id=self.param_id,
                                    threshold=self.threshold, block=self.block)
        self.block_offsets = _block_offsets
        self.nnz = int(self.block_offsets[-1])
        self._no_offsets = self.block_offsets.new_empty(0, dtype=torch.uint16)

    @classmethod
    def from_indices(cls, idx: Tensor, numel: int):
        raise ValueError("encoding 'implicit' is a random mask defined by a hash (ImplicitMask(numel, density, "
                         "seed=...)); chosen entries (magnitude, importance, given indices) need 'int32' or "
                         "'block16'")

    @property
    def device(self) -> torch.device:
        return self.block_offsets.device

    @property
    def nbytes(self) -> int:
        """Bytes the mask holds (the block offsets)."""
        return self.block_offsets.numel() * self.block_offsets.element_size()

    def indices(self) -> Tensor:
        return _encodings.hash_indices(self.numel, self.key, self.threshold, self.device)

    def to(self, device) -> "ImplicitMask":
        return ImplicitMask(self.numel, self.density, seed=self.seed, param_id=self.param_id, block=self.block,
                            _block_offsets=self.block_offsets.to(device))

    def op_args(self) -> MaskArgs:
        return MaskArgs(_encodings.HASH, self.block_offsets, self._no_offsets, (self.key, self.threshold, self.block))

    def chunk(self, start: int, stop: int) -> IndexMask:
        """Entries [start, stop) as int32 indices (4 bytes per entry of the chunk,
        transient): a hash mask numbers members from block starts, so a piece of it is
        not a hash mask. Only the blocks holding those entries are hashed, an eighth of
        the chunk's entries in elements at a time: the hash's int64 scratch (~33 bytes per
        element hashed) stays under 5 bytes per entry of the chunk whatever the density
        (below an 8-bit step's own transients), and the indices are written into their
        output directly. Hashing in torch ops costs time: every element of the blocks is
        hashed, in ~8 / density pieces."""
        n = stop - start
        out = torch.empty(max(n, 0), dtype=torch.int32, device=self.device)
        if n <= 0:
            return IndexMask(out, self.numel, _checked=True)
        first = int(torch.searchsorted(self.block_offsets, torch.tensor(start, dtype=torch.int32,
                                                                        device=self.device), right=True)) - 1
        last = int(torch.searchsorted(self.block_offsets, torch.tensor(stop, dtype=torch.int32,
                                                                       device=self.device)))
        lo, hi = max(first, 0) * self.block, min(last * self.block, self.numel)
        skip = start - int(self.block_offsets[max(first, 0)])  # members of the first block before the chunk
        piece, filled = max(self.block, n // 8 // self.block * self.block), 0
        for s in range(lo, hi, piece):
            hit = _encodings.members(self.key, s, min(hi, s + piece), self.threshold, self.device).nonzero().squeeze(1)
            dropped = min(skip, hit.numel())
            skip -= dropped
            take = min(n - filled, hit.numel() - dropped)
            out[filled:filled + take] = hit[dropped:dropped + take] + s
            filled += take
            del hit  # before the next piece's scratch exists
            if filled == n:
                break
        return IndexMask(out, self.numel, _checked=True)

    def state_dict(self) -> dict:
        return {"implicit_mask": self.spec(), "block_offsets": self.block_offsets}

    @classmethod
    def from_state_dict(cls, state: dict, numel: int) -> "ImplicitMask":
        return cls.from_spec(state["implicit_mask"], device=state["block_offsets"].device)

    def spec(self) -> dict:
        """What defines the mask (JSON-able): rebuild it with ImplicitMask.from_spec."""
        return {"encoding": "implicit", "numel": self.numel, "density": self.density, "seed": self.seed,
                "param_id": self.param_id, "block": self.block}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "ImplicitMask":
        if not isinstance(spec, dict) or spec.get("encoding") != "implicit":
            raise ValueError(f"spec must be a dict with encoding 'implicit' (from ImplicitMask.spec()); got {spec!r}")
        return cls(spec["numel"], spec["density"], seed=spec["seed"], param_id=spec["param_id"],
                   block=spec["block"], device=device)

    def __eq__(self, other) -> bool:
        if not isinstance(other, ImplicitMask):
            return NotImplemented
        return (self.numel, self.threshold, self.seed, self.param_id, self.block) == (
            other.numel, other.threshold, other.seed, other.param_id, other.block)

    def __repr__(self) -> str:
        return (f"ImplicitMask(numel={self.numel}, density={self.density}, seed={self.seed}, "
                f"param_id={self.param_id}, block={self.block}, nnz={self.nnz}, device={self.device})")


def implicit_random_mask(numel_or_tensor, density: float, *, seed: int, param_id: int = 0,
                         block: int = _encodings.DEFAULT_HASH_BLOCK, device=None) -> ImplicitMask:
    """An ImplicitMask (see its docstring): a random mask that stores no indices."""
    return ImplicitMask(numel_or_tensor, density, seed=seed, param_id=param_id, block=block, device=device)


# ----------------------------------------------------------------------------- the registry

ENCODINGS: dict[str, type] = {cls.encoding: cls for cls in (IndexMask, ImplicitMask, Block16Mask)}
assert tuple(ENCODINGS) == MASK_ENCODINGS  # the names config and the memory model validate against


def _encoding_class(encoding: str) -> type:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(map(repr, ENCODINGS))}; got {encoding!r}")
    return ENCODINGS[encoding]


def encode(idx: Tensor, numel: int, encoding: str):
    """int32 indices -> the mask in an explicit ``encoding``, in the form build_masks
    returns ("int32": the indices themselves; "block16": a Block16Mask)."""
    return _encoding_class(encoding).from_indices(idx, numel).unwrap()


def encode_chosen(idx: Tensor, numel: int, encoding: str):
    """Chosen entries (given indices) in ``encoding`` when it can hold them, else as
    int32 indices (an implicit mask is defined by its hash, not by a list of entries)."""
    explicit = encoding if _encoding_class(encoding).holds_chosen_entries else "int32"
    return encode(idx, numel, explicit)


def as_mask(mask, numel_or_tensor, name: str = "mask") -> Mask:
    """A Mask of a tensor of ``numel`` elements from what a user may pass: int32 flat
    indices (sorted, unique; validated), a bool mask of any shape with numel elements, or
    a Mask (its numel checked). Errors name the argument (`name`)."""
    numel = _numel_of("numel_or_tensor", numel_or_tensor)
    if isinstance(mask, Tensor):
        if mask.dtype == torch.bool:
            if mask.numel() != numel:
                raise ValueError(f"{name} is a bool mask of {mask.numel()} elements (shape {tuple(mask.shape)}); "
                                 f"its tensor has {numel}")
            mask = dense_to_indices(mask)
        _checks.index_tensor(name, mask, numel)
        _checks.index_values(name, mask, numel)
        return IndexMask(mask, numel, _checked=True)
    if isinstance(mask, tuple(ENCODINGS.values())):
        if mask.numel != numel:
            raise ValueError(f"{name} ({type(mask).__name__}) covers {mask.numel} elements; its tensor has {numel}")
        return mask
    raise TypeError(f"{name} must be int32 flat indices, a bool mask or a seat.masks mask (IndexMask, Block16Mask, "
                    f"ImplicitMask); got {type(mask).__name__}")


def from_state_dict(state: dict, numel: int) -> Mask | None:
    """The mask an optimizer state entry holds (the keys of some encoding's
    state_dict()), or None when it holds none."""
    for cls in (ImplicitMask, Block16Mask, IndexMask):  # the most specific key set first
        if all(k in state for k in _STATE_KEYS[cls]):
            return cls.from_state_dict(state, numel)
    return None


# the optimizer-state keys of each encoding's state_dict() (fixed: checkpoints hold them)
_STATE_KEYS = {IndexMask: ("idx",), Block16Mask: ("block_starts", "offsets"),
               ImplicitMask: ("implicit_mask", "block_offsets")}
STATE_KEYS = tuple(k for keys in _STATE_KEYS.values() for k in keys)


def from_spec(spec: dict, device=None) -> Mask:
    """A mask from its spec() (the masks that have one)."""
    cls = ENCODINGS.get(spec.get("encoding")) if isinstance(spec, dict) else None
    if not hasattr(cls, "from_spec"):
        raise ValueError(f"a mask spec must be a dict from Mask.spec() (an encoding defined by a spec: "
                         f"{', '.join(n for n, c in ENCODINGS.items() if hasattr(c, 'from_spec'))}); got {spec!r}")
    return cls.from_spec(spec, device=device)
