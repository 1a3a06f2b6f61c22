"""SparseAdamW: AdamW on the masked entries of each parameter, with compact state.

For a parameter W (any shape, contiguous) and its mask (any seat.masks encoding: int32
sorted unique flat indices into W.view(-1), a bool tensor of W's shape, an IndexMask, a
Block16Mask (2 bytes per trained entry) or an ImplicitMask (a seeded random mask that
stores no indices: 4 bytes per 4096 entries of W)), the optimizer keeps, for the nnz
trained entries only:

  grad        compact gradient, float32 (or grad_dtype), filled by a post-accumulate-grad
              hook, after which the dense W.grad is freed (grads.py)
  exp_avg, exp_avg_sq   float32 (float64 for float64 params), or 8-bit (state.py)
  max_exp_avg_sq        amsgrad only
  master      float32 copy of the entries, when master_weights=True

and steps them with seat.ops.sparse_adamw_. Entries outside the mask never change. Every
combination of mask encoding, state format, gradient dtype and update_in_backward goes
through the same code: the masks are used through the seat.masks.Mask protocol only, and
an encoded mask gives the trajectory of the int32 mask with the same entries bit for bit.

Masks may change during training (`set_masks`, the paper-faithful mode where a random
mask is re-drawn every k steps). With dense_state=True the Adam state is kept full-size,
for every entry of W, so an entry that leaves the mask and comes back finds its moments;
with compact state (the default) kept entries keep theirs and new entries start at zero.
Works with param groups, LR schedulers, state_dict / load_state_dict (the masks travel
with the state, under their encoding's keys; a loaded state dict is checked whole before
anything is replaced, see _checkpoint.py), zero_grad, and gradient clipping on the compact
buffers (clip_grad_norm_). Hyperparameters, their defaults (weight_decay=0.01) and their
per-group keys are torch.optim.AdamW's (see _groups.py for the implementation switches
foreach / capturable / differentiable / fused).

Before writing anything a step checks that updates are allowed (updates_forbidden) and
that the gradients are finite (the `nonfinite` option: raise, skip or apply; see _guards.py).

Lean modes, each optional and combinable; per trained entry the default holds 4 (grad) +
8 (exp_avg, exp_avg_sq) bytes:

  grad_dtype=torch.bfloat16   bf16 compact gradients (2 bytes): the step is the fp32 step
      of the bf16-rounded gradient (relative error <= 2**-9 per entry); see grads.py.
  update_in_backward=True     each parameter's update runs inside its gradient hook, on a
      transient compact gradient: no compact gradient buffer at all; optimizer.step()
      only closes the step. Refuses gradient accumulation, clip_grad_norm_ and
      compact_grads=False; see grads.py.
  state_bits=8                exp_avg / exp_avg_sq stored 8-bit with bitsandbytes
      blockwise quantization (1.016 bytes per entry instead of 4), stepped in chunks of at
      most STATE_CHUNK entries of one parameter through transient fp32 moments; refuses
      amsgrad, dense_state and float64 params; see state.py (and its error bound,
      seat.optim.quantization_error_bound).

A parameter updated alone (update_in_backward, state_bits=8) draws its stochastic-rounding
bits from its own stream (SparseAdamW._param_seed) rather than from its position in a
batched call: with stochastic rounding the trajectory differs from the default mode's,
without it it is the same bit for bit.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from ..distributed._fsdp_state import SHARD
from ..distributed._local import global_norm, local, shard_group
from ..masks import Mask, from_state_dict
from . import _checkpoint, _guards
from ._groups import check_group, scalar
from ._params import resolve_masks, store_mask
from .grads import grad_hook, gradient_strategy
from .state import MOMENTS, state_dtype, state_format


def _part(t: Tensor | None, start: int, stop: int | None) -> Tensor | None:
    return None if t is None else t[start:stop]


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over compact state (see the module docstring).

    Args:
      params: parameters or param groups, as for torch.optim.AdamW.
      masks: the mask of each parameter (any seat.masks encoding, int32 indices or a bool
        tensor of its shape): a mapping param -> mask, or a sequence aligned with the
        parameters in order (flattened over groups).
      lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW (per group),
        defaults included (weight_decay=0.01); lr and betas may be 1-element tensors. eps
        must be > 0.
      foreach, capturable, differentiable, fused: torch.optim.AdamW's implementation
        switches, kept in the groups as torch keeps them; foreach has no effect (the step
        is SparseAdamW's own kernel), the others are refused when set (see _groups.py).
      master_weights: keep an fp32 copy of the masked entries of fp16/bf16 params (per
        group; 4 more bytes per trained entry) so small updates accumulate exactly.
      stochastic_rounding: round bf16 params without a master stochastically (per group),
        seeded by `seed`: unbiased, so small updates are not lost on average.
      compact_grads: install the gradient-compaction hooks (default). When False, step()
        gathers from each param's dense .grad instead (nothing is freed during backward).
      dense_state: keep exp_avg / exp_avg_sq (/ master / max_exp_avg_sq) full-size, for
        masks that are re-drawn (set_masks); costs 8+ bytes per entry of W instead of per
        trained entry.
      grad_dtype: dtype of the compact gradients: None (the state dtype, float32) or
        torch.bfloat16 (lean mode, see the module docstring).
      update_in_backward: apply each parameter's update inside its gradient hook, with no
        compact gradient buffer (lean mode, see the module docstring).
      state_bits: 32 (default) or 8: exp_avg / exp_avg_sq quantized blockwise with
        bitsandbytes (lean mode, see the module docstring).
      nonfinite: what a step does with a NaN or inf gradient: "raise" (default: an error
        naming the step and the parameter, nothing updated), "skip" (nothing updated, a
        warning, `skipped_steps` counts it) or "apply" (no check, as torch.optim.AdamW).
        See _guards.py, also for update_in_backward (checked per parameter; "skip" refused).
      data_parallel: None (one process), or a seat.distributed.DataParallel: the compact
        gradients are all-reduced across the processes of its group (bucketed,
        overlapping backward; see seat.distributed), so every rank steps the same
        parameters with the same gradient. Every rank must build the same optimizer over
        the same masks (checked at construction: a collective). Accumulate micro-batches
        inside no_sync().
    """

    def __init__(self, params, masks: Mapping[Tensor, object] | Sequence[object], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: bool | None = None,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, stochastic_rounding: bool = False, seed: int = 0,
                 compact_grads: bool = True, dense_state: bool = False, grad_dtype: torch.dtype | None = None,
                 update_in_backward: bool = False, state_bits: int = 32, nonfinite: str = "raise",
                 data_parallel=None):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas, eps=eps,
                        weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=True, master_weights=master_weights,
                        stochastic_rounding=stochastic_rounding)
        check_group(defaults, "SparseAdamW")
        _guards.check_option(nonfinite, update_in_backward)
        if grad_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"grad_dtype must be None (the state dtype, float32), torch.float32 or torch.bfloat16; "
                             f"got {grad_dtype}")
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits!r}")
        if update_in_backward and not compact_grads:
            raise ValueError("update_in_backward=True runs the update in the gradient hooks: it needs "
                             "compact_grads=True")
        if state_bits == 8:
            if amsgrad:
                raise ValueError("state_bits=8 does not support amsgrad (its running maximum would need its own "
                                 "quantized array); use amsgrad=False or state_bits=32")
            if dense_state:
                raise ValueError("state_bits=8 keeps compact state only: use dense_state=False or state_bits=32")
        if data_parallel is not None:  # before any hook is registered on the params
            from ..distributed._sync import check_config

            check_config(data_parallel, compact_grads)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):  # a group's own values bypass the defaults' check
            check_group(group, f"param group {i}")
            if state_bits == 8 and group["amsgrad"]:
                raise ValueError(f"param group {i}: state_bits=8 does not support amsgrad")
        self.nonfinite = nonfinite
        self.skipped_steps = 0  # steps skipped for a non-finite gradient (nonfinite="skip")
        self._forbidden: list[tuple[object, str]] = []  # (token, reason) of each active updates_forbidden
        self.seed = int(seed)
        self.compact_grads = compact_grads
        self.dense_state = dense_state
        self.grad_dtype = grad_dtype
        self.update_in_backward = update_in_backward
        self.state_bits = state_bits
        all_params = [p for group in self.param_groups for p in group["params"]]
        repeated = [i for i, p in enumerate(all_params) if any(q is p for q in all_params[:i])]
        if repeated:  # (torch only warns; here it would get two hooks and two updates)
            raise ValueError(f"the parameter(s) at position {repeated} appear more than once: give each "
                             "parameter once")
        self._masks: dict[Tensor, Mask] = resolve_masks(all_params, masks)
        # FSDP2-sharded params: the process group whose ranks hold the other shards (the
        # gradient norm and the non-finite check span them), else None
        self._shard_group = shard_group(all_params, data_parallel)
        self._shards: dict = {}  # param -> seat.distributed._fsdp.ShardInfo (set by handle.optimizer())
        if grad_dtype == torch.bfloat16 or state_bits == 8:
            fp64 = [i for i, p in enumerate(all_params) if p.dtype == torch.float64]
            if fp64:
                mode = "grad_dtype=torch.bfloat16" if grad_dtype == torch.bfloat16 else "state_bits=8"
                raise ValueError(f"{mode} is a lean mode for float32 state; params at position {fp64} are float64 "
                                 "(whose state is float64): leave them to an optimizer without it")
        self._format = state_format(state_bits)  # how exp_avg / exp_avg_sq are stored (state.py)
        self._gradients = gradient_strategy(grad_dtype, update_in_backward)  # where grads come from (grads.py)
        self._grads: dict[Tensor, Tensor] = self._gradients.buffers
        self._has_grad: dict[Tensor, bool] = self._gradients.has_grad
        self._hooks = []
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param(p, group)
        self._sync = None  # the data-parallel synchronization (seat.distributed), if any
        if data_parallel is not None:
            from ..distributed import GradSync

            try:
                self._sync = GradSync(self, data_parallel)
            except BaseException:  # (ranks that differ) a refused optimizer leaves no hook on the params
                self.remove_hooks()
                raise

    # ------------------------------------------------------------------ copy / pickle
    # torch.optim.Optimizer pickles defaults, state and param_groups only; these are the
    # rest of what a SparseAdamW is (hooks are not pickled: they are registered anew).
    # (An updates_forbidden block belongs to the original's caller: a copy starts without.)
    _OWN = ("seed", "compact_grads", "dense_state", "grad_dtype", "update_in_backward", "state_bits", "_masks",
            "_format", "_gradients", "nonfinite", "skipped_steps")
    _OWN_DEFAULTS = {"nonfinite": "apply", "skipped_steps": 0}  # copies pickled before these existed

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._OWN})
        # the masks as their state dicts (what checkpoints hold): a Mask object's caches
        # need not pickle (plain pickle cannot write a uint16 tensor, e.g.)
        state["_masks"] = {p: mask.state_dict() for p, mask in self._masks.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        """copy.deepcopy / pickle: the copy owns copies of the params (as torch's
        optimizers do) and gets its own gradient hooks on them."""
        own = {k: state.pop(k) if k in state else self._OWN_DEFAULTS[k] for k in self._OWN}
        super().__setstate__(state)
        own["_masks"] = {p: m if isinstance(m, Mask) else from_state_dict(m, local(p).numel())
                         for p, m in own["_masks"].items()}
        self.__dict__.update(own)
        self._forbidden = []
        self._sync = None  # a process group does not travel: a copy trains on its own
        self._shard_group, self._shards = None, {}
        self._grads, self._has_grad = self._gradients.buffers, self._gradients.has_grad
        self._hooks = []
        if self.compact_grads:
            for p in self._masks:
                self._hooks.append(p.register_post_accumulate_grad_hook(grad_hook(self)))

    @property
    def _qmaps(self) -> dict:
        """The 8-bit code books, {device: {key: map}} (empty with state_bits=32)."""
        return self._format.code_books

    # ------------------------------------------------------------------ set-up
    def add_param_group(self, param_group: dict) -> None:
        """torch's, during construction only: a param needs its mask and state, which only
        the constructor sets up."""
        if hasattr(self, "_masks"):
            raise RuntimeError("SparseAdamW takes its params and their masks at construction: build a new "
                               "SparseAdamW over all the params instead of adding a param group")
        super().add_param_group(param_group)

    def _init_param(self, p: Tensor, group: dict) -> None:
        mask = self._masks[p]
        dtype = state_dtype(p)
        size = local(p).numel() if self.dense_state else mask.nnz
        state = self.state[p]
        state["step"] = 0
        store_mask(state, mask)
        self._format.init(state, size, dtype, p.device)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros(size, dtype=dtype, device=p.device)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
            flat = local(p).detach().view(-1)
            state["master"] = (flat if self.dense_state else flat[mask.indices().long()]).to(dtype)
        self._gradients.add(p, mask.nnz)
        if self.compact_grads:
            self._hooks.append(p.register_post_accumulate_grad_hook(grad_hook(self)))

    def dequantized_state(self, p: Tensor) -> dict[str, Tensor]:
        """exp_avg / exp_avg_sq of p as fp32 (nnz,) tensors, whatever the storage (copies
        when 8-bit, the state tensors themselves otherwise)."""
        return self._format.dequantized(self.state[p])

    @torch.no_grad()
    def set_masks(self, masks: Mapping[Tensor, object] | Sequence[object]) -> None:
        """Replace the masks (e.g. re-draw a random mask). Call between steps, after
        zero_grad(). Compact state follows the entries that stay in the mask and starts at
        zero for new ones; full-size state (dense_state=True) is kept as it is."""
        if any(self._has_grad.values()):
            raise RuntimeError("set_masks with accumulated gradients would drop them: call it after "
                               "optimizer.step() and zero_grad()")
        params = [p for group in self.param_groups for p in group["params"]]
        for p, new_mask in resolve_masks(params, masks).items():
            state = self.state[p]
            new_idx = new_mask.indices()  # encoded masks materialized for the move only
            self._format.to_fp32(state)  # 8-bit: the moments as fp32 while they move
            if not self.dense_state:
                old_idx = self._masks[p].indices()
                # where each new entry sat in the old compact arrays (both are sorted)
                where = torch.searchsorted(old_idx, new_idx).clamp_(max=max(old_idx.numel() - 1, 0))
                kept = old_idx[where] == new_idx if old_idx.numel() else torch.zeros_like(new_idx, dtype=torch.bool)
                for key in (*MOMENTS, "max_exp_avg_sq", "master"):
                    if key in state:
                        fresh = (local(p).detach().view(-1)[new_idx.long()].to(state[key].dtype) if key == "master"
                                 else torch.zeros(new_idx.numel(), dtype=state[key].dtype, device=p.device))
                        fresh[kept] = state[key][where[kept]]
                        state[key] = fresh
            store_mask(state, new_mask)
            self._masks[p] = new_mask
            if p in self._shards and self._shards[p].spec is not None:
                # FSDP2: the whole mask is no longer the one a spec defined at sharding;
                # whole_state_dict gathers the ranks' positions instead
                self._shards[p] = dataclasses.replace(self._shards[p], spec=None)
            self._format.from_fp32(state)
            self._gradients.add(p, new_mask.nnz)  # a compact gradient buffer of the new size, if any
        if self._sync is not None:
            self._sync.plan(self)  # new sizes: new buckets (and every rank must have drawn the same masks)

    def remove_hooks(self) -> None:
        """Stop compacting gradients (e.g. before handing the model to another optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.compact_grads = False

    # ------------------------------------------------------------------ gradients
    def compact_grad(self, p: Tensor) -> Tensor:
        """The compact gradient buffer of p ((nnz,), float32, or grad_dtype)."""
        return self._gradients.gradient(p)

    def compact_(self, p: Tensor) -> None:
        """Add p.grad's masked entries to p's compact gradient and free p.grad (what the
        post-accumulate-grad hook runs after each backward)."""
        self._gradients.compact_(self, p)

    def _update_in_backward_(self, p: Tensor) -> None:
        """What the post-accumulate-grad hook runs (with update_in_backward=True: gather
        p.grad's masked entries into a transient compact gradient, free p.grad, update p)."""
        self._gradients.on_grad(self, p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the compact gradients (and drop any dense .grad). With
        update_in_backward=True there is none to zero: the updates were applied, and only
        step() allows the next backward."""
        if self._sync is not None:
            self._sync.discard(self)
        self._gradients.zero(list(self._masks))

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside the block accumulate compact gradients without
        communicating (data_parallel); the first backward after it sends the sums, so a
        step of k micro-batches communicates once. Without data_parallel it does nothing."""
        if self._sync is None:
            yield
            return
        self._sync.paused += 1
        try:
            yield
        finally:
            self._sync.paused -= 1

    @property
    def data_parallel(self):
        """The seat.distributed.GradSync of this optimizer (its byte counters), or None."""
        return self._sync

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the compact gradients (the masked entries
        are the only ones trained, so this is the norm of the effective gradient)."""
        if not self._gradients.in_backward:  # (in backward mode clip_list refuses: nothing is applied)
            self._gradients.collect_dense(self)
            if self._sync is not None:
                self._sync.finish(self)  # the norm of the global gradient
        grads = self._gradients.clip_list()
        sharded = self._shard_group is not None  # every rank joins the norm's all-reduce
        if not grads and not sharded:
            return torch.tensor(0.0)
        # torch's helpers: the same norm and clip coefficient as clip_grad_norm_; bf16
        # buffers are normed in fp32 (per tensor, so no fp32 copy of them exists)
        norms = grads if all(g.dtype != torch.bfloat16 for g in grads) else [
            torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads]
        total = (torch.nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite and not sharded) if grads
                 else torch.zeros(()))
        if sharded:  # the norm of the whole gradient, from every rank's shards
            total = global_norm(total, norm_type, self._shard_group)
            if error_if_nonfinite and not bool(torch.isfinite(total)):
                raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot "
                                   "be clipped; pass error_if_nonfinite=False to clip anyway")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    # ------------------------------------------------------------------ step
    @contextmanager
    def updates_forbidden(self, reason: str) -> Iterator[None]:
        """Inside the block, step() and the update-in-backward hooks raise
        RuntimeError(reason) before writing anything (e.g. while the model holds its base
        values: an update then would be applied to the wrong weights). Nests (the innermost
        reason is raised) and ends on any exit. Gradient compaction is not an update and goes
        on; an update-in-backward hook drops the gradient it refused."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"updates_forbidden needs a non-empty reason string (the error it raises); got {reason!r}")
        token = object()
        self._forbidden.append((token, reason))
        try:
            yield
        finally:
            self._forbidden = [entry for entry in self._forbidden if entry[0] is not token]

    def _check_updates_allowed(self) -> None:
        if self._forbidden:
            raise RuntimeError(self._forbidden[-1][1])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step of every param with a gradient (see the class docstring); checks
        first that updates are allowed and (nonfinite) that the gradients are finite."""
        self._check_updates_allowed()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # a .grad no hook has taken (assigned by hand, or compact_grads=False) is used, as
        # torch.optim does: gathered into the compact gradient, or applied now in backward mode
        self._gradients.collect_dense(self)
        if self._sync is not None:
            self._sync.finish(self)
        if self._gradients.in_backward:  # the updates were applied during backward
            self._gradients.close_step()
            return loss
        if not _guards.gate(self, [p for group in self.param_groups for p in group["params"] if self._has_grad[p]]):
            return loss
        for group_index, group in enumerate(self.param_groups):
            ready = [(position, p) for position, p in enumerate(group["params"]) if self._has_grad[p]]
            if not self._format.whole:  # state stepped in chunks: one param at a time
                for position, p in ready:
                    self._update_param(p, self._grads[p], group_index, position, group)
                continue
            batches: dict[int, list[Tensor]] = defaultdict(list)  # by step number after incrementing
            for _, p in ready:
                self.state[p]["step"] += 1
                batches[self.state[p]["step"]].append(p)
            seed = (self.seed * 1_000_003 + group_index) % 2**63
            for step, params in batches.items():
                by_encoding: dict[str, list[Tensor]] = defaultdict(list)  # one sparse_adamw_ call takes one
                for p in params:
                    by_encoding[self._masks[p].encoding].append(p)
                for ps in by_encoding.values():
                    self._adamw(ps, [self._grads[p] for p in ps], self._hyper(group, step, seed))
        return loss

    def _hyper(self, group: dict, step: int, seed: int) -> dict:
        beta1, beta2 = (scalar(b) for b in group["betas"])
        return dict(lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=scalar(group["eps"]),
                    weight_decay=scalar(group["weight_decay"]), step=step, maximize=group["maximize"],
                    stochastic_rounding=group["stochastic_rounding"], seed=seed, dense_state=self.dense_state)

    def _param_seed(self, group_index: int, position: int) -> int:
        """Stochastic-rounding seed of one parameter updated alone (update_in_backward,
        state_bits=8): its own stream, since its tensor index in the call is always 0."""
        return ((self.seed * 1_000_003 + group_index) * 1_000_003 + position + 1) % 2**63

    def _where(self, p: Tensor) -> tuple[int, int, dict]:
        for group_index, group in enumerate(self.param_groups):
            for position, q in enumerate(group["params"]):
                if q is p:
                    return group_index, position, group
        raise KeyError("parameter not in this optimizer")

    def _update_param(self, p: Tensor, grad: Tensor, group_index: int, position: int, group: dict) -> None:
        """One AdamW step of p alone from its compact gradient `grad` (advances state["step"])."""
        state = self.state[p]
        state["step"] += 1
        self._adamw([p], [grad], self._hyper(group, state["step"], self._param_seed(group_index, position)))

    def _adamw(self, ps: list[Tensor], grads: list[Tensor], hyper: dict) -> None:
        """AdamW on params ps (masks of one encoding) from their compact gradients, one
        sparse_adamw_ call per span of the state format: every param whole for fp32 state,
        chunks of one param for 8-bit state."""
        for start, stop in self._format.spans([self._masks[p].nnz for p in ps]):
            self._adamw_span(ps, grads, start, stop, hyper)

    def _adamw_span(self, ps: list[Tensor], grads: list[Tensor], start: int, stop: int | None, hyper: dict) -> None:
        """Entries [start, stop) of each of ps. A method of its own so that a chunk's
        transients (its mask's indices where the encoding has to materialize them, its
        fp32 moments) are gone before the next chunk's exist."""
        masks = [self._masks[p] for p in ps]
        masks = [m if stop is None or (start, stop) == (0, m.nnz) else m.chunk(start, stop) for m in masks]
        states = [self.state[p] for p in ps]
        with ExitStack() as stack:
            moments = [stack.enter_context(self._format.moments(s, start, stop)) for s in states]
            ops.sparse_adamw_([local(p) for p in ps], masks, [g[start:stop] for g in grads], [m for m, _ in moments],
                              [v for _, v in moments], [_part(s.get("master"), start, stop) for s in states],
                              [_part(s.get("max_exp_avg_sq"), start, stop) for s in states], **hyper)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's optimizer state dict (each param's state holds its mask) plus
        "skipped_steps" (nonfinite="skip")."""
        out = super().state_dict()
        out["skipped_steps"] = self.skipped_steps
        if self._shard_group is not None:  # one rank's slots of a sharded model (see whole_state_dict)
            out[SHARD] = True
        return out

    def whole_state_dict(self) -> dict | None:
        """The state dict of the whole weights: state_dict() for one process; on a model
        sharded with seat.distributed.shard, every rank's slots gathered to rank 0 in the
        one-process format (None on the other ranks; a collective every rank calls), which
        load_state_dict takes on any number of ranks, sharded or not."""
        if self._shard_group is None:
            return self.state_dict()
        from ..distributed._fsdp_state import whole_state_dict

        return whole_state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by state_dict(). The whole dict is checked before anything
        is replaced (see _checkpoint.py: group count and sizes, hyperparameters, each
        param's state keys for this optimizer's mode, their shapes and dtypes, steps, and
        the masks, which must equal this optimizer's); a refused dict leaves the optimizer
        as it was. Unlike torch's base class, compact state keeps its own dtype (fp32)
        instead of being cast to the param's (e.g. bf16). A group key the dict lacks takes
        torch.optim.AdamW's default (maximize=False, ...), as torch's AdamW does."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # as torch's load_state_dict
            state_dict = pre_hook(self, state_dict) or state_dict
        if self._shard_group is not None and isinstance(state_dict, dict) and not state_dict.get(SHARD):
            from ..distributed._fsdp_state import local_state_dict  # a whole dict: this rank's slots of it

            state_dict = local_state_dict(self, state_dict)
        state_dict = {k: v for k, v in state_dict.items() if k != SHARD} if isinstance(state_dict, dict) else state_dict
        state, groups, skipped = _checkpoint.read(self, state_dict)
        self.state = state
        for group, loaded in zip(self.param_groups, groups):
            kept = {k: group[k] for k in ("params", "param_names") if k in group and k not in loaded}
            group.clear()
            group.update(loaded, **kept)  # as torch: the saved group, with this one's params (and names)
        self.skipped_steps = skipped
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def state_bytes(self) -> int:
        """Bytes held persistently by the optimizer for its params: state (8-bit codes and
        their absmax when state_bits=8), masks and compact grads (none with
        update_in_backward; bf16 ones with grad_dtype=torch.bfloat16). Transients of a
        step are not included: one parameter's compact gradient during its hook
        (update_in_backward), fp32 moments of one chunk of one parameter (state_bits=8;
        with an ImplicitMask also that chunk's int32 indices)."""
        total = 0
        for p, state in self.state.items():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
            if p in self._grads:
                total += self._grads[p].numel() * self._grads[p].element_size()
        return total
