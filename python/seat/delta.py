"""Sparse deltas: a SEAT run saved alone, and loaded onto a fresh copy of its base model.

A delta directory holds
  delta.safetensors   for each trained weight NAME: "idx/NAME" (nnz,) int32 flat indices
                      (int32 masks only) and "values/NAME" (nnz,) in the weight's dtype:
                      the trained values
  seat_config.json    format version, seat version, model class, the SeatConfig, and per
                      weight: shape, dtype, nnz and the sha256 of the base values at the
                      mask (what the delta overwrites), so loading onto another base model,
                      or a weight of another shape or dtype, is an error. A weight trained
                      with an implicit mask stores no indices: its "mask" entry holds the
                      ImplicitMask spec (seed, param id, density, block), from which the
                      loader recomputes the same entries (format version 2).
The directory is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written delta (an existing one is replaced only once the new one is whole).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ._version import __version__

FORMAT = "seat-delta"
FORMAT_VERSION = 2  # 2: per-weight "mask" specs of implicit masks; version 1 deltas still load
READ_VERSIONS = (1, 2)
WEIGHTS_FILE = "delta.safetensors"
CONFIG_FILE = "seat_config.json"


class DeltaMismatchError(ValueError):
    """The delta does not belong to this model (class, weight names, shapes, base values)."""


def _sha256(t: Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _write_atomically(directory: Path, write) -> None:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write(tmp)
        for f in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_delta(handle, directory) -> None:
    """Write `handle`'s trained values (see the module docstring)."""
    from safetensors.torch import save_file

    from .masks import as_mask

    tensors, weights = {}, {}
    for name, t in handle.targets.items():
        mask = as_mask(t.idx, t.param.numel(), name)
        idx = mask.indices()
        tensors[f"values/{name}"] = t.param.detach().view(-1)[idx.long()].cpu().contiguous()
        weights[name] = {"shape": list(t.param.shape), "dtype": str(t.param.dtype).replace("torch.", ""),
                         "nnz": mask.nnz, "base_sha256": _sha256(t.original)}
        spec = mask.spec()  # a mask defined by a few numbers is stored as them, not as indices
        if spec is not None:
            weights[name]["mask"] = spec
        else:
            tensors[f"idx/{name}"] = idx.detach().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "seat_version": __version__,
            "model_class": type(handle.model).__name__, "config": handle.config.to_dict(), "weights": weights}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))

    _write_atomically(Path(directory), write)


def read_delta(directory) -> tuple[dict, dict[str, Tensor]]:
    """(seat_config.json contents, tensors) of a delta directory, validated."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a seat delta: {name} is missing")
    meta = json.loads((directory / CONFIG_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") not in READ_VERSIONS:
        versions = "/".join(map(str, READ_VERSIONS))
        raise DeltaMismatchError(f"{directory / CONFIG_FILE} is not a {FORMAT} v{versions} file "
                                 f"(format {meta.get('format')!r} v{meta.get('format_version')!r})")
    return meta, load_file(str(directory / WEIGHTS_FILE))


def load_delta(model: torch.nn.Module, directory, *, strict_class: bool = True) -> dict:
    """Write a delta's trained values into `model` (a fresh copy of the delta's base
    model), bit-exactly. Everything is checked before any weight is written: model class
    (unless strict_class=False), every weight present with the same shape and dtype, and
    the base values at each mask equal to those the delta was trained from. Returns the
    delta's metadata."""
    meta, tensors = read_delta(directory)
    if strict_class and meta["model_class"] != type(model).__name__:
        raise DeltaMismatchError(f"the delta was trained on a {meta['model_class']}, this model is a "
                                 f"{type(model).__name__} (strict_class=False to load anyway)")
    params = dict(model.named_parameters())
    plan = []
    for name, info in meta["weights"].items():
        if name not in params:
            raise DeltaMismatchError(f"the delta trains {name!r}, which this model does not have")
        p = params[name]
        dtype = str(p.dtype).replace("torch.", "")
        if list(p.shape) != info["shape"] or dtype != info["dtype"]:
            raise DeltaMismatchError(f"{name}: the delta expects shape {info['shape']} {info['dtype']}, the model "
                                     f"has {list(p.shape)} {dtype}")
        values = tensors[f"values/{name}"]
        if "mask" in info:  # a mask stored as its spec (implicit): recompute its entries
            from .masks import from_spec

            spec = info["mask"]
            if not isinstance(spec, dict) or spec.get("numel") != p.numel():
                raise DeltaMismatchError(f"{name}: the delta's mask covers "
                                         f"{spec.get('numel') if isinstance(spec, dict) else spec!r} elements, the "
                                         f"weight has {p.numel()}")
            idx = from_spec(spec, device=p.device).indices().cpu()
        elif f"idx/{name}" in tensors:
            idx = tensors[f"idx/{name}"]
        else:
            raise DeltaMismatchError(f"{name}: delta.safetensors has no indices and {CONFIG_FILE} no mask for it")
        if idx.dtype != torch.int32 or idx.numel() != info["nnz"] or values.numel() != info["nnz"]:
            raise DeltaMismatchError(f"{name}: delta.safetensors is inconsistent with {CONFIG_FILE}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.numel()):
            raise DeltaMismatchError(f"{name}: the delta's indices fall outside the weight")
        index = idx.to(p.device).long()
        if _sha256(p.detach().view(-1)[index]) != info["base_sha256"]:
            raise DeltaMismatchError(f"{name}: the base values under the mask differ from those the delta was "
                                     "trained from: load it onto the same base model (and the same dtype)")
        plan.append((p, index, values.to(p.device)))
    with torch.no_grad():
        for p, index, values in plan:
            p.view(-1)[index] = values
    return meta
