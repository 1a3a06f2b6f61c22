"""ImplicitMask: a random mask stored as its seed (the "implicit" encoding).

Element e of a weight is trained iff a counter-based hash of (seed, param_id, e) falls
below density * 2**32 (seat.ops._encodings: HASH), so the mask stores no indices, only
an int32 prefix count per block of 4096 elements, and is rebuilt from its spec. Its size
is Binomial(numel, density), not exactly ``nnz_for``.
"""
from __future__ import annotations

import hashlib
import numbers

import torch
from torch import Tensor

from ..ops import _encodings
from ..ops._encodings import MaskArgs
from .encodings import IndexMask, _MaskBase
from .select import _check_density, _check_seed, _numel_of

__all__ = ["ImplicitMask", "implicit_random_mask", "param_id_for"]

HASH_PIECE = 1 << 18  # elements positions_in hashes at a time (its scratch: ~33 bytes each; seat.memory models it)


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
    holds_chosen_entries = False
    state_keys = ("implicit_mask", "block_offsets")

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
        self._no_offsets = _encodings.no_offsets(self.block_offsets.device)

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
        offsets = self.block_offsets.to(device)
        if offsets is not self.block_offsets:  # a copy of checked offsets needs no count of its own
            _encodings.record_block_offsets(offsets, self.numel, self.block, self.key, self.threshold)
        return ImplicitMask(self.numel, self.density, seed=self.seed, param_id=self.param_id, block=self.block,
                            _block_offsets=offsets)

    def op_args(self) -> MaskArgs:
        return MaskArgs(_encodings.HASH, self.block_offsets, self._no_offsets, (self.key, self.threshold, self.block))

    def _chunk(self, start: int, stop: int) -> IndexMask:
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

    def _slot_at(self, position: int) -> int:
        """Members before `position`: the prefix count of its block, plus the members of
        that block before it (at most `block` elements hashed)."""
        b = position // self.block
        before = int(self.block_offsets[min(b, self.block_offsets.numel() - 1)])
        if position % self.block:
            before += int(_encodings.members(self.key, b * self.block, position, self.threshold, self.device).sum())
        return before

    def positions_in(self, lo: int, hi: int) -> Tensor:
        """The members in [lo, hi) minus lo, sorted int32 (see Mask.positions_in): every
        element of the range is hashed, HASH_PIECE elements at a time (the hash's int64
        scratch, ~33 bytes per element hashed, stays near 9 MB), written into the output
        directly. Hashing in torch ops costs time (a pass over the range's elements)."""
        s0, s1 = self.slots_in(lo, hi)
        out = torch.empty(s1 - s0, dtype=torch.int32, device=self.device)
        filled = 0
        for s in range(lo, hi, HASH_PIECE):
            hit = _encodings.members(self.key, s, min(hi, s + HASH_PIECE), self.threshold, self.device)
            hit = hit.nonzero().squeeze(1)
            out[filled:filled + hit.numel()] = hit + (s - lo)
            filled += hit.numel()
            del hit  # before the next piece's scratch exists
        return out

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
