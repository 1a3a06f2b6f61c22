"""Sparse deltas: a SEAT run saved alone, and loaded onto a fresh copy of its base model.

A delta directory holds
  delta.safetensors   for each trained weight NAME: "idx/NAME" (nnz,) int32 flat indices
                      (sorted, unique) and "values/NAME" (nnz,) in the weight's dtype: the
                      trained values. A weight trained with an implicit mask stores no
                      indices (its config entry holds the mask's spec instead).
  seat_config.json    format, format_version, seat version, model class, the SeatConfig,
                      and per weight: shape, dtype, nnz, "base_sha256" (the base values at
                      the mask: what the delta overwrites), "mask" (the ImplicitMask spec:
                      seed, param id, density, block) or stored indices, and checksums:
                      "values_sha256" / "idx_sha256" of each stored tensor (dtype, shape
                      and bytes); at the top "weights_sha256" (the whole weights file) and
                      "config_sha256" (the config itself, that key left out).

A 4-bit weight (QSEAT, seat.quant) stores its delta: "values/NAME" in the compute dtype,
its settings under "quant", its base as the dequantized values at the mask
(seat.quant._delta); a delta holding one is format 4, which seats before it refuse.

Formats: 4 adds "quant" entries; 3 (float weights only, this seat) adds the checksums; 2 added "mask" specs; 1 stores indices only.
Deltas of formats 1 and 2 still load, checked for structure only (they carry no
checksums). Saving is atomic with no window in which no delta is at the path, and an
interrupted save recovers on the next one: see seat.delta._store.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor

from .._version import __version__
from . import _store
from ._format import (CONFIG_FILE, FORMAT, FORMAT_VERSION, QUANT_FORMAT_VERSION, READ_VERSIONS, WEIGHTS_FILE,
                      DeltaMismatchError, bytes_sha256, check_config, check_tensors, dtype_name, tensor_sha256)

__all__ = ["DeltaMismatchError", "save_delta", "read_delta", "load_delta", "FORMAT", "FORMAT_VERSION",
           "READ_VERSIONS", "WEIGHTS_FILE", "CONFIG_FILE"]


def save_delta(handle, directory) -> None:
    """Write `handle`'s trained values to `directory` (see the module docstring): a new
    path, an empty directory, or an existing delta (replaced atomically). A file or a
    directory holding anything else is refused (FileExistsError) and left untouched.
    On a model sharded with seat.distributed.shard every rank calls it: the shards are
    gathered to rank 0, which writes the delta of the whole weights."""
    directory = _store.as_path(directory, "save_delta")
    sharding = getattr(handle, "_sharding", None)
    if sharding is not None:  # FSDP2: rank 0 writes what every rank's shards hold
        from ..distributed._fsdp import agree, delta_entries

        whole = delta_entries(handle)
        error = None
        if whole is not None:
            try:
                _write(handle, directory, whole)
            except Exception as e:  # every rank raises it (agree), none waits forever
                error = e
        agree(sharding, error)
        return
    _write(handle, directory, None)


def _write(handle, directory: Path, whole: dict | None) -> None:
    """save_delta's files; `whole`: {name: (mask, values, original)} of a sharded model's
    whole weights (gathered), else None (the targets hold them)."""
    from ..masks import as_mask
    from ..quant import QuantTarget
    from ..quant._delta import weight_entry

    tensors, weights = {}, {}
    for name, t in handle.targets.items():
        if isinstance(t, QuantTarget):  # a 4-bit weight: its delta, settings and dequantized base
            mask = as_mask(t.mask, t.weight_numel, name)
            idx = mask.indices()
            values, weights[name] = weight_entry(t)
        else:
            if whole is None:
                mask = as_mask(t.idx, t.param.numel(), name)
                idx = mask.indices()
                values, original = t.param.detach().view(-1)[idx.long()].cpu().contiguous(), t.original
            else:
                mask, values, original = whole[name]
                idx = mask.indices()
            weights[name] = {"shape": list(t.param.shape), "dtype": dtype_name(t.param.dtype), "nnz": mask.nnz,
                             "base_sha256": bytes_sha256(original)}
        tensors[f"values/{name}"] = values
        weights[name]["values_sha256"] = tensor_sha256(values)
        spec = mask.spec()  # a mask defined by a few numbers is stored as them, not as indices
        if spec is not None:
            weights[name]["mask"] = spec
        else:
            idx = idx.detach().cpu().contiguous()
            tensors[f"idx/{name}"] = idx
            weights[name]["idx_sha256"] = tensor_sha256(idx)
    version = QUANT_FORMAT_VERSION if any("quant" in w for w in weights.values()) else FORMAT_VERSION
    meta = {"format": FORMAT, "format_version": version, "seat_version": __version__,
            "model_class": _class_name(handle.model), "config": handle.config.to_dict(), "weights": weights}
    _store.save_files(directory, meta, tensors)


def _class_name(model) -> str:
    """The model's class name; for a model FSDP2 sharded, the class it had (fully_shard
    swaps in a subclass named "FSDP" + its name)."""
    from ..distributed._local import is_dtensor

    cls = type(model)
    if any(is_dtensor(p) for p in model.parameters()):
        from torch.distributed.fsdp import FSDPModule

        cls = next((c for c in cls.__bases__ if c is not FSDPModule), cls)
    return cls.__name__


def read_delta(directory) -> tuple[dict, dict[str, Tensor]]:
    """(seat_config.json contents, tensors) of a delta directory, checked without a
    model: the config's schema, every checksum (format 3), the same weights in both files,
    each tensor's dtype and shape, the indices sorted, unique and inside their weight.
    FileNotFoundError when there is no delta; DeltaMismatchError for anything wrong."""
    from safetensors.torch import load

    directory = _store.as_path(directory, "read_delta")
    config_path, meta = _store.read_config_file(directory)
    check_config(meta, config_path)
    weights_path, data = _store.read_weights_bytes(directory, meta)
    try:
        tensors = load(data)
    except Exception as e:  # the parser's own error types (SafetensorError, ...): a damaged file
        raise DeltaMismatchError(f"{weights_path} is not a readable safetensors file: {e}") from None
    check_tensors(meta, tensors, weights_path)
    if meta["format_version"] >= 3 and hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
        raise DeltaMismatchError(f"{weights_path} does not match the weights_sha256 in {config_path}, though every "
                                 "tensor does: its header was altered")
    return meta, tensors


def load_delta(model: torch.nn.Module, directory, *, strict_class: bool = True) -> dict:
    """Write a delta's trained values into `model` (a fresh copy of the delta's base
    model), bit-exactly. The deltas of 4-bit weights apply to the same 4-bit base (a
    model seat has not patched is patched with the delta's SeatConfig and masks) or merge
    into a float base (see seat.quant._delta). Everything is checked before any weight is written: the files
    (read_delta: checksums of format 3 deltas; deltas of formats 1 and 2 have none and
    load checked for structure only), the model class (unless strict_class=False), every
    weight present with the same shape and dtype, and the base values at each mask equal
    to those the delta was trained from. A failed load leaves `model` as it was. Returns
    the delta's metadata."""
    from ..patching import handle_of

    handle = handle_of(model)
    if handle is not None and handle._in_reference:
        raise RuntimeError("cannot load a delta inside `with handle.reference():` (the model holds its base values "
                           "there, and the block's exit would swap the loaded values out again); load it after "
                           "the block")
    from ..distributed._local import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()):
        raise ValueError("load_delta writes whole weights and this model is sharded (FSDP2): load the delta into the "
                         "unsharded model, then seat.patch and seat.distributed.shard it")
    meta, tensors = read_delta(directory)
    if strict_class and meta["model_class"] != type(model).__name__:
        raise DeltaMismatchError(f"{directory}: the delta was trained on a {meta['model_class']}, this model is a "
                                 f"{type(model).__name__} (strict_class=False to load anyway)")
    params = dict(model.named_parameters())
    plan, after_patch, masks = [], [], {}
    for name, info in meta["weights"].items():
        if "quant" in info:  # a 4-bit weight's delta (seat.quant._delta)
            kind, write = _plan_quant(directory, name, info, model, handle, tensors)
            if kind == "patch":
                after_patch.append(write)
                masks[name] = _stored_mask(directory, name, info, tensors)
            else:
                plan.append(write)
        else:
            flat, index, values = _plan_weight(directory, name, info, params, tensors)
            plan.append(lambda flat=flat, index=index, values=values: flat.__setitem__(index, values))
            masks[name] = _stored_mask(directory, name, info, tensors)
    if after_patch:
        _load_patching(model, directory, meta, masks, plan, after_patch)
        return meta
    with torch.no_grad():
        for write in plan:
            write()
    return meta


