"""SparseAdamW: AdamW on the masked entries of each parameter, with compact state.

For a parameter W (any shape, contiguous) and its mask idx (1-D int32 flat indices into
W.view(-1), sorted, unique; see seat.masks), the optimizer keeps, for the nnz entries only:

  grad        float32 compact gradient, filled by a post-accumulate-grad hook
              (masked_gather_), after which the dense W.grad is freed: during backward at
              most one dense weight gradient is alive at a time. Micro-batches accumulate.
  exp_avg, exp_avg_sq   float32 (float64 for float64 params)
  max_exp_avg_sq        amsgrad only
  master      float32 copy of the entries, when master_weights=True

and steps them with seat.ops.sparse_adamw_ (one kernel launch per param group and dtype).
Entries outside the mask never change.

Masks may change during training (`set_masks`, the paper-faithful mode where a random
mask is re-drawn every k steps). With dense_state=True the Adam state is kept full-size,
for every entry of W, so an entry that leaves the mask and comes back finds its moments;
with compact state (the default) kept entries keep theirs and new entries start at zero.
A mask may be given as int32 indices, as a bool tensor of W's shape, as a
seat.masks.ImplicitMask (a seeded random mask that stores no indices: 4 bytes per 4096
entries of W instead of 4 per trained entry; its state_dict entry is the mask's spec) or
as a seat.masks.Block16Mask (any mask in 2 bytes per trained entry). Works with param groups, LR schedulers,
state_dict / load_state_dict (the masks travel with the state and are checked on load),
zero_grad, and gradient clipping on the compact buffers (clip_grad_norm_).
"""
from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from itertools import chain
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import ops
from .masks import Block16Mask, ImplicitMask, mask_gather_, mask_indices, mask_nnz
from .ops import _checks


def _compact_hook(optimizer: "SparseAdamW"):
    """The post-accumulate-grad hook, holding the optimizer weakly: a hook stored on a
    parameter is invisible to Python's garbage collector, so a strong reference would keep
    a dropped optimizer (and its state) alive as long as the model."""
    ref = weakref.ref(optimizer)

    def hook(p: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt.compact_(p)

    return hook


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _check_param(name: str, param: Tensor) -> None:
    if not isinstance(param, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(param).__name__}")
    if param.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {param.dtype}")
    if not param.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the mask indexes its flat storage; "
                         "make the parameter contiguous before building its mask")
    if not param.is_leaf or not param.requires_grad:
        raise ValueError(f"{name} must be a leaf tensor with requires_grad=True (a trainable parameter)")


_MASK_KEYS = ("idx", "implicit_mask", "block_offsets", "block_starts", "offsets")


def _store_mask(state: dict, mask) -> None:
    """The mask in a param's state (what state_dict saves and load_state_dict compares):
    "idx" for int32 indices; "implicit_mask" (its spec) and "block_offsets" for an
    ImplicitMask; "block_starts" and "offsets" for a Block16Mask."""
    for k in _MASK_KEYS:
        state.pop(k, None)
    if isinstance(mask, ImplicitMask):
        state["implicit_mask"] = mask.spec()
        state["block_offsets"] = mask.block_offsets
    elif isinstance(mask, Block16Mask):
        state["block_starts"], state["offsets"] = mask.block_starts, mask.offsets
    else:
        state["idx"] = mask


