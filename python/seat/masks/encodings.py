"""Mask encodings: how a mask's entries are stored, one class per encoding.

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
``slots_in(lo, hi)`` / ``positions_in(lo, hi)`` (the slots, and the positions relative to
lo, of the entries in a position range: for working on a weight in pieces),
``state_dict()`` / ``from_state_dict()`` (what an optimizer checkpoint holds, under the
class's ``state_keys``), ``spec()`` (a JSON-able definition, for masks defined by a few
numbers) and ``==``. This module holds the protocol and the explicit encodings;
implicit.py the hash-defined one; registry.py the one table of encodings and ``as_mask``,
which turns anything a user may pass (int32 indices, a bool mask, a Mask) into a Mask. No
module outside seat.masks looks at the encoding.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .._constants import BLOCK16_SIZE
from ..ops import _checks, _encodings
from ..ops._encodings import MaskArgs
from .select import _check_numel, _numel_of

__all__ = ["Mask", "IndexMask", "Block16Mask"]


@runtime_checkable
class Mask(Protocol):
    """What every encoding provides (see the module docstring)."""

    encoding: str
    holds_chosen_entries: bool  # can it store any given set of entries (not only its own draw)
    state_keys: tuple[str, ...]  # the optimizer-state keys of state_dict() (fixed: checkpoints hold them)
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
    def slots_in(self, lo: int, hi: int) -> tuple[int, int]: ...
    def positions_in(self, lo: int, hi: int) -> Tensor: ...
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

    def chunk(self, start: int, stop: int):
        """Entries [start, stop) (0 <= start <= stop <= nnz) as a mask of the same tensor
        whose slots are 0 .. stop - start - 1: for stepping state one piece at a time."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.nnz):
            raise ValueError(f"chunk(start, stop) needs ints with 0 <= start <= stop <= nnz = {self.nnz}; "
                             f"got ({start!r}, {stop!r})")
        return self._chunk(start, stop)

    def slots_in(self, lo: int, hi: int) -> tuple[int, int]:
        """(s0, s1): the entries at positions [lo, hi) (0 <= lo <= hi <= numel) are slots
        s0 .. s1 - 1 (entries are numbered in position order)."""
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi <= self.numel):
            raise ValueError(f"slots_in(lo, hi) needs ints with 0 <= lo <= hi <= numel = {self.numel}; "
                             f"got ({lo!r}, {hi!r})")
        return self._slot_at(lo), self._slot_at(hi)

    def positions_in(self, lo: int, hi: int) -> Tensor:
        """int32 (s1 - s0,): the positions of the entries in [lo, hi), minus lo, sorted (the
        entries of a piece [lo, hi) of the tensor as an int32 mask of that piece; their
        slots are slots_in(lo, hi)). A new tensor, 4 bytes per entry of the piece."""
        s0, s1 = self.slots_in(lo, hi)
        return self._chunk(s0, s1).indices() - lo

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
    holds_chosen_entries = True
    state_keys = ("idx",)

    def __init__(self, idx: Tensor, numel_or_tensor, *, _checked: bool = False):
        self.numel = _numel_of("numel_or_tensor", numel_or_tensor)
        if not _checked:
            _checks.index_tensor("idx", idx, self.numel)
            _checks.index_values("idx", idx, self.numel)
        self.idx = idx
        self._no_offsets = _encodings.no_offsets(idx.device)

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

    def _chunk(self, start: int, stop: int) -> "IndexMask":
        return IndexMask(self.idx[start:stop], self.numel, _checked=True)

    def _slot_at(self, position: int) -> int:
        """Entries before `position` (a binary search of the sorted indices)."""
        p = torch.tensor([position], dtype=self.idx.dtype, device=self.device)
        return int(torch.searchsorted(self.idx, p))

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
    holds_chosen_entries = True
    state_keys = ("block_starts", "offsets")

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

    def _slot_at(self, position: int) -> int:
        """Entries before `position`: those of the blocks before its block, plus a binary
        search of its block's offsets (int32 copy of one block's entries)."""
        block = position // BLOCK16_SIZE
        if block >= self.block_starts.numel() - 1:
            return self.nnz
        a, b = (int(v) for v in self.block_starts[block:block + 2])
        within = self.offsets[a:b].to(torch.int32)
        p = torch.tensor([position - block * BLOCK16_SIZE], dtype=torch.int32, device=self.device)
        return a + int(torch.searchsorted(within, p))

    def _chunk(self, start: int, stop: int) -> "Block16Mask":
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
