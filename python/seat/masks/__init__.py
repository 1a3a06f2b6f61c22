"""Sparse training masks: which entries of each weight SEAT trains, and how they are stored.

Two independent choices, each in its own module:

  selection (select.py)     which entries: random_mask, magnitude_mask, ImportanceScores;
                            always sorted unique int32 flat indices into ``W.view(-1)``
                            (``nnz_for`` fixes their number for a density)
  encoding (encodings.py,    how they are stored: IndexMask "int32" (4 bytes per entry; a
    implicit.py)            bare int32 tensor is this encoding), Block16Mask "block16" (2
                            bytes per entry), ImplicitMask "implicit" (a seeded random mask
                            that stores no indices); one registry, ENCODINGS (registry.py);
                            internally also FullMask "full" (every entry of a compact
                            parameter, no index; ALL_ENCODINGS)

``build_mask`` draws one weight's mask in an encoding (what ``build_masks`` and
``seat.patch`` call); every op, SparseAdamW, deltas and the memory model take masks in any
encoding and give the same entries, compact slots and trajectory.

Errors name the argument and say what to do: TypeError for a wrong type or dtype,
ValueError for a wrong value.
"""
from __future__ import annotations

import torch

from .encodings import Block16Mask, IndexMask, Mask
from .full import FullMask
from .implicit import ImplicitMask, implicit_random_mask, param_id_for
from .registry import ALL_ENCODINGS, ENCODINGS, STATE_KEYS, as_mask, encode, encode_chosen, from_spec, from_state_dict
from .select import (IMPORTANCE_KINDS, MASK_KINDS, ImportanceScores, NamedParams, _check_density, _check_seed,
                     _named_list, dense_to_indices, indices_to_dense, magnitude_mask, nnz_for, param_seed,
                     random_mask)

__all__ = [
    "nnz_for", "random_mask", "magnitude_mask", "ImportanceScores", "param_seed", "build_mask", "build_masks",
    "dense_to_indices", "indices_to_dense", "MASK_KINDS", "IMPORTANCE_KINDS", "ENCODINGS", "ALL_ENCODINGS", "Mask",
    "IndexMask", "FullMask",
    "ImplicitMask", "Block16Mask", "implicit_random_mask", "param_id_for", "as_mask", "encode", "encode_chosen", "encode_mask",
    "from_spec", "from_state_dict", "STATE_KEYS", "mask_nnz", "mask_indices", "mask_gather_", "mask_swap_",
]

encode_mask = encode  # the name seat 0.x used


def _check_kind(kind: str, encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(map(repr, ENCODINGS))}; got {encoding!r}")
    if kind == "importance":
        raise ValueError("kind='importance' needs calibration gradients: use "
                         "seat.masks.ImportanceScores(named_params, kind='grad' or 'wgrad'), call .update() after "
                         "each calibration backward, then .masks(density)")
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, MASK_KINDS))} (importance masks come from "
                         f"ImportanceScores); got {kind!r}")
    if not ENCODINGS[encoding].holds_chosen_entries and kind != "random":
        raise ValueError(f"encoding='implicit' is a random mask defined by a hash; kind={kind!r} masks are "
                         "chosen entries and need encoding='int32' or 'block16'")


def build_mask(name: str, weight: torch.Tensor, density: float, *, kind: str = "random", seed: int = 0,
               encoding: str = "int32", device=None):
    """The mask of one named weight: ``kind`` "random" (``random_mask`` seeded with
    ``param_seed(seed, name)``; with encoding "implicit", ``ImplicitMask(weight, density,
    seed=seed, param_id=param_id_for(name))``) or "magnitude" (``magnitude_mask``), in
    ``encoding``, on ``device`` (default: the weight's). Returns int32 indices for
    "int32", else the encoding's mask object (what build_masks returns per name)."""
    _check_kind(kind, encoding)
    d, s = _check_density(density), _check_seed("seed", seed)
    device = weight.device if device is None else torch.device(device)
    if not ENCODINGS[encoding].holds_chosen_entries:  # a random mask defined by a hash of the name
        return ENCODINGS[encoding](weight, d, seed=s, param_id=param_id_for(name), device=device)
    if kind == "random":
        idx = random_mask(weight.numel(), d, seed=param_seed(s, name))
    else:
        idx = magnitude_mask(weight, d)
    return encode(idx.to(device), weight.numel(), encoding)


def build_masks(named_params: NamedParams, density: float, *, kind: str = "random", seed: int = 0,
                device=None, encoding: str = "int32") -> dict:
    """One mask per named parameter (``build_mask`` each).

    Args:
        named_params: dict of name -> tensor, or an iterable of (name, tensor) pairs
            (e.g. ``model.named_parameters()``); floating-point tensors.
        density: fraction of each tensor's entries in its mask, in [0, 1].
        kind: ``"random"`` (``random_mask`` seeded with ``param_seed(seed, name)``, so a
            mask depends on the name, not on the order or the other parameters) or
            ``"magnitude"`` (``magnitude_mask``). Importance masks need calibration
            gradients, so they come from ``ImportanceScores(...).masks(density)`` instead.
        seed: global seed of the random masks.
        device: where to put the masks (default: each parameter's own device).
        encoding: ``"int32"`` (default): index tensors. ``"implicit"`` (random masks only):
            an ``ImplicitMask`` each, no index array (their sizes are binomial, not exactly
            nnz_for). ``"block16"``: the same entries as "int32" in a ``Block16Mask``.

    Returns:
        dict name -> 1-D ``torch.int32`` sorted unique flat indices, ``(nnz_for(numel,
        density),)`` each (or the encoding's mask object), in the order of ``named_params``.
    """
    _check_kind(kind, encoding)
    items = _named_list("named_params", named_params)
    return {name: build_mask(name, p, density, kind=kind, seed=seed, encoding=encoding, device=device)
            for name, p in items}


# ----------------------------------------------------------------------------- any form


def mask_nnz(mask) -> int:
    """Entries of a mask in any form (int32 indices or a Mask)."""
    return mask.numel() if isinstance(mask, torch.Tensor) else mask.nnz


def mask_indices(mask) -> torch.Tensor:
    """A mask in any form as int32 indices (materialized for the encoded ones)."""
    return mask if isinstance(mask, torch.Tensor) else mask.indices()


def mask_gather_(out: torch.Tensor, dense: torch.Tensor, mask) -> torch.Tensor:
    """out += dense.view(-1)[mask's entries] for a mask in any form."""
    from .. import ops

    return ops.masked_gather_(out, dense, mask)


def mask_swap_(param: torch.Tensor, mask, values: torch.Tensor) -> None:
    """Exchange param.view(-1)[mask's entries] and values for a mask in any form."""
    from .. import ops

    ops.masked_swap_(param, mask, values)
