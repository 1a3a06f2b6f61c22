"""Hostile inputs for the sparse-update ops (masked_gather_, masked_swap_, sparse_adamw_):
masks in every encoding, masks that lie, aliased arguments, non-finite values, and the
check the reliability tests make of every backend that runs on CPU:

    the same result, or the same clear error with every input unchanged.

A lying mask is edited through ``.numpy()`` after it was used once, so torch's version
counter does not see the write (the attack a validation cache keyed by identity and
version cannot see). Used by tests/reliability/test_fuzz_sparse_ops.py and
test_crash_sparse_ops.py.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from seat import ops
from seat.masks import Block16Mask, ImplicitMask
from seat.ops import _encodings
from seat.ops._encodings import MaskArgs

CPU_BACKENDS = ("reference", "cpu", "triton")  # triton runs through the interpreter (conftest)
ENCODINGS = ("index", "block16", "hash")
HASH_BLOCK = 256  # the smallest hash block: several blocks on small tensors
REPO = Path(__file__).resolve().parents[1]

# (rtol, atol) per dtype of a compared tensor (kernels vs the reference, same dtype).
TOLERANCE = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-4),
             torch.bfloat16: (1e-2, 1e-3)}


# ----------------------------------------------------------------------------- masks


def build_mask(encoding: str, numel: int, density: float, seed: int) -> MaskArgs:
    """A valid mask of a tensor of numel elements with about density * numel entries."""
    if encoding == "hash":  # counted by the reference: the mask does not depend on the backend under test
        with ops.use_backend("reference"):
            return ImplicitMask(numel, density, seed=seed, block=HASH_BLOCK).op_args()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=g)[:round(density * numel)].sort().values.to(torch.int32)
    if encoding == "index":
        return _encodings.as_mask_args("mask", idx)
    return Block16Mask(idx, numel).op_args()


def nnz_of(mask: MaskArgs) -> int:
    if mask.encoding == _encodings.INDEX:
        return mask.index.numel()
    if mask.encoding == _encodings.BLOCK16:
        return mask.offsets.numel()
    return int(mask.index[-1])


def clone_mask(mask: MaskArgs) -> MaskArgs:
    """The same mask in new tensors (a hash mask's copied block offsets are recounted on
    first use)."""
    return MaskArgs(mask.encoding, mask.index.clone(), mask.offsets.clone(), mask.ints)


# Lies per encoding: (name, edit). An edit writes through .numpy() (no version bump) and
# returns False where it does not apply to this mask (too few entries, one block only).
def _index_past_end(m, numel):
    if m.index.numel() == 0:
        return False
    m.index.numpy()[-1] = 2**31 - 1
    return True


def _index_negative(m, numel):
    if m.index.numel() == 0:
        return False
    m.index.numpy()[0] = -(2**31)
    return True


def _index_unsorted(m, numel):
    if m.index.numel() < 2:
        return False
    a = m.index.numpy()
    a[0], a[1] = a[1], a[0]
    return True


def _index_duplicate(m, numel):
    if m.index.numel() < 2:
        return False
    a = m.index.numpy()
    a[1] = a[0]
    return True


def _b16_offset_past_end(m, numel):
    if m.offsets.numel() == 0 or numel % 65536 == 0:
        return False
    m.offsets.numpy()[-1] = 65535  # the last block is partial: past numel
    return True


def _b16_offsets_unsorted(m, numel):
    if m.offsets.numel() < 2:
        return False
    a = m.offsets.numpy()
    a[-1] = a[-2]
    return True


def _b16_starts_past_nnz(m, numel):
    s = m.index.numpy()
    s[-1] = 2**31 - 1
    return True


def _b16_starts_negative(m, numel):
    s = m.index.numpy()
    s[0] = -(2**31)
    return True


def _b16_starts_short(m, numel):
    if m.index.numel() < 3:
        return False
    s = m.index.numpy()
    s[1] = s[-1] + 7  # a block claims more entries than there are, the next ones decrease
    return True


def _hash_offsets_negative(m, numel):
    m.index.numpy()[1] = -(2**31)
    return True


def _hash_offsets_past_nnz(m, numel):
    m.index.numpy()[-1] = 2**31 - 1
    return True


def _hash_offsets_overlap(m, numel):
    if m.index.numel() < 3:
        return False
    a = m.index.numpy()
    a[1] = a[2] + 3  # block 0 claims slots that block 1 claims too
    return True


def _hash_offsets_renumbered(m, numel):
    """Structurally valid (starts at 0, steps in [0, block], ends at nnz), but not this
    mask's counts: one slot moves from a block to the next. Accepted (a recount costs a
    step's work; offsets are recounted once per version), numbered as `entries` says."""
    a = m.index.numpy()
    for b in range(1, a.size - 1):
        if a[b] > a[b - 1] and a[b + 1] - (a[b] - 1) <= HASH_BLOCK:
            a[b] -= 1
            return True
    return False


