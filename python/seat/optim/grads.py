"""Gradient strategies of SparseAdamW: where a step's compact gradient comes from.

  CompactGrads      (default) a compact gradient buffer per param, (nnz,) of grad_dtype
                    (the state dtype, or bfloat16): the post-accumulate-grad hook adds
                    p.grad's masked entries to it (seat.ops.masked_gather_, any mask
                    encoding, fp32 or bf16 buffer alike) and frees p.grad, so at most one
                    dense weight gradient is alive at a time during backward.
                    Micro-batches accumulate; step() reads the buffers. A bf16 buffer
                    holds the gradient rounded to nearest even (the kernels upcast it
                    exactly, so the step is the fp32 step of the rounded gradient); on a
                    second micro-batch it turns fp32 for the rest of the step (summing
                    micro-batches in bf16 would round after every one: with accumulation
                    the saving is lost, not the precision) and bf16 again at zero_grad().
  UpdateInBackward  (update_in_backward=True) no buffer at all: the hook gathers into a
                    transient compact gradient (nnz entries of grad_dtype, freed at once),
                    frees p.grad, checks it (nonfinite="raise", see _guards.py) and
                    updates p at once, with the lr its param group has
                    then (the one the scheduler set after the previous step, as in the
                    default mode); state["step"] counts the updates applied, and step()
                    only closes the step. A second backward before step() (gradient
                    accumulation), clip_grad_norm_ (the global norm is known only after
                    every update) and compact_grads=False are refused with an error.

Both hold ``buffers`` (the optimizer's ``_grads``: empty with UpdateInBackward) and
``has_grad`` (per param: a gradient waits in its buffer / p was updated since the last
step()), and answer the optimizer's events: ``on_grad`` (the hook), ``compact_``,
``gradient``, ``zero``, ``clip_list``, ``collect_dense``.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .. import ops
from ..distributed._local import local
from . import _guards
from .state import state_dtype


def grad_hook(optimizer):
    """The post-accumulate-grad hook, holding the optimizer weakly: a hook stored on a
    parameter is invisible to Python's garbage collector, so a strong reference would keep
    a dropped optimizer (and its state) alive as long as the model."""
    ref = weakref.ref(optimizer)

    def hook(p: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._gradients.on_grad(opt, p)

    return hook


class CompactGrads:
    """A persistent compact gradient per param (see the module docstring)."""

    in_backward = False

    def __init__(self, grad_dtype: torch.dtype | None):
        self.grad_dtype = grad_dtype
        self.buffers: dict[Tensor, Tensor] = {}
        self.has_grad: dict[Tensor, bool] = {}

    def dtype(self, p: Tensor) -> torch.dtype:
        return self.grad_dtype or state_dtype(p)

    def add(self, p: Tensor, nnz: int) -> None:
        """A zeroed buffer for p (at construction, and for p's new mask in set_masks)."""
        self.buffers[p] = torch.zeros(nnz, dtype=self.dtype(p), device=p.device)
        self.has_grad[p] = False

    def on_grad(self, opt, p: Tensor) -> None:
        self.compact_(opt, p)
        if opt._sync is not None:
            opt._sync.ready(opt, p)  # data parallel: start p's bucket's all-reduce once it is complete

    def compact_(self, opt, p: Tensor) -> None:
        """Add p.grad's masked entries to p's buffer and free p.grad."""
        self._accumulate(p, local(p.grad), opt._masks[p])
        p.grad = None

    def _accumulate(self, p: Tensor, dense: Tensor, mask) -> None:
        buf = self.buffers[p]
        if self.has_grad[p] and buf.dtype == torch.bfloat16:
            # a second micro-batch: accumulate in fp32 rather than round after every one
            buf = self.buffers[p] = buf.float()
        ops.masked_gather_(buf, dense, mask)
        self.has_grad[p] = True

    def collect_dense(self, opt) -> None:
        """Gather each param's dense .grad that no hook took (compact_grads=False, or a
        .grad assigned without backward) and free it."""
        for p, mask in opt._masks.items():
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("SparseAdamW does not take sparse-layout gradients")
                self._accumulate(p, local(p.grad).contiguous(), mask)
                p.grad = None

    def gradient(self, p: Tensor) -> Tensor:
        return self.buffers[p]

    def zero(self, params) -> None:
        for p, buf in self.buffers.items():
            if buf.dtype != self.dtype(p):  # promoted to fp32 for accumulation: back to bf16
                self.buffers[p] = torch.zeros(buf.numel(), dtype=self.dtype(p), device=buf.device)
            else:
                buf.zero_()
            self.has_grad[p] = False
            p.grad = None

    def clip_list(self) -> list[Tensor]:
        """The buffers holding a gradient (what clip_grad_norm_ norms and scales)."""
        return [g for p, g in self.buffers.items() if self.has_grad[p]]

    def close_step(self) -> None:
        """Nothing to close: zero_grad() empties the buffers."""


class UpdateInBackward:
    """Each param's update inside its gradient hook (see the module docstring)."""

    in_backward = True

    def __init__(self, grad_dtype: torch.dtype | None):
        self.grad_dtype = grad_dtype
        self.buffers: dict[Tensor, Tensor] = {}  # stays empty: no compact gradient between steps
        self.has_grad: dict[Tensor, bool] = {}  # "updated since the last step()"

    def dtype(self, p: Tensor) -> torch.dtype:
        return self.grad_dtype or state_dtype(p)

    def add(self, p: Tensor, nnz: int) -> None:
        self.has_grad[p] = False

    @torch.no_grad()
    def on_grad(self, opt, p: Tensor) -> None:
        """Gather p.grad's masked entries into a transient compact gradient (nnz entries of
        grad_dtype, freed on return), free p.grad, update p now."""
        if self.has_grad[p]:
            p.grad = None
            raise RuntimeError("a second backward before optimizer.step(): update_in_backward=True applies each "
                               "update during backward and cannot accumulate gradients over micro-batches. Call "
                               "optimizer.step() after every backward, or build the optimizer with "
                               "update_in_backward=False (with SeatTrainer: gradient_accumulation_steps=1)")
        if opt._forbidden:
            p.grad = None  # computed while updates are forbidden: never to be applied
            opt._check_updates_allowed()
        mask = opt._masks[p]
        grad = torch.zeros(mask.nnz, dtype=self.dtype(p), device=p.device)
        ops.masked_gather_(grad, local(p.grad), mask)
        p.grad = None
        if opt._sync is not None:
            opt._sync.reduce_now(grad)  # data parallel: every rank applies the summed gradient
        _guards.check_transient(opt, p, grad)
        self.has_grad[p] = True
        opt._update_param(p, grad, *opt._where(p))

    def compact_(self, opt, p: Tensor) -> None:
        raise RuntimeError("update_in_backward=True keeps no compact gradient: the hooks update each "
                           "parameter during backward")

    def collect_dense(self, opt) -> None:
        """Apply the update of each param whose .grad no hook took (assigned without
        backward): what the hook would have done."""
        for p in opt._masks:
            if p.grad is not None:
                self.on_grad(opt, p)

    def gradient(self, p: Tensor) -> Tensor:
        raise RuntimeError("update_in_backward=True keeps no compact gradient (each update is applied "
                           "during backward)")

    def zero(self, params) -> None:
        """No compact gradient to zero: the updates were applied, and only step() allows
        the next backward."""
        for p in params:
            p.grad = None

    def clip_list(self) -> list[Tensor]:
        raise RuntimeError("clip_grad_norm_ is not possible with update_in_backward=True: each parameter is "
                           "updated during backward, before the global norm is known. Build the optimizer "
                           "with update_in_backward=False to clip (with SeatTrainer: max_grad_norm=0 to "
                           "train without clipping)")

    def close_step(self) -> None:
        """The updates of this step were applied during backward: allow the next backward."""
        for p in self.has_grad:
            self.has_grad[p] = False


def gradient_strategy(grad_dtype: torch.dtype | None, update_in_backward: bool):
    """The strategy object of these options."""
    return UpdateInBackward(grad_dtype) if update_in_backward else CompactGrads(grad_dtype)
