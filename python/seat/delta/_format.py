"""What a delta's files must hold, checked without a model: the seat_config.json schema,
the checksums, and the stored tensors against the config.

Every problem raises DeltaMismatchError naming the file, the weight and what is wrong;
nothing here writes anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

import torch
from torch import Tensor

FORMAT = "seat-delta"
# 4: format 3 with "quant" entries, for the deltas of 4-bit weights (seat.quant; a delta
# holding none is written as 3); 3: checksums (every tensor, the weights file, the config
# itself); 2: per-weight "mask" specs of implicit masks; 1: int32 indices only. Versions 1
# and 2 carry no checksums.
FORMAT_VERSION = 3
QUANT_FORMAT_VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)
WEIGHTS_FILE = "delta.safetensors"
CONFIG_FILE = "seat_config.json"
MAX_CONFIG_BYTES = 64 << 20  # a config lists a few hundred weights: far below this

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = {"format", "format_version", "seat_version", "model_class", "config", "weights"}
_TOP_KEYS_V3 = {"weights_sha256", "config_sha256"}
_WEIGHT_KEYS = {"shape", "dtype", "nnz", "base_sha256", "mask"}
_WEIGHT_KEYS_V3 = {"values_sha256", "idx_sha256"}
_WEIGHT_KEYS_V4 = {"quant"}


class DeltaMismatchError(ValueError):
    """The delta is malformed, corrupted, or does not belong to this model (class, weight
    names, shapes, dtypes, base values)."""


def bytes_sha256(t: Tensor) -> str:
    """sha256 of a tensor's bytes alone (the base values a delta overwrites)."""
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a stored tensor: its dtype and shape, then its bytes (a tensor read back
    with another dtype or shape but the same bytes does not match)."""
    data = t.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def config_sha256(meta: dict) -> str:
    """sha256 of a config's canonical JSON, its own "config_sha256" left out."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_config(raw: bytes, where) -> dict:
    """seat_config.json's bytes -> its dict, or DeltaMismatchError (not UTF-8, not JSON,
    repeated keys, NaN/Infinity, nested too deep)."""

    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"key {repeated[0]!r} appears more than once")
        return dict(pairs)

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        return value

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats, parse_float=finite,
                          parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise DeltaMismatchError(f"{where} is not valid JSON: {e}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_hex(where: str, key: str, value) -> None:
    if not (isinstance(value, str) and _HEX64.fullmatch(value)):
        raise DeltaMismatchError(f"{where}: {key!r} must be a sha256 (64 lowercase hex digits); got {value!r:.80}")


def check_config(meta, where) -> int:
    """The schema of a parsed seat_config.json (`where` names it in errors), and for
    version 3 its own checksum. Returns the format version."""
    if not isinstance(meta, dict):
        raise DeltaMismatchError(f"{where} must hold a JSON object; got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise DeltaMismatchError(f"{where} is not a {FORMAT} file (format {meta.get('format')!r:.80})")
    version = meta.get("format_version")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise DeltaMismatchError(f"{where}: format_version {version!r:.80} is not one this seat reads "
                                 f"({', '.join(map(str, READ_VERSIONS))}): save it again with this seat")
    missing = sorted((_TOP_KEYS | (_TOP_KEYS_V3 if version >= 3 else set())) - set(meta))
    if missing:
        raise DeltaMismatchError(f"{where} has no {', '.join(map(repr, missing))}")
    if version >= 3:
        unknown = sorted(set(meta) - _TOP_KEYS - _TOP_KEYS_V3)
        if unknown:
            raise DeltaMismatchError(f"{where} holds keys a format 3 delta has not: {', '.join(map(repr, unknown))}")
        _check_hex(str(where), "config_sha256", meta["config_sha256"])
        if config_sha256(meta) != meta["config_sha256"]:
            raise DeltaMismatchError(f"{where} was altered after it was saved: its contents do not match its "
                                     "config_sha256")
        _check_hex(str(where), "weights_sha256", meta["weights_sha256"])
    elif _TOP_KEYS_V3 & set(meta):
        raise DeltaMismatchError(f"{where} carries checksums but says format_version {version} (which has none): "
                                 "its format_version was edited")
    for key, kind in (("model_class", str), ("seat_version", str), ("config", dict), ("weights", dict)):
        if not isinstance(meta[key], kind):
            raise DeltaMismatchError(f"{where}: {key!r} must be a {kind.__name__}; got {type(meta[key]).__name__}")
    if not meta["weights"]:
        raise DeltaMismatchError(f"{where} lists no weights")
    for name, info in meta["weights"].items():
        _check_weight(f"{where}: weight {name!r}", info, version)
    if version >= QUANT_FORMAT_VERSION and not any("quant" in info for info in meta["weights"].values()):
        raise DeltaMismatchError(f"{where} says format_version {version}, which marks a delta of 4-bit weights, but "
                                 "no weight has a 'quant' entry: its format_version was edited")
    return version


def _check_weight(where: str, info, version: int) -> None:
    if not isinstance(info, dict):
        raise DeltaMismatchError(f"{where} must be a JSON object; got {type(info).__name__}")
    allowed = _WEIGHT_KEYS | (_WEIGHT_KEYS_V3 if version >= 3 else set()) | (_WEIGHT_KEYS_V4 if version >= 4 else set())
    required = {"shape", "dtype", "nnz", "base_sha256"} | ({"values_sha256"} if version >= 3 else set())
    missing = sorted(required - set(info))
    if missing:
        raise DeltaMismatchError(f"{where} has no {', '.join(map(repr, missing))}")
    if version >= 3 or _WEIGHT_KEYS_V3 & set(info):
        unknown = sorted(set(info) - allowed)
        if unknown:
            raise DeltaMismatchError(f"{where} holds keys format {version} has not: {', '.join(map(repr, unknown))}")
    shape = info["shape"]
    if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
        raise DeltaMismatchError(f"{where}: 'shape' must be a list of non-negative ints; got {shape!r:.80}")
    if not (isinstance(info["dtype"], str) and isinstance(getattr(torch, info["dtype"], None), torch.dtype)):
        raise DeltaMismatchError(f"{where}: 'dtype' must name a torch dtype; got {info['dtype']!r:.80}")
    numel = math.prod(shape)
    nnz = info["nnz"]
    if not (_is_int(nnz) and 0 <= nnz <= numel):
        raise DeltaMismatchError(f"{where}: 'nnz' must be an int in [0, {numel}] (the weight's elements); "
                                 f"got {nnz!r:.80}")
    _check_hex(where, "base_sha256", info["base_sha256"])
    if "mask" in info:
        if version < 2:
            raise DeltaMismatchError(f"{where}: a 'mask' spec needs format_version >= 2; got {version}")
        spec = info["mask"]
        if not (isinstance(spec, dict) and isinstance(spec.get("encoding"), str)):
            raise DeltaMismatchError(f"{where}: 'mask' must be a mask spec (a JSON object with an 'encoding'); "
                                     f"got {spec!r:.80}")
        if spec.get("numel") != numel:
            raise DeltaMismatchError(f"{where}: its mask covers {spec.get('numel')!r:.40} elements, its shape "
                                     f"{shape} has {numel}")
    if "quant" in info:
        _check_quant(where, info)
    if version >= 3:
        _check_hex(where, "values_sha256", info["values_sha256"])
        if ("mask" in info) == ("idx_sha256" in info):
            raise DeltaMismatchError(f"{where} must have exactly one of 'mask' (a spec) and 'idx_sha256' (stored "
                                     "indices)")
        if "idx_sha256" in info:
            _check_hex(where, "idx_sha256", info["idx_sha256"])


def _check_quant(where: str, info: dict) -> None:
    """A 4-bit weight's "quant" entry: its QuantSettings, their shape the weight's, the
    delta in the compute dtype."""
    from ..quant import QuantSettings

    try:
        settings = QuantSettings.from_dict(info["quant"])
    except (TypeError, ValueError) as e:
        raise DeltaMismatchError(f"{where}: 'quant' is not valid: {e}") from None
    if list(settings.shape) != info["shape"]:
        raise DeltaMismatchError(f"{where}: its 'quant' shape {list(settings.shape)} is not its shape {info['shape']}")
    if settings.compute_dtype != info["dtype"]:
        raise DeltaMismatchError(f"{where}: a 4-bit weight's delta is in its compute dtype {settings.compute_dtype!r}; "
                                 f"its 'dtype' says {info['dtype']!r}")


def check_tensors(meta: dict, tensors: dict[str, Tensor], where) -> None:
    """The stored tensors (`where` names their file) against a checked config: the same
    set of weights, every checksum (format 3), and each tensor's dtype, shape and indices
    (int32, sorted, unique, inside the weight)."""
    version = meta["format_version"]
    expected = {}
    for name, info in meta["weights"].items():
        expected[f"values/{name}"] = (name, info, "values")
        if "mask" not in info:
            expected[f"idx/{name}"] = (name, info, "idx")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise DeltaMismatchError(f"{where} has no tensor {missing[0]!r} for weight {expected[missing[0]][0]!r} "
                                 f"that {CONFIG_FILE} lists ({len(missing)} missing)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DeltaMismatchError(f"{where} holds tensors {CONFIG_FILE} does not list: {', '.join(extra[:3])}"
                                 f"{' ...' if len(extra) > 3 else ''} (a weight dropped from the config?)")
    for key, (name, info, kind) in expected.items():
        t = tensors[key]
        if version >= 3 and tensor_sha256(t) != info[f"{kind}_sha256"]:
            raise DeltaMismatchError(f"{where}: tensor {key!r} (weight {name!r}) does not match its checksum in "
                                     f"{CONFIG_FILE}: the file is corrupted")
        want = torch.int32 if kind == "idx" else getattr(torch, info["dtype"])
        if t.dtype != want or t.dim() != 1 or t.numel() != info["nnz"]:
            raise DeltaMismatchError(f"{where}: tensor {key!r} is {dtype_name(t.dtype)} of shape {list(t.shape)}; "
                                     f"weight {name!r} needs {dtype_name(want)} of shape [{info['nnz']}] (its nnz)")
        if kind == "idx" and t.numel():
            numel = math.prod(info["shape"])
            if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
                raise DeltaMismatchError(f"{where}: the indices of weight {name!r} are not sorted and unique")
            lo, hi = int(t[0]), int(t[-1])
            if lo < 0 or hi >= numel:
                raise DeltaMismatchError(f"{where}: the indices of weight {name!r} span [{lo}, {hi}], outside "
                                         f"[0, {numel}) (its {numel} elements)")
