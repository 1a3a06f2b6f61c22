"""Deltas of tiny trained models for the delta tests: training, parameter snapshots,
loading onto a fresh base, and rewriting a delta's files (config and tensors) with their
checksums made consistent again, to reach the checks behind them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import seat
from _models import tiny_model
from seat.delta import _format

DELTA_FILES = ["delta.safetensors", "seat_config.json"]


def patched(encoding: str = "int32", kind: str = "llama", dtype=torch.float32):
    """(model, handle) of tiny_model(kind) patched at density 0.1 (mask seed 3)."""
    model = tiny_model(kind, seed=0, dtype=dtype)
    return model, seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding=encoding, seed=3))


def step(handle, seed: int) -> None:
    """Move every trained entry by a seeded random step (what a delta stores is the values
    at the masks, whatever moved them; an optimizer step costs seconds here)."""
    from seat.masks import as_mask

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in handle.targets.items():
            idx = as_mask(t.idx, t.param.numel(), name).indices().long()
            noise = torch.randn(idx.numel(), generator=g) * 1e-2
            t.param.view(-1)[idx] += noise.to(t.param.dtype)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, snap: dict[str, torch.Tensor]) -> bool:
    """Every parameter bit-identical to the snapshot (compared as bytes: NaNs too)."""
    return all(torch.equal(p.detach().contiguous().view(torch.uint8), snap[n].contiguous().view(torch.uint8))
               for n, p in model.named_parameters())


def loaded(directory, kind: str = "llama", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The parameters of a fresh base model with the delta loaded."""
    model = tiny_model(kind, seed=0, dtype=dtype)
    seat.load_delta(model, directory)
    return snapshot(model)


def listing(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def read_config(directory) -> dict:
    return json.loads((Path(directory) / "seat_config.json").read_text())


def write_config(directory, meta: dict, *, reseal: bool = True) -> None:
    """Write seat_config.json; reseal: recompute its config_sha256 (an edit made as
    seat would write it), so the checks behind the checksum are reached."""
    if reseal and "config_sha256" in meta:
        meta["config_sha256"] = _format.config_sha256(meta)
    (Path(directory) / "seat_config.json").write_text(json.dumps(meta, indent=1))


def rewrite_tensors(directory, edit) -> None:
    """Apply edit(tensors) -> tensors to delta.safetensors and reseal every checksum
    (per tensor, the file, the config; format 3) as if seat had written the result."""
    import hashlib

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    tensors = edit(load_file(str(directory / "delta.safetensors")))
    save_file(tensors, str(directory / "delta.safetensors"), metadata={"format": "seat-delta"})
    meta = read_config(directory)
    for name, info in meta["weights"].items():
        for kind in ("values", "idx"):
            if f"{kind}/{name}" in tensors and f"{kind}_sha256" in info:
                info[f"{kind}_sha256"] = _format.tensor_sha256(tensors[f"{kind}/{name}"])
    if "weights_sha256" in meta:  # format 3
        meta["weights_sha256"] = hashlib.sha256((directory / "delta.safetensors").read_bytes()).hexdigest()
    write_config(directory, meta)


def tensor_spans(path) -> dict[str, tuple[int, int]]:
    """name -> (first byte, end byte) of each tensor's data in a safetensors file."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def flip_bit(path, byte: int, bit: int = 0) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[byte] ^= 1 << bit
    Path(path).write_bytes(bytes(raw))