def _stored_mask(directory, name: str, info: dict, tensors: dict):
    """A weight's mask as the delta stores it: int32 indices, or the mask of its spec."""
    if "mask" not in info:
        return tensors[f"idx/{name}"]
    from ..masks import from_spec

    try:
        return from_spec(info["mask"])
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise DeltaMismatchError(f"{Path(directory) / CONFIG_FILE}: weight {name!r}: its mask spec is invalid: {e}") \
            from None


def _plan_quant(directory, name: str, info: dict, model, handle, tensors: dict):
    from ..quant._delta import plan_quant_weight

    where = f"{Path(directory) / CONFIG_FILE}: weight {name!r}"
    if "mask" in info:
        mask = _stored_mask(directory, name, info, tensors)
        if mask.nnz != info["nnz"] or mask.numel != math.prod(info["shape"]):
            raise DeltaMismatchError(f"{where}: its mask spec gives {mask.nnz} entries of {mask.numel}; the config "
                                     f"says nnz {info['nnz']} of {math.prod(info['shape'])}")
        indices = mask.indices().cpu()
    else:
        indices = tensors[f"idx/{name}"]
    return plan_quant_weight(where, name, info, model, handle, indices, tensors[f"values/{name}"], DeltaMismatchError)


def _load_patching(model, directory, meta: dict, masks: dict, plan: list, after_patch: list) -> None:
    """A delta of 4-bit weights onto a model seat has not patched: patch it with the
    delta's SeatConfig and masks (every weight of the delta must then be a target, and
    only those), then write the values; any failure reverts the patch."""
    from ..config import SeatConfig
    from ..patching import patch

    try:
        config = SeatConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise DeltaMismatchError(f"{Path(directory) / CONFIG_FILE}: its SeatConfig is not valid here: {e}") from None
    try:
        handle = patch(model, config, masks=masks)
    except ValueError as e:
        raise DeltaMismatchError(f"{directory}: patching the model with the delta's SeatConfig and masks failed: "
                                 f"{e}") from e
    try:
        missing = sorted(set(handle.targets) - set(masks))
        if missing:
            raise DeltaMismatchError(f"{directory}: the delta's SeatConfig targets {len(missing)} weights it holds no "
                                     f"values for (e.g. {missing[0]!r}): it was not saved from this model")
        with torch.no_grad():
            for write in plan:
                write()
            for write in after_patch:
                write(handle)
    except BaseException:
        handle.revert()
        raise