def _same_mask(saved: dict, mask) -> bool:
    """Whether the mask saved in a state entry is `mask`."""
    if isinstance(mask, ImplicitMask):
        return saved.get("implicit_mask") == mask.spec()
    if isinstance(mask, Block16Mask):
        starts, offsets = saved.get("block_starts"), saved.get("offsets")
        return (isinstance(starts, Tensor) and isinstance(offsets, Tensor) and offsets.dtype == torch.uint16
                and torch.equal(starts, mask.block_starts)
                and torch.equal(offsets.view(torch.int16), mask.offsets.view(torch.int16)))
    idx = saved.get("idx")
    return isinstance(idx, Tensor) and torch.equal(idx, mask)


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over compact state (see the module docstring).

    Args:
      params: parameters or param groups, as for torch.optim.AdamW.
      masks: the mask of each parameter: a mapping param -> idx, or a sequence aligned
        with the parameters in order (flattened over groups).
      lr, betas, eps, weight_decay, amsgrad, maximize: as torch.optim.AdamW (per group).
      master_weights: keep an fp32 copy of the masked entries of fp16/bf16 params (per
        group; 4 more bytes per trained entry) so small updates accumulate exactly.
      stochastic_rounding: round bf16 params without a master stochastically (per group),
        seeded by `seed`: unbiased, so small updates are not lost on average.
      compact_grads: install the gradient-compaction hooks (default). When False, step()
        gathers from each param's dense .grad instead (nothing is freed during backward).
      dense_state: keep exp_avg / exp_avg_sq (/ master / max_exp_avg_sq) full-size, for
        masks that are re-drawn (set_masks); costs 8+ bytes per entry of W instead of per
        trained entry.
    """

    def __init__(self, params, masks: Mapping[Tensor, Tensor] | Sequence[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 amsgrad: bool = False, maximize: bool = False, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, compact_grads: bool = True,
                 dense_state: bool = False):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas}")
        _checks.positive("eps", eps)
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.compact_grads = compact_grads
        self.dense_state = dense_state
        all_params = [p for group in self.param_groups for p in group["params"]]
        self._masks = self._resolve_masks(all_params, masks)
        self._grads: dict[Tensor, Tensor] = {}
        self._has_grad: dict[Tensor, bool] = {}
        self._hooks = []
        for group in self.param_groups:
            for p in group["params"]:
                self._init_param(p, group)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _resolve_masks(params: list[Tensor], masks) -> dict[Tensor, Tensor]:
        if isinstance(masks, Mapping):
            by_id = {id(p): idx for p, idx in masks.items()}
            missing = [i for i, p in enumerate(params) if id(p) not in by_id]
            if missing:
                raise ValueError(f"masks has no entry for parameter(s) at position {missing}; give every "
                                 "parameter a mask (seat.masks.random_mask(p, 1.0, seed=0) trains all entries)")
            resolved = [by_id[id(p)] for p in params]
        else:
            resolved = list(masks)
            if len(resolved) != len(params):
                raise ValueError(f"masks has {len(resolved)} entries for {len(params)} parameters; pass one per "
                                 "parameter, in order, or a mapping param -> idx")
        out = {}
        for i, (p, idx) in enumerate(zip(params, resolved)):
            _check_param(f"params[{i}]", p)
            if isinstance(idx, (ImplicitMask, Block16Mask)):
                if idx.numel != p.numel():
                    raise ValueError(f"masks[{i}] ({type(idx).__name__}) covers {idx.numel} elements; its "
                                     f"parameter has {p.numel()}")
                if idx.device != p.device:
                    raise ValueError(f"masks[{i}] is on {idx.device} but its parameter is on {p.device}")
                out[p] = idx
                continue
            if isinstance(idx, Tensor) and idx.dtype == torch.bool:
                if idx.shape != p.shape:
                    raise ValueError(f"masks[{i}] is a bool mask of shape {tuple(idx.shape)}; its parameter has "
                                     f"shape {tuple(p.shape)}")
                idx = idx.reshape(-1).nonzero().squeeze(1).to(torch.int32)
            _checks.index_tensor(f"masks[{i}]", idx, p.numel())
            if idx.device != p.device:
                raise ValueError(f"masks[{i}] is on {idx.device} but its parameter is on {p.device}")
            _checks.index_values(f"masks[{i}]", idx, p.numel())
            out[p] = idx
        return out

    def _init_param(self, p: Tensor, group: dict) -> None:
        idx = self._masks[p]
        nnz, dtype = mask_nnz(idx), _state_dtype(p)
        size = p.numel() if self.dense_state else nnz
        state = self.state[p]
        state["step"] = 0
        _store_mask(state, idx)
        state["exp_avg"] = torch.zeros(size, dtype=dtype, device=p.device)
        state["exp_avg_sq"] = torch.zeros(size, dtype=dtype, device=p.device)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros(size, dtype=dtype, device=p.device)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
            flat = p.detach().view(-1)
            state["master"] = (flat if self.dense_state else flat[mask_indices(idx).long()]).to(dtype)
        self._grads[p] = torch.zeros(nnz, dtype=dtype, device=p.device)
        self._has_grad[p] = False
        if self.compact_grads:
            self._hooks.append(p.register_post_accumulate_grad_hook(_compact_hook(self)))

    def compact_(self, p: Tensor) -> None:
        """Add p.grad's masked entries to p's compact gradient and free p.grad (what the
        post-accumulate-grad hook runs after each backward)."""
        mask_gather_(self._grads[p], p.grad, self._masks[p])
        self._has_grad[p] = True
        p.grad = None

    @torch.no_grad()
    def set_masks(self, masks: Mapping[Tensor, Tensor] | Sequence[Tensor]) -> None:
        """Replace the masks (e.g. re-draw a random mask). Call between steps, after
        zero_grad(). Compact state follows the entries that stay in the mask and starts at
        zero for new ones; full-size state (dense_state=True) is kept as it is."""
        if any(self._has_grad.values()):
            raise RuntimeError("set_masks with accumulated gradients would drop them: call it after "
                               "optimizer.step() and zero_grad()")
        params = [p for group in self.param_groups for p in group["params"]]
        new_masks = self._resolve_masks(params, masks)
        for p, new_mask in new_masks.items():
            state, old_mask = self.state[p], self._masks[p]
            new_idx = mask_indices(new_mask)  # implicit masks materialized for the move only
            if not self.dense_state:
                old_idx = mask_indices(old_mask)
                # where each new entry sat in the old compact arrays (both are sorted)
                where = torch.searchsorted(old_idx, new_idx).clamp_(max=max(old_idx.numel() - 1, 0))
                kept = old_idx[where] == new_idx if old_idx.numel() else torch.zeros_like(new_idx, dtype=torch.bool)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"):
                    if key in state:
                        fresh = (p.detach().view(-1)[new_idx.long()].to(state[key].dtype) if key == "master"
                                 else torch.zeros(new_idx.numel(), dtype=state[key].dtype, device=p.device))
                        fresh[kept] = state[key][where[kept]]
                        state[key] = fresh
            _store_mask(state, new_mask)
            self._masks[p] = new_mask
            self._grads[p] = torch.zeros(new_idx.numel(), dtype=_state_dtype(p), device=p.device)

    def remove_hooks(self) -> None:
        """Stop compacting gradients (e.g. before handing the model to another optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.compact_grads = False

    # ------------------------------------------------------------------ gradients
    def compact_grad(self, p: Tensor) -> Tensor:
        """The compact gradient buffer of p (float32, (nnz,))."""
        return self._grads[p]

    def _collect_dense_grads(self) -> None:
        for p, idx in self._masks.items():
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("SparseAdamW does not take sparse-layout gradients")
                mask_gather_(self._grads[p], p.grad.contiguous(), idx)
                self._has_grad[p] = True
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the compact gradients (and drop any dense .grad)."""
        for p, buf in self._grads.items():
            buf.zero_()
            self._has_grad[p] = False
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the compact gradients (the masked entries
        are the only ones trained, so this is the norm of the effective gradient)."""
        if not self.compact_grads:
            self._collect_dense_grads()
        grads = [g for p, g in self._grads.items() if self._has_grad[p]]
        if not grads:
            return torch.tensor(0.0)
        # torch's helpers: the same norm and clip coefficient as clip_grad_norm_
        total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.compact_grads:
            self._collect_dense_grads()
        for group_index, group in enumerate(self.param_groups):
            batches: dict[int, list[Tensor]] = defaultdict(list)  # by step number after incrementing
            for p in group["params"]:
                if not self._has_grad[p]:
                    continue
                state = self.state[p]
                state["step"] += 1
                batches[state["step"]].append(p)
            beta1, beta2 = group["betas"]
            for step, params in batches.items():
                hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], step=step, maximize=group["maximize"],
                             stochastic_rounding=group["stochastic_rounding"],
                             seed=(self.seed * 1_000_003 + group_index) % 2**63, dense_state=self.dense_state)
                # one call per mask form (int32 indices / ImplicitMask / Block16Mask)
                by_form: dict = defaultdict(list)
                for p in params:
                    by_form[type(self._masks[p])].append(p)
                for form, ps in by_form.items():
                    states = [self.state[p] for p in ps]
                    lists = ([self._grads[p] for p in ps], [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states], [s.get("master") for s in states],
                             [s.get("max_exp_avg_sq") for s in states])
                    if form is Block16Mask:
                        ops.sparse_adamw_block16_(ps, [s["block_starts"] for s in states],
                                                  [s["offsets"] for s in states], *lists, **hyper)
                    elif form is not ImplicitMask:
                        ops.sparse_adamw_(ps, [s["idx"] for s in states], *lists, **hyper)
                    else:
                        masks = [self._masks[p] for p in ps]
                        ops.sparse_adamw_implicit_(
                            ps, [m.block_offsets for m in masks], *lists, seeds=[m.seed for m in masks],
                            param_ids=[m.param_id for m in masks], thresholds=[m.threshold for m in masks],
                            blocks=[m.block for m in masks], **hyper)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state saved by state_dict(). Unlike torch's base class, compact state
        keeps its own dtype (fp32) instead of being cast to the param's (e.g. bf16), and
        each saved mask must equal this optimizer's mask for the same parameter."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, this optimizer "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(saved['params'])} params in state_dict, "
                                 f"{len(group['params'])} here")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        new_state = defaultdict(dict)
        for key, saved_state in state_dict["state"].items():
            p = id_map[key]
            restored = {k: (v.to(p.device, copy=True) if isinstance(v, Tensor) else copy.deepcopy(v))
                        for k, v in saved_state.items()}
            mask = self._masks[p]
            if any(k in restored for k in _MASK_KEYS) and not _same_mask(restored, mask):
                raise ValueError(f"the state_dict's mask for parameter {key} differs from this optimizer's: "
                                 "build the optimizer with the masks the checkpoint was trained with")
            for k in _MASK_KEYS:
                restored.pop(k, None)
            _store_mask(restored, mask)
            new_state[p] = restored
        self.state = new_state
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})

    def state_bytes(self) -> int:
        """Bytes held by the optimizer for its params: state, masks and compact grads."""
        total = 0
        for p, state in self.state.items():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
            total += self._grads[p].numel() * self._grads[p].element_size()
        return total

