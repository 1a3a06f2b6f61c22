"""One QSEAT target: a bitsandbytes Linear4bit with a trained sparse delta, and the
autograd Function of its forward (see seat.quant)."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _chunks
from ._settings import QuantSettings

DELTA_NAME = "seat_delta"  # the delta Parameter's name on its Linear4bit


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def effective_weight(module, settings: QuantSettings, delta: Tensor | None, mask) -> Tensor:
    """dequant(W) in the compute dtype, plus `delta` (nnz,) at `mask`'s entries when
    given: (out_features, in_features), a new tensor (the packed weight is only read)."""
    return _dequant4_delta(module.weight, module.weight.quant_state, delta, mask, _dtype(settings.compute_dtype))


def dequantized(module, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Linear4bit's weight dequantized to `dtype` (a new tensor)."""
    return _dequant4_delta(module.weight, module.weight.quant_state, None, None, dtype)


def _dequant4_delta(packed: Tensor, quant_state, delta: Tensor | None, mask, dtype: torch.dtype) -> Tensor:
    """seat.ops.dequant4_delta: bitsandbytes' dequantize_4bit(packed, quant_state).to(dtype)
    with delta added at the mask's entries, in one pass."""
    from .. import ops

    return ops.dequant4_delta(packed, quant_state, None if delta is None else mask, delta, dtype=dtype)


def _full_mask(numel: int, device):
    """Every entry of a 1-D tensor of numel elements (the delta's optimizer mask): no index."""
    from ..masks import FullMask

    return FullMask(numel, device=device)


class Switch:
    """Whether the deltas of one handle's targets enter the forward (off inside
    handle.reference(): the frozen base)."""

    def __init__(self):
        self.on = True


class Dequant4DeltaLinear(torch.autograd.Function):
    """y = x @ (dequant(W) + scatter(delta))^T + bias, with no effective weight kept
    between forward and backward, and none of a whole layer made when the weight is
    larger than one row chunk (seat.quant._chunks; seat._constants.QSEAT_CHUNK_BYTES).

    forward(x (..., in) compute dtype, delta (nnz,), bias (out,) or None, target): per row
    chunk [r0, r1), y[..., r0:r1] = x @ W_eff[r0:r1]^T (+ bias[r0:r1]).
    backward, per row chunk: grad_x += grad_y[..., r0:r1] @ W_eff[r0:r1] (the chunk's
    effective weight made again, then freed); grad_delta[s0:s1] = the chunk mask's entries
    of grad_y[..., r0:r1]^T @ x (the chunk's dense weight gradient, made after the chunk's
    effective weight is freed); grad_bias = grad_y summed over the tokens. A weight of one
    chunk takes the unchunked path (one F.linear, one dense gradient).
    """

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, bias: Tensor | None, target: "QuantTarget") -> Tensor:
        ctx.target = target
        ctx.save_for_backward(x, delta, bias)
        if not _chunked(target):
            return F.linear(x, effective_weight(target.module, target.settings, delta, target.mask), bias)
        weight = target.module.weight
        y = x.new_empty(*x.shape[:-1], weight.quant_state.shape[0])
        for c in _chunks.row_chunks(weight, weight.quant_state, target.mask, x.dtype, with_delta=True):
            w = _chunk_weight(c, delta, x.dtype)
            y[..., c.r0:c.r1] = F.linear(x, w, None if bias is None else bias[c.r0:c.r1])
            del w  # before the next chunk's
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        from .. import ops

        x, delta, bias = ctx.saved_tensors
        target = ctx.target
        need_x, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_delta = grad_bias = None
        rows = grad_y.reshape(-1, grad_y.shape[-1])
        xs = x.reshape(-1, x.shape[-1])
        if not _chunked(target):
            if need_x:
                w = effective_weight(target.module, target.settings, delta, target.mask)
                grad_x = torch.matmul(grad_y, w)
                del w  # before the dense weight gradient exists: one layer-sized transient at a time
            if need_delta:
                dense = rows.t().matmul(xs)  # (out, in): this layer's weight gradient
                grad_delta = torch.zeros_like(delta)
                ops.masked_gather_(grad_delta, dense, target.mask)
                del dense
        elif need_x or need_delta:
            weight = target.module.weight
            gx = xs.new_zeros(xs.shape) if need_x else None
            grad_delta = torch.zeros_like(delta) if need_delta else None
            for c in _chunks.row_chunks(weight, weight.quant_state, target.mask, x.dtype, with_delta=True):
                if need_x:
                    w = _chunk_weight(c, delta, x.dtype)
                    gx.addmm_(rows[:, c.r0:c.r1], w)  # sums over the chunks' rows in turn
                    del w  # before the chunk's dense weight gradient exists
                if need_delta and c.s1 > c.s0:
                    dense = rows[:, c.r0:c.r1].t().matmul(xs)  # (r1 - r0, in): the chunk's weight gradient
                    ops.masked_gather_(grad_delta[c.s0:c.s1], dense, c.positions)
                    del dense
            grad_x = None if gx is None else gx.reshape(x.shape)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0).to(bias.dtype)
        return grad_x, grad_delta, grad_bias, None