LIES: dict[str, tuple[tuple[str, Callable], ...]] = {
    "index": (("past_end", _index_past_end), ("negative", _index_negative), ("unsorted", _index_unsorted),
              ("duplicate", _index_duplicate)),
    "block16": (("offset_past_end", _b16_offset_past_end), ("offsets_unsorted", _b16_offsets_unsorted),
                ("starts_past_nnz", _b16_starts_past_nnz), ("starts_negative", _b16_starts_negative),
                ("starts_short", _b16_starts_short)),
    "hash": (("offsets_negative", _hash_offsets_negative), ("offsets_past_nnz", _hash_offsets_past_nnz),
             ("offsets_overlap", _hash_offsets_overlap), ("offsets_renumbered", _hash_offsets_renumbered)),
}
ACCEPTED_LIES = {"offsets_renumbered"}  # every other lie is refused with a ValueError


# ----------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    """What one backend did: error None (and the inputs after) or the error raised."""

    error: tuple[type, str] | None
    after: list


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes (compares NaN payloads and -0.0 too)."""
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


def run(backend: str, fn: Callable[[], object], tensors: list) -> Outcome:
    """Call fn under `backend`; on error, assert every tensor kept its bytes."""
    before = [bits(t) for t in tensors]
    try:
        with ops.use_backend(backend):
            fn()
    except (TypeError, ValueError, RuntimeError, IndexError, NotImplementedError) as exc:
        changed = [i for i, (t, b) in enumerate(zip(tensors, before)) if not torch.equal(bits(t), b)]
        assert not changed, f"{backend}: {type(exc).__name__} ({exc}) raised after changing inputs {changed}"
        return Outcome((type(exc), str(exc)), [])
    return Outcome(None, [t.detach().clone() for t in tensors])


def assert_same(outcomes: dict[str, Outcome], exact: bool = False) -> Outcome:
    """Every backend gave the reference's result, or the reference's error (type and
    message); returns the reference's outcome."""
    ref = outcomes["reference"]
    for backend, got in outcomes.items():
        if ref.error is not None or got.error is not None:
            assert got.error == ref.error, f"{backend}: {got.error} but the reference: {ref.error}"
            continue
        for i, (a, e) in enumerate(zip(got.after, ref.after)):
            if exact or not a.is_floating_point():
                assert torch.equal(bits(a), bits(e)), f"{backend}: tensor {i} differs from the reference bit for bit"
            else:
                rtol, atol = TOLERANCE[a.dtype]
                torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                           msg=lambda m, i=i, backend=backend: f"{backend}, tensor {i}: {m}")
    return ref


# ----------------------------------------------------------------------------- subprocesses


def run_python(code: str, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this tree's seat (Triton interpreted)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO)


def guarded(n: int, dtype: torch.dtype, pad: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): view = n elements in the middle of a buffer whose `pad` elements on
    each side hold a sentinel, so a write outside the view shows (guards_intact)."""
    buf = torch.full((n + 2 * pad,), 7, dtype=dtype)
    view = buf[pad:pad + n]
    view.copy_(torch.arange(n).to(dtype))
    return buf, view


def guards_intact(buf: torch.Tensor, n: int, pad: int = 64) -> bool:
    sentinel = torch.full((pad,), 7, dtype=buf.dtype)
    return torch.equal(buf[:pad], sentinel) and torch.equal(buf[pad + n:], sentinel)
