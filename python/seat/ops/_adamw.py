"""AdamW math shared by sparse_adamw_ (compact state) and masked_adamw_ (dense mask),
and the counter-based random bits of stochastic rounding.

Every backend computes the same per-element step (csrc/include/seat/adamw.h for C++ and
CUDA, seat_kernels/adamw_math.py for Triton); this file is the torch version the
references use and the host-side scalars every kernel receives.

Stochastic rounding (bf16 params without a master copy): the fp32 result's bit pattern
gets 16 random low bits added and is then truncated to bf16, so it rounds up with
probability equal to the fraction it lies above the lower bf16 neighbour (unbiased).
The random bits of element `pos` (its flat index in the param) of the i-th tensor of a
call at a given step are mix32(key_i ^ mix32(pos)), key_i = mix32(step_key ^ mix32(i)),
step_key = mix32(seed_key ^ mix32(step)): identical on every backend, so a seeded run is
reproducible whichever kernel runs it.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # odd and < 2**31: products with a 32-bit value fit in int64


def mix32(x: int) -> int:
    """32-bit integer hash (Mueller's), on Python ints."""
    x &= M32
    x = (((x >> 16) ^ x) * _MIX) & M32
    x = (((x >> 16) ^ x) * _MIX) & M32
    return (x >> 16) ^ x


def mix32_tensor(x: Tensor) -> Tensor:
    """mix32 on an int64 tensor holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MIX & M32
    x = ((x >> 16) ^ x) * _MIX & M32
    return (x >> 16) ^ x


def step_key(seed: int, step: int) -> int:
    seed_key = mix32((seed & M32) ^ mix32((seed >> 32) & M32))
    return mix32(seed_key ^ mix32(step))


def random_bits(step_key_: int, tensor_index: int, pos: Tensor) -> Tensor:
    """int64 tensor of 32-bit random values for the flat positions `pos`."""
    key = mix32(step_key_ ^ mix32(tensor_index))
    return mix32_tensor(key ^ mix32_tensor(pos.long() & M32))


def round_bf16_stochastic(value: Tensor, bits: Tensor) -> Tensor:
    """fp32 -> bf16, rounding up with probability equal to the truncated fraction."""
    pattern = value.float().view(torch.int32).long() & M32
    pattern = (pattern + (bits & 0xFFFF)) & 0xFFFF0000
    signed = torch.where(pattern >= 2**31, pattern - 2**32, pattern).to(torch.int32)
    return signed.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


@dataclasses.dataclass(frozen=True)
class AdamWScalars:
    """Host-side scalars of one AdamW step (computed in double, as torch does)."""

    decay: float  # 1 - lr * weight_decay
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)

    @classmethod
    def of(cls, *, lr, beta1, beta2, eps, weight_decay, step) -> "AdamWScalars":
        return cls(decay=1 - lr * weight_decay, one_minus_beta1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                   eps=eps, step_size=lr / (1 - beta1**step), bias_correction2_sqrt=math.sqrt(1 - beta2**step))

    def as_tuple(self) -> tuple[float, ...]:
        """The 7 scalars in field order: what the native kernels take (seat/adamw.h).
        Spelled out: dataclasses.astuple deep-copies, which costs more than a small step."""
        return (self.decay, self.one_minus_beta1, self.beta2, self.one_minus_beta2, self.eps, self.step_size,
                self.bias_correction2_sqrt)

    def as_tensor(self, device) -> Tensor:
        """float64 (7,) in field order, for kernels that read their scalars from memory."""
        return torch.tensor(self.as_tuple(), dtype=torch.float64).to(device, non_blocking=True)


def adamw_update(weight: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Tensor | None,
                 s: AdamWScalars, maximize: bool) -> Tensor:
    """One AdamW step in the state dtype, in torch.optim.AdamW's order of operations.
    Updates exp_avg, exp_avg_sq (and max_exp_avg_sq) in place; returns the new weight."""
    g = -grad if maximize else grad
    weight = weight * s.decay
    exp_avg.lerp_(g, s.one_minus_beta1)
    exp_avg_sq.mul_(s.beta2).addcmul_(g, g, value=s.one_minus_beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second = max_exp_avg_sq
    denom = (second.sqrt() / s.bias_correction2_sqrt).add_(s.eps)
    return weight.addcdiv_(exp_avg, denom, value=-s.step_size)


def to_param_dtype(weight: Tensor, dtype: torch.dtype, stochastic: bool, step_key_: int, tensor_index: int,
                   pos: Tensor) -> Tensor:
    """The new weight in the param's dtype: stochastic rounding for bf16 when asked."""
    if stochastic and dtype == torch.bfloat16:
        return round_bf16_stochastic(weight, random_bits(step_key_, tensor_index, pos))
    return weight.to(dtype)
