"""The one registry of mask encodings, and the conversions every caller goes through.

ENCODINGS maps each encoding's name (what SeatConfig.mask_encoding, build_masks and the
memory model take) to its class; ``as_mask`` turns what a user may pass into a Mask,
``encode`` / ``encode_chosen`` store chosen entries in an encoding, ``from_state_dict`` /
``from_spec`` rebuild a mask from a checkpoint entry or a delta's spec.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._constants import CHOSEN_ENCODINGS, INTERNAL_ENCODINGS, MASK_ENCODINGS
from ..ops import _checks
from .encodings import Block16Mask, IndexMask, Mask
from .full import FullMask
from .implicit import ImplicitMask
from .select import _numel_of, dense_to_indices

__all__ = ["ENCODINGS", "ALL_ENCODINGS", "STATE_KEYS", "as_mask", "encode", "encode_chosen", "from_state_dict",
           "from_spec"]

ENCODINGS: dict[str, type] = {cls.encoding: cls for cls in (IndexMask, ImplicitMask, Block16Mask)}
assert tuple(ENCODINGS) == MASK_ENCODINGS  # the names config and the memory model validate against
# every encoding a Mask may have: the user-selectable ones and seat's internal ones
# (FullMask, for compact parameters trained whole); what masks are accepted and restored as
ALL_ENCODINGS: dict[str, type] = {**ENCODINGS, FullMask.encoding: FullMask}
assert tuple(ALL_ENCODINGS) == MASK_ENCODINGS + INTERNAL_ENCODINGS


STATE_KEYS = tuple(k for cls in ALL_ENCODINGS.values() for k in cls.state_keys)
# the encodings that store chosen entries (magnitude, importance, given indices)
CHOSEN = tuple(name for name, cls in ENCODINGS.items() if cls.holds_chosen_entries)
assert CHOSEN == CHOSEN_ENCODINGS  # what SeatConfig validates against without importing torch


def _encoding_class(encoding: str) -> type:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(map(repr, ENCODINGS))}; got {encoding!r}")
    return ENCODINGS[encoding]


def encode(idx: Tensor, numel: int, encoding: str):
    """int32 indices -> the mask in an explicit ``encoding``, in the form build_masks
    returns ("int32": the indices themselves; "block16": a Block16Mask)."""
    check_chosen_encoding(encoding)
    return ENCODINGS[encoding].from_indices(idx, numel).unwrap()


def check_chosen_encoding(encoding: str) -> None:
    """``encoding`` can store chosen entries, or a ValueError saying which can."""
    if not _encoding_class(encoding).holds_chosen_entries:
        raise ValueError(f"encoding must be {' or '.join(map(repr, CHOSEN))} for chosen entries (magnitude, "
                         f"importance, given indices); got {encoding!r}, a random mask defined by a hash")


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
    if isinstance(mask, tuple(ALL_ENCODINGS.values())):
        if mask.numel != numel:
            raise ValueError(f"{name} ({type(mask).__name__}) covers {mask.numel} elements; its tensor has {numel}")
        return mask
    raise TypeError(f"{name} must be int32 flat indices, a bool mask or a seat.masks mask (IndexMask, Block16Mask, "
                    f"ImplicitMask, FullMask); got {type(mask).__name__}")


def from_state_dict(state: dict, numel: int) -> Mask | None:
    """The mask an optimizer state entry holds (the keys of some encoding's
    state_dict()), or None when it holds none."""
    for cls in sorted(ALL_ENCODINGS.values(), key=lambda c: -len(c.state_keys)):  # the most specific key set first
        if all(k in state for k in cls.state_keys):
            return cls.from_state_dict(state, numel)
    return None


def from_spec(spec: dict, device=None) -> Mask:
    """A mask from its spec() (the masks that have one)."""
    cls = ALL_ENCODINGS.get(spec.get("encoding")) if isinstance(spec, dict) else None
    if not hasattr(cls, "from_spec"):
        raise ValueError(f"a mask spec must be a dict from Mask.spec() (an encoding defined by a spec: "
                         f"{', '.join(n for n, c in ALL_ENCODINGS.items() if hasattr(c, 'from_spec'))}); got {spec!r}")
    return cls.from_spec(spec, device=device)