def _chunked(target: "QuantTarget") -> bool:
    """Whether the target's weight is more than one row chunk."""
    return _chunks.n_chunks(target.module.weight.quant_state, _dtype(target.settings.compute_dtype)) > 1


def _chunk_weight(c: "_chunks.RowChunk", delta: Tensor, dtype: torch.dtype) -> Tensor:
    """The chunk's rows of the effective weight, (r1 - r0, in) in dtype."""
    from .. import ops

    return ops.dequant4_delta(c.packed, c.q, c.positions, delta[c.s0:c.s1], dtype=dtype)


def _forward(target: "QuantTarget", x: Tensor) -> Tensor:
    """The Linear4bit's forward while patched: bitsandbytes' own (input cast to the compute
    dtype, output back to the input's dtype) with the effective weight."""
    settings, module = target.settings, target.module
    dtype = _dtype(settings.compute_dtype)
    in_dtype = x.dtype
    x = x.to(dtype)
    bias = None if module.bias is None else module.bias.to(dtype)
    if target.switch.on:
        y = Dequant4DeltaLinear.apply(x, target.delta, bias, target)
    else:  # the frozen base: bitsandbytes' dequantize-then-linear, bit for bit
        y = F.linear(x, effective_weight(module, settings, None, target.mask), bias)
    return y.to(in_dtype)


@dataclasses.dataclass(eq=False)
class QuantTarget:
    """A trained 4-bit weight (see seat.quant).

    name: the packed weight's parameter name ("model.layers.0.self_attn.q_proj.weight").
    module: its bitsandbytes Linear4bit. mask: the weight's mask (any encoding) over its
    settings.numel entries, on the weight's device. delta: (mask nnz,) Parameter in the
    compute dtype, registered on the module as "seat_delta". settings: its quantization.
    switch: shared by the handle's targets (off inside handle.reference()).

    For the code written for float targets it also answers as one: ``param`` is the
    trained Parameter (the delta), ``idx`` that Parameter's optimizer mask (every entry:
    seat.masks.FullMask), ``original`` its base values (zeros, made on request: the base
    of a delta is no delta).
    """

    name: str
    module: torch.nn.Module
    mask: object
    delta: torch.nn.Parameter
    settings: QuantSettings
    switch: Switch
    _replaced: tuple[str, object] | None = None  # (forward attribute, its value before) while installed
    _full: object = None

    @classmethod
    def create(cls, name: str, module: torch.nn.Module, mask, settings: QuantSettings, switch: Switch) -> "QuantTarget":
        from ..masks import mask_nnz

        device = module.weight.device
        delta = torch.nn.Parameter(torch.zeros(mask_nnz(mask), dtype=_dtype(settings.compute_dtype), device=device))
        return cls(name, module, mask, delta, settings, switch)

    # -- the float Target's interface
    @property
    def param(self) -> torch.nn.Parameter:
        return self.delta

    @property
    def idx(self):
        if self._full is None:
            self._full = _full_mask(self.delta.numel(), self.delta.device)
        return self._full

    @property
    def original(self) -> Tensor:
        return torch.zeros_like(self.delta)

    @property
    def weight_mask(self):
        return self.mask

    @property
    def weight_numel(self) -> int:
        return self.settings.numel

    # -- routing
    def install(self) -> None:
        """Register the delta on the module and route its forward through the effective
        weight. A forward already replaced on the instance by accelerate's hooks (device
        maps) is kept: seat replaces the original forward they call instead."""
        m = self.module
        if hasattr(m, DELTA_NAME):
            raise ValueError(f"{self.name}: its module already has an attribute {DELTA_NAME!r} (patched by another "
                             "seat handle, or a copy of a patched model): load the model again")
        attr = "_old_forward" if "_old_forward" in m.__dict__ else "forward"
        if attr == "forward" and "forward" in m.__dict__:
            raise ValueError(f"{self.name}: its Linear4bit's forward was already replaced on the instance (another "
                             "library's patch); seat.patch needs the plain bitsandbytes layer")
        m.register_parameter(DELTA_NAME, self.delta)
        self._replaced = (attr, m.__dict__.get(attr))
        m.__dict__[attr] = functools.partial(_forward, self)

    def uninstall(self) -> None:
        """Undo install(): the module's own forward and no delta (idempotent)."""
        if self._replaced is None:
            return
        attr, before = self._replaced
        m = self.module
        if before is None:
            m.__dict__.pop(attr, None)
        else:
            m.__dict__[attr] = before
        if DELTA_NAME in m._parameters and m._parameters[DELTA_NAME] is self.delta:
            del m._parameters[DELTA_NAME]
        self._replaced = None
