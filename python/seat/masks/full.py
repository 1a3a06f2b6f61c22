"""FullMask: every entry of a tensor, in order (the internal "full" encoding).

For a compact parameter trained whole: QSEAT's delta is a 1-D Parameter of nnz values,
one per entry of the 4-bit weight's mask, and every value is trained. SparseAdamW steps it
with a FullMask, so its lean modes (8-bit state, update in backward, bf16 gradients)
apply unchanged, and the mask holds no index (the lean modes' memory counts on none):
position = slot = j for j < numel. Not a SeatConfig mask_encoding (it selects nothing).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops import _encodings
from ..ops._encodings import MaskArgs
from .encodings import IndexMask, _MaskBase
from .select import _check_numel

__all__ = ["FullMask"]


class FullMask(_MaskBase):
    """Every entry of a tensor of ``numel`` elements: nnz = numel, 0 bytes.

    Args:
        numel_or_tensor: elements of the tensor (or the tensor; its device is the mask's
            unless ``device`` is given).
        device: where the mask's (empty) op arguments live: the tensor's device.
    """

    encoding = "full"
    holds_chosen_entries = False
    state_keys = ("full_mask",)

    def __init__(self, numel_or_tensor, *, device=None):
        if isinstance(numel_or_tensor, Tensor):
            device = numel_or_tensor.device if device is None else device
            numel_or_tensor = numel_or_tensor.numel()
        self.numel = _check_numel("numel_or_tensor", numel_or_tensor)
        self._device = torch.device("cpu" if device is None else device)
        self._index = _encodings.no_index(self._device)
        self._no_offsets = _encodings.no_offsets(self._device)

    @property
    def nnz(self) -> int:
        return self.numel

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def device(self) -> torch.device:
        return self._device

    def indices(self) -> Tensor:
        return torch.arange(self.numel, dtype=torch.int32, device=self._device)

    def to(self, device) -> "FullMask":
        return FullMask(self.numel, device=device)

    def op_args(self) -> MaskArgs:
        return MaskArgs(_encodings.FULL, self._index, self._no_offsets, _encodings.NO_INTS)

    def _chunk(self, start: int, stop: int) -> IndexMask:
        """Entries [start, stop) as int32 indices (transient, 4 bytes per entry of the
        chunk, as ImplicitMask's): a piece numbers its slots from 0, so it is not a full
        mask of the tensor."""
        return IndexMask(torch.arange(start, stop, dtype=torch.int32, device=self._device), self.numel,
                         _checked=True)

    def _slot_at(self, position: int) -> int:
        return position  # slot = position

    def positions_in(self, lo: int, hi: int) -> Tensor:
        s0, s1 = self.slots_in(lo, hi)
        return torch.arange(s1 - s0, dtype=torch.int32, device=self._device)

    def state_dict(self) -> dict:
        """{"full_mask": an empty int32 tensor on the mask's device}: a full mask is
        defined by its tensor's numel; the tensor only carries the device (as the
        optimizer state of the other encodings carries theirs)."""
        return {"full_mask": self._index}

    @classmethod
    def from_state_dict(cls, state: dict, numel: int) -> "FullMask":
        saved = state["full_mask"]
        if not isinstance(saved, Tensor) or saved.dtype != torch.int32 or saved.numel():
            raise ValueError(f"a full mask's state is an empty int32 tensor (FullMask.state_dict()); got {saved!r}")
        return cls(numel, device=saved.device)

    def spec(self) -> dict:
        return {"encoding": "full", "numel": self.numel}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "FullMask":
        if not isinstance(spec, dict) or spec.get("encoding") != "full" or set(spec) != {"encoding", "numel"}:
            raise ValueError(f"spec must be {{'encoding': 'full', 'numel': n}} (from FullMask.spec()); got {spec!r}")
        return cls(spec["numel"], device=device)

    def __eq__(self, other) -> bool:
        if not isinstance(other, FullMask):
            return NotImplemented
        return self.numel == other.numel

    def __repr__(self) -> str:
        return f"FullMask(numel={self.numel}, device={self.device})"
