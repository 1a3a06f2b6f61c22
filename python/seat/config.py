"""SeatConfig: every choice of a SEAT run, validated on construction.

Defaults follow ../shared/SEAT.md ("ours"): every linear weight in the decoder blocks,
density 0.05, a random mask fixed for the run, forward KL with weight 1 on every non-pad
position of the perturbed copy, temperature 1.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ._constants import CHOSEN_ENCODINGS, MASK_ENCODINGS, MASK_KINDS
KL_TOKENS = ("all", "answer")


@dataclasses.dataclass
class SeatConfig:
    """Configuration of seat.patch.

    density: fraction of each target matrix that trains, in (0, 1].
    mask: "random" (seeded, exact count) or "magnitude" (largest |w|); importance masks are
        built with seat.masks.ImportanceScores and passed to patch(model, masks=...).
    mask_encoding: how a mask is stored. "int32" (default): sorted int32 indices, exactly
        round(density * numel) entries per weight (4 bytes per trained entry).
        "implicit" (random masks only): the mask is a hash of (seed, weight name, entry)
        and stores no indices (4 bytes per 4096 entries of a weight); each entry is in it
        with probability density, so its size is binomial (within a fraction of a
        percent of density * numel for real weights). Optimizer state, deltas and the
        trajectory for the same entries are the same as with int32 indices.
        "block16" (any mask): the int32 mask's entries as uint16 offsets within blocks of
        65536 elements (2 bytes per trained entry), same entries and trajectory.
    seed: seeds the masks (per weight, from its name) and stochastic rounding.
    targets: "all-linear" (every nn.Linear / GPT-2 Conv1D weight and fused 3-D expert
        tensor of the decoder that a gradient reaches, except the output embedding) or
        fnmatch patterns over module names, and over parameter names for expert tensors
        (e.g. ["*.q_proj", "*.v_proj"], ["*.experts.*"]; see seat.targeting).
    kl_weight: lambda of L = CE + lambda * KL (0: the sparse mask alone; x~ is then not
        run and the loss's KL reads NaN). kl_tokens: "all" non-pad positions of x~
        or only its "answer" positions. temperature: of the KL's softmaxes. reverse_kl:
        KL(p_theta || p_base) instead of the forward KL(p_base || p_theta).
    master_weights / stochastic_rounding: how bf16/fp16 weights take their updates (see
        seat.optim.SparseAdamW). chunk_size: rows per chunk of the fused-linear loss
        (0: chosen by the kernel).
    """

    density: float = 0.05
    mask: str = "random"
    mask_encoding: str = "int32"
    seed: int = 0
    targets: str | Sequence[str] = "all-linear"
    kl_weight: float = 1.0
    kl_tokens: str = "all"
    temperature: float = 1.0
    reverse_kl: bool = False
    master_weights: bool = False
    stochastic_rounding: bool = False
    chunk_size: int = 0

    def __post_init__(self):
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a number in (0, 1]; got {type(self.density).__name__}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1] (the fraction of each weight that trains, e.g. 0.05); "
                             f"got {self.density}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}; got {self.mask!r} (importance masks: build them "
                             "with seat.masks.ImportanceScores and pass patch(model, masks=...))")
        if self.mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding must be one of {MASK_ENCODINGS}; got {self.mask_encoding!r}")
        if self.mask_encoding not in CHOSEN_ENCODINGS and self.mask != "random":
            raise ValueError(f"mask_encoding={self.mask_encoding!r} stores a random mask as its seed; "
                             f"mask={self.mask!r} chooses entries and needs mask_encoding in {CHOSEN_ENCODINGS}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0; got {self.seed!r}")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                self.targets = [self.targets]
        if not isinstance(self.targets, str):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"targets must be 'all-linear' or a non-empty list of module-name patterns; "
                                 f"got {self.targets!r}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0; got {self.kl_weight}")
        if self.kl_tokens not in KL_TOKENS:
            raise ValueError(f"kl_tokens must be one of {KL_TOKENS}; got {self.kl_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ValueError(f"chunk_size must be an int >= 0 (0: chosen by the kernel); got {self.chunk_size!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SeatConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SeatConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)