def _plan_weight(directory, name: str, info: dict, params: dict, tensors: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(the weight's flat view, int64 indices, values on its device) once every check of
    this weight against the model has passed."""
    where = f"{Path(directory) / CONFIG_FILE}: weight {name!r}"
    if name not in params:
        raise DeltaMismatchError(f"{where}: the delta trains {name!r}, which this model does not have")
    p = params[name]
    if list(p.shape) != info["shape"] or dtype_name(p.dtype) != info["dtype"]:
        raise DeltaMismatchError(f"{where}: the delta expects shape {info['shape']} {info['dtype']}, the model "
                                 f"has {list(p.shape)} {dtype_name(p.dtype)}")
    if not p.is_contiguous():
        raise DeltaMismatchError(f"{where}: the model's weight is not contiguous; call .contiguous() on it first")
    if "mask" in info:  # a mask stored as its spec (implicit): recompute its entries
        idx = _spec_indices(where, info, p)
    else:
        idx = tensors[f"idx/{name}"]
    index = idx.to(p.device).long()
    flat = p.detach().view(-1)
    if bytes_sha256(flat[index]) != info["base_sha256"]:
        raise DeltaMismatchError(f"{where}: the base values under the mask differ from those the delta was "
                                 "trained from: load it onto the same base model (and the same dtype)")
    return flat, index, tensors[f"values/{name}"].to(p.device)


def _spec_indices(where: str, info: dict, p: Tensor) -> Tensor:
    from ..masks import from_spec

    try:
        mask = from_spec(info["mask"], device=p.device)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise DeltaMismatchError(f"{where}: its mask spec {info['mask']!r:.200} is invalid: {e}") from None
    if mask.numel != p.numel() or mask.nnz != info["nnz"]:
        raise DeltaMismatchError(f"{where}: its mask spec gives {mask.nnz} entries of {mask.numel}; the config says "
                                 f"nnz {info['nnz']} of {math.prod(info['shape'])}")
    return mask.indices().cpu()
