"""Deltas of 4-bit weights (QSEAT): what save_delta stores for a QuantTarget, and how
load_delta applies one to a model.

A 4-bit weight's entry in seat_config.json holds, beside the float weights' keys,
"quant": its QuantSettings (quant_type, blocksize, double_quant, compute_dtype,
dequant_dtype, quant_storage, shape). "dtype" is the delta's (the compute dtype),
"values/NAME" the delta itself, and "base_sha256" the sha256 of the dequantized base
(float32) at the mask's entries: the frozen base the delta was trained on. Such a delta
is format_version 4 (seat.delta).

Loading (seat.load_delta) a 4-bit weight's delta onto
  * a Linear4bit with the same settings and the same dequantized base at the mask: the
    delta applies exactly, as a QSEAT delta of a patched model (a model not yet patched is
    patched with the delta's SeatConfig and masks; seat.handle_of(model).revert() removes
    it again);
  * a Linear4bit with other settings, or another base: refused (DeltaMismatchError);
  * a float nn.Linear of the same shape (the bf16 / fp32 base the 4-bit one was quantized
    from): merged, W.view(-1)[mask] += delta (summed in float32, rounded once to W's
    dtype). This is QLoRA's approximation: the delta was trained against dequant(W), not
    W, so the merged model differs from the trained one by the quantization error of the
    base (tests/api/test_qseat.py measures the logits' difference on a tiny model).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._settings import QuantSettings, is_4bit_linear, settings_of
from ._target import QuantTarget, dequantized


def base_values(module, settings: QuantSettings, mask) -> Tensor:
    """The dequantized base (float32) at the mask's entries: what base_sha256 hashes."""
    from ..masks import mask_indices

    w = dequantized(module, torch.float32)
    return w.view(-1)[mask_indices(mask).long()]


def weight_entry(t: QuantTarget) -> tuple[Tensor, dict]:
    """(the delta's values on the CPU, its seat_config.json entry without the mask and the
    checksums of stored tensors)."""
    from ..delta._format import bytes_sha256, dtype_name

    values = t.delta.detach().cpu().contiguous()
    info = {"shape": list(t.settings.shape), "dtype": dtype_name(t.delta.dtype), "nnz": values.numel(),
            "base_sha256": bytes_sha256(base_values(t.module, t.settings, t.mask)), "quant": t.settings.to_dict()}
    return values, info


def module_of(model: torch.nn.Module, name: str):
    """The module holding parameter `name` ("a.b.weight" -> a.b), or None."""
    owner, _, leaf = name.rpartition(".")
    if leaf != "weight":
        return None
    try:
        return model.get_submodule(owner)
    except AttributeError:
        return None


def plan_quant_weight(where: str, name: str, info: dict, model, handle, indices: Tensor, values: Tensor, error):
    """How a 4-bit weight's delta goes into `model` once every check passed: a callable
    that writes it. indices: (nnz,) int32 entries of its mask. error: the exception class.
    Returns (kind, write): kind "delta" (a QuantTarget of `handle`), "patch" (a Linear4bit
    of a model seat has not patched yet: written after patching) or "merge" (a float
    weight: W[idx] += delta)."""
    from ..masks import mask_indices

    module = module_of(model, name)
    settings = QuantSettings.from_dict(info["quant"])
    if module is not None and is_4bit_linear(module):
        try:
            mine = settings_of(name, module)
        except ValueError as e:
            raise error(f"{where}: {e}") from None
        diffs = settings.differences(mine)
        if diffs:
            raise error(f"{where}: the delta was trained on a 4-bit base quantized otherwise ({'; '.join(diffs)}, "
                        "the delta's vs this model's): load the base with the delta's BitsAndBytesConfig")
        from ..delta._format import bytes_sha256
        from ..masks import IndexMask

        mask = IndexMask(indices.to(module.weight.device), settings.numel, _checked=True)
        if bytes_sha256(base_values(module, mine, mask)) != info["base_sha256"]:
            raise error(f"{where}: the dequantized base under the mask differs from the one the delta was trained "
                        "on: load it onto the same 4-bit base model")
        target = handle.targets.get(name) if handle is not None else None
        if handle is not None and not isinstance(target, QuantTarget):
            raise error(f"{where}: the model is patched by seat without {name!r} as a 4-bit target: revert() its "
                        "handle first, or patch it with the delta's SeatConfig")
        if target is not None:
            if not torch.equal(mask_indices(target.mask).cpu(), indices.cpu()):
                raise error(f"{where}: the patched model's mask of {name!r} differs from the delta's: patch it with "
                            "the delta's SeatConfig (and masks)")

            def write_delta(target=target):
                target.delta.data.copy_(values.to(target.delta.device))

            return "delta", write_delta

        def write_after_patch(new_handle):
            t = new_handle.targets[name]
            t.delta.data.copy_(values.to(t.delta.device))

        return "patch", write_after_patch
    weight = getattr(module, "weight", None) if module is not None else None
    if not (isinstance(module, torch.nn.Linear) and isinstance(weight, Tensor) and weight.is_floating_point()):
        raise error(f"{where}: the delta trains the 4-bit linear weight {name!r}; this model has "
                    f"{'no such module' if module is None else type(module).__name__ + ' there'}: load it onto "
                    "the 4-bit base, or merge it into a float (bf16 / fp32) nn.Linear of the same shape")
    if list(weight.shape) != list(settings.shape):
        raise error(f"{where}: the delta expects a weight of shape {list(settings.shape)}; the model's is "
                    f"{list(weight.shape)}")
    if not weight.is_contiguous():
        raise error(f"{where}: the model's weight is not contiguous; call .contiguous() on it first")
    handle_target = handle.targets.get(name) if handle is not None else None
    if handle_target is not None:
        raise error(f"{where}: {name!r} is a target of a seat handle on this model: merge the 4-bit delta into an "
                    "unpatched float model (revert() the handle first)")

    def merge(weight=weight):
        index = indices.to(weight.device).long()
        flat = weight.detach().view(-1)
        flat[index] = (flat[index].float() + values.to(weight.device).float()).to(weight.dtype)

    return "merge", merge
