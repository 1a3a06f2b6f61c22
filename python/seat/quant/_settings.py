"""What identifies a bitsandbytes 4-bit weight's quantization: QuantSettings, read from a
Linear4bit, compared when a delta is loaded, and stored in a delta's config."""
from __future__ import annotations

import dataclasses
import sys

import torch


def is_4bit_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes.nn.Linear4bit (nf4 or fp4; LinearNF4 / LinearFP4 included). False
    whenever bitsandbytes was never imported: no model can hold one then."""
    bnb = sys.modules.get("bitsandbytes")
    nn = getattr(bnb, "nn", None)
    cls = getattr(nn, "Linear4bit", None)
    return cls is not None and isinstance(module, cls)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    """The quantization of one 4-bit weight (what BitsAndBytesConfig chose for it).

    quant_type: "nf4" or "fp4". blocksize: elements per absmax. double_quant: the absmax
    are themselves 8-bit quantized (bnb_4bit_use_double_quant; QuantState.nested).
    compute_dtype: the dtype of the layer's matmul (bnb_4bit_compute_dtype): the dtype of
    the effective weight and of the delta. dequant_dtype: what dequantize_4bit returns
    (the weight's dtype when it was quantized). quant_storage: the packed tensor's dtype.
    shape: [out_features, in_features] of the weight.
    """

    quant_type: str
    blocksize: int
    double_quant: bool
    compute_dtype: str
    dequant_dtype: str
    quant_storage: str
    shape: tuple[int, int]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) != fields:
            raise ValueError(f"quantization settings must be a JSON object with exactly the keys {sorted(fields)}; "
                             f"got {d!r:.200}")
        return cls(**{**d, "shape": tuple(d["shape"])})

    @property
    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])

    def differences(self, other: "QuantSettings") -> list[str]:
        """"field: this vs other" for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def refuse_cpu_packed(name: str, module) -> None:
    """A weight bitsandbytes repacked for CPU inference (its absmax rounded to bfloat16,
    its codes in another layout) is no longer the base the model was loaded with."""
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError(f"{name} was repacked by bitsandbytes' CPU inference path (an eval-mode forward without "
                         "gradients on a CPU with AVX512-BF16), which rounds its absmax to bfloat16: it is no "
                         "longer the base the model was loaded with. Load the model again and call seat.patch "
                         "before any such forward (seat turns the repacking off while the model is patched)")


def settings_of(name: str, module) -> QuantSettings:
    """The QuantSettings of a Linear4bit (ValueError naming `name` when it holds no
    quantized weight yet, or one repacked for CPU inference)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise ValueError(f"{name} is a bitsandbytes Linear4bit whose weight is not quantized yet (no quant_state): "
                         "move the model to its device (bitsandbytes quantizes on .to()) or load it with "
                         "from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))")
    refuse_cpu_packed(name, module)
    if len(state.shape) != 2:
        raise ValueError(f"{name}: its quant_state.shape {tuple(state.shape)} is not 2-D (out_features, in_features)")
    compute = module.compute_dtype if module.compute_dtype is not None else state.dtype
    return QuantSettings(quant_type=str(state.quant_type), blocksize=int(state.blocksize),
                         double_quant=bool(state.nested), compute_dtype=_dtype_name(compute),
                         dequant_dtype=_dtype_name(state.dtype), quant_storage=_dtype_name(weight.dtype),
                         shape=(int(state.shape[0]), int(state.shape[1])))
