"""The per-row kernel behind kl_div, paired_loss and fused_linear_paired_loss, and the
torch glue around it (dtypes, denominators, the final reduction).

Every backend provides one kernel, `paired_rows`:

    per_row, grad = rows(logits, labels, ref_logits, kl_valid, scales, temperature,
                         ignore_index, reverse, compute_grad)

  logits     (N_ce + N_kl, V) float16 / bfloat16 / float32 (or float64 with float64 ref)
  labels     (N_ce,) int64: the first N_ce rows are cross-entropy rows (ignore_index: 0)
  ref_logits (N_kl, V) float16 / bfloat16 / float32 (float64 with float64 logits)
  kl_valid   (N_kl,) bool, or empty for "every KL row counts"
  scales     (2,) accumulation dtype: multipliers of the CE and the KL row gradients
  per_row    (N_ce + N_kl,) float32 (float64 for float64 inputs): the row losses, 0 for
             ignored / masked rows
  grad       (N_ce + N_kl, V) logits' dtype (empty unless compute_grad): the row
             gradients times scales, 0 for ignored / masked rows

One pass per row computes the online log-softmax of both inputs and the loss, a second
pass writes the gradient (see csrc/include/seat/kl_div.h for the formulas). The sum over
rows and the division by the denominator happen here, in torch, on the (N,) vector:
deterministic, and without a host sync (denominators stay on the device).
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

RowsKernel = Callable[..., "tuple[Tensor, Tensor]"]

# The kernels multiply logits by 1/temperature in float32 (for float32 and lower inputs):
# below this, 1/temperature is inf there.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def finite_scalar(name: str, value: float, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """value is a finite number > minimum (>= with inclusive): inf and NaN would turn
    every row into inf / NaN (or 0 * inf) instead of being reported."""
    ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}; got {value}")
    return value


def check_num_items(name: str, num_items: float, temperature: float = 1.0) -> float:
    """num_items finite, > 0, and large enough that the gradient scale 1/(num_items *
    temperature) is a finite float32 (an inf scale would turn zero gradients into NaN)."""
    finite_scalar(name, num_items)
    if num_items * temperature < MIN_TEMPERATURE:
        what = name if temperature == 1.0 else f"{name} * temperature"
        raise ValueError(
            f"{what} must be >= {MIN_TEMPERATURE:.3g} (the gradient is scaled by 1/{what}, which must be a finite "
            f"float32); got {num_items}" + ("" if temperature == 1.0 else f" * {temperature}")
        )
    return num_items


def check_temperature(temperature: float) -> float:
    """temperature finite, > 0, and large enough that 1/temperature is a finite float32."""
    finite_scalar("temperature", temperature)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.3g} (1/temperature must be a finite float32); "
            f"got {temperature}"
        )
    return temperature


def native_rows(logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse, compute_grad):
    """The C++ CPU / CUDA kernel (seat._C, csrc/cpu/kl_div.cpp, csrc/cuda/kl_div.cu)."""
    return torch.ops.seat_C.paired_rows(logits, labels, ref_logits, kl_valid, scales, float(temperature),
                                        int(ignore_index), bool(reverse), bool(compute_grad))


def triton_rows(logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse, compute_grad):
    """The Triton kernel (seat_kernels/kl_div.py)."""
    from seat_kernels.kl_div import paired_rows

    return paired_rows(logits, labels, ref_logits, kl_valid, scales, temperature, ignore_index, reverse,
                       compute_grad)


def accum_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kernel_inputs(logits: Tensor, ref: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """(logits, ref, accumulation dtype) as the kernels take them: a float64 input makes
    both float64 (the kernels accumulate float64 only for float64 pairs); other dtype
    mixes go to the kernels as they are (they accumulate in float32)."""
    acc = accum_dtype(logits, ref)
    if acc == torch.float64:
        logits, ref = logits.to(acc), ref.to(acc)
    return logits, ref, acc


def denominator(valid: Optional[Tensor], n_rows: int, reduction: str, num_items: Optional[float],
                dtype: torch.dtype, device: torch.device) -> Tensor:
    """What the summed loss is divided by, as a 0-d tensor on `device` (no host sync):
    1 for "sum"/"none", num_items if given, else the number of valid rows (at least 1)."""
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if num_items is not None:
        return torch.full((), float(num_items), dtype=dtype, device=device)
    if valid is None:
        return torch.full((), float(max(n_rows, 1)), dtype=dtype, device=device)
    return valid.sum().clamp(min=1).to(dtype)


def grad_scales(ce_denom: Tensor, kl_denom: Tensor, temperature: float) -> Tensor:
    """(2,) multipliers of the CE and KL row gradients: 1/denominator, and 1/T for KL."""
    return torch.stack([ce_denom.reciprocal(), (kl_denom * temperature).reciprocal()]).contiguous()


def empty_labels(device) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


def empty_mask(device) -> Tensor:
    return torch.empty(0, dtype=torch.bool, device=device)


def hands_on_saved_grad(ctx, scale) -> bool:
    """The backward may return the saved row gradient itself (detached), skipping the
    N x V pass of `grad * scale` and its new tensor: scale a plain 0-d tensor exactly 1
    (loss.backward() on a mean or a sum) on the CPU (a CUDA scale would need a host sync),
    outside compiled graphs and functorch transforms, and only where nothing else can see
    the buffer afterwards: the op was called through seat's wrapper, which drops its
    gradient output (ctx.hand_on_allowed), no saved-tensor hooks were active (they could
    keep the tensor), the output object is gone (a weak reference), and the graph is not
    kept (retain_graph=False: autograd frees the saved tensor right after this backward,
    so a consumer may take the buffer over, e.g. as a leaf's .grad)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if not (getattr(ctx, "hand_on_allowed", False) and ctx.grad_output_ref() is None
            and keep_graph is not None and not keep_graph()
            and type(scale) is Tensor and scale.device.type == "cpu" and scale.dim() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(scale)
            and not torch.compiler.is_compiling()):
        return False
    try:
        return scale.item() == 1.0
    except RuntimeError:  # a batched output gradient (is_grads_batched) has no single value
        return False


_WRAPPER_CALL = threading.local()


@contextlib.contextmanager
def wrapper_call():
    """Around the op call in seat's public wrapper, which discards the op's gradient
    output: the op's backward may then hand its saved gradient on (hands_on_saved_grad)."""
    previous = getattr(_WRAPPER_CALL, "active", False)
    _WRAPPER_CALL.active = True
    try:
        yield
    finally:
        _WRAPPER_CALL.active = previous


def keep_grad_output_ref(ctx, grad_output: Tensor) -> None:
    """Record in setup_context what hands_on_saved_grad needs to know of the forward."""
    ctx.grad_output_ref = weakref.ref(grad_output)
    ctx.hand_on_allowed = (getattr(_WRAPPER_CALL, "active", False)
                           and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)
