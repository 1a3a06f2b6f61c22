"""The table of seat ops: name -> qualified torch op, reference, kernels per backend.

Filled by the op modules as they are imported; read by backend selection, by
`python -m seat.info` and by the tests (opcheck runs on every entry).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import _backend


@dataclasses.dataclass(frozen=True)
class OpEntry:
    name: str  # python name: seat.ops.<name>
    qualname: str  # torch op: torch.ops.seat.<name>
    reference: Callable
    kernels: dict[str, Callable]  # backend -> kernel with the reference's signature

    def run(self, device: torch.device, *args, **kwargs):
        """Run the selected implementation (inputs already validated)."""
        _, kernel = _backend.select(self.name, self.kernels, device)
        return (kernel or self.reference)(*args, **kwargs)

    def backends(self) -> tuple[str, ...]:
        return ("reference", *self.kernels)


OPS: dict[str, OpEntry] = {}


def register(name: str, reference: Callable, kernels: dict[str, Callable]) -> OpEntry:
    entry = OpEntry(name=name, qualname=f"seat::{name}", reference=reference, kernels=dict(kernels))
    OPS[name] = entry
    return entry
