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

Lean modes (issue 9: fit an 8B model's SEAT update on a 24 GB card), each optional and
combinable; per trained entry the default holds 4 (grad) + 8 (exp_avg, exp_avg_sq) bytes:

  grad_dtype=torch.bfloat16   the compact gradient is bf16 (2 bytes instead of 4); the
      kernels upcast it exactly to fp32 on load, so the step is the fp32 step of the
      bf16-rounded gradient (round to nearest even: relative error <= 2**-9 per entry).
      Gradient accumulation: a second micro-batch before step() turns that parameter's
      buffer into fp32 for the rest of the step (summing micro-batches in bf16 would round
      after every one), so with accumulation the saving is lost, not the precision; the
      buffer is bf16 again after zero_grad().
  update_in_backward=True     optimizer-in-backward: each parameter's AdamW update runs
      inside its post-accumulate-grad hook, on a transient compact gradient (nnz entries of
      grad_dtype, freed at once), so no compact gradient buffer exists at all. The update
      of step t happens during backward t with the lr the param group has then (the one
      the scheduler set after step t-1, as in the default mode); optimizer.step() applies
      nothing and only closes the step: it allows the next backward. state["step"] counts
      the updates applied. A second backward before step() (gradient accumulation) and
      clip_grad_norm_ (the global norm is known only after every update was applied) are
      refused with an error; so is compact_grads=False. Stochastic rounding then draws its
      bits per parameter (not per position in a batched call): the trajectory with it
      differs from the default mode's, without it it is the same bit for bit.
  state_bits=8                exp_avg and exp_avg_sq stored 8-bit with bitsandbytes
      blockwise quantization (blocks of 256 entries, one fp32 absmax each: 1.016 bytes per
      entry instead of 4; dynamic signed map for exp_avg, unsigned for exp_avg_sq, as
      bitsandbytes' own 8-bit Adam). A step dequantizes a chunk of at most STATE_CHUNK
      entries of one parameter to transient fp32 (8 bytes per entry of the chunk), runs
      the same sparse_adamw_ kernel on it and requantizes (bitsandbytes adds 1 byte per entry
      of the chunk while quantizing). Each stored moment is off by at most half the widest
      code gap of its map (+1%) times its block's absmax (<= 0.0036 * absmax for
      exp_avg_sq, <= 0.0071 * absmax for exp_avg; seat.optim.quantization_error_bound),
      which the tests propagate to a bound on the weights. Each parameter is stepped by its
      own call, so stochastic rounding draws its bits per parameter (as with
      update_in_backward). Step time: four bitsandbytes calls per chunk; on CPU its
      blockwise kernels cost ~15 ms a call whatever the size (measured), on GPU they are
      CUDA kernels. Needs the bitsandbytes package (pip install bitsandbytes, or
      seat[lean]); refuses amsgrad, dense_state and float64 params.

Every lean mode takes every form of mask: an ImplicitMask / Block16Mask is gathered and
stepped with its own kernels (masked_gather_implicit_ / sparse_adamw_implicit_, the
block16 ones; they read bf16 compact gradients like sparse_adamw_), giving the trajectory
of the int32 mask with the same entries bit for bit. Their kernels step a whole
parameter, so with state_bits=8 the fp32 transient is the moments of the whole parameter
(8 bytes per trained entry of it), not of one STATE_CHUNK. Their gathers write fp32, so
with grad_dtype=torch.bfloat16 a gather goes through a transient fp32 copy of one
parameter's compact gradient (4 bytes per trained entry of it) before rounding to bf16.
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

# 8-bit state (state_bits=8): blockwise quantization block, and the most compact entries
# one parameter's step dequantizes at a time (a multiple of the block: chunks quantize
# exactly as the whole array would). 2**20 entries = 8 MiB of transient fp32 moments.
QUANT_BLOCK = 256
STATE_CHUNK = 1 << 20
_QUANT_KEYS = ("exp_avg", "exp_avg_sq")


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("SparseAdamW(state_bits=8) quantizes its state with bitsandbytes: pip install "
                          "bitsandbytes (or seat[lean]), or use state_bits=32") from exc
    return bnb_functional


def quantization_maps(device) -> dict[str, Tensor]:
    """The 256-entry code books of the 8-bit state: bitsandbytes' dynamic map, signed for
    exp_avg and unsigned for exp_avg_sq (float32, on `device`)."""
    F = _bnb_functional()
    return {"exp_avg": F.create_dynamic_map(signed=True).to(device),
            "exp_avg_sq": F.create_dynamic_map(signed=False).to(device)}


def quantization_error_bound(key: str) -> float:
    """Bound on |dequantize(quantize(x)) - x| / absmax of x's block for state `key`: half
    the widest gap between adjacent codes of its map (x / absmax goes to a neighbouring
    code), plus 1%: bitsandbytes' rounding of values near a midpoint overshoots half the
    gap slightly (by 0.2% / 0.4% at most for the signed / unsigned map, measured over 10**6
    values of every magnitude). 0.0071 for exp_avg, 0.0036 for exp_avg_sq."""
    code = quantization_maps("cpu")[key].double().sort().values
    return float((code[1:] - code[:-1]).max()) / 2 * 1.01


def _backward_update_hook(optimizer: "SparseAdamW"):
    """The post-accumulate-grad hook of update_in_backward=True (held weakly, as below)."""
    ref = weakref.ref(optimizer)

    def hook(p: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._update_in_backward_(p)

    return hook


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
      grad_dtype: dtype of the compact gradients: None (the state dtype, float32) or
        torch.bfloat16 (lean mode, see the module docstring).
      update_in_backward: apply each parameter's update inside its gradient hook, with no
        compact gradient buffer (lean mode, see the module docstring).
      state_bits: 32 (default) or 8: exp_avg / exp_avg_sq quantized blockwise with
        bitsandbytes (lean mode, see the module docstring).
    """

    def __init__(self, params, masks: Mapping[Tensor, Tensor] | Sequence[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 amsgrad: bool = False, maximize: bool = False, master_weights: bool = False,
                 stochastic_rounding: bool = False, seed: int = 0, compact_grads: bool = True,
                 dense_state: bool = False, grad_dtype: torch.dtype | None = None, update_in_backward: bool = False,
                 state_bits: int = 32):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0; got {lr}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {betas}")
        _checks.positive("eps", eps)
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
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
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        self.seed = int(seed)
        self.compact_grads = compact_grads
        self.dense_state = dense_state
        self.grad_dtype = grad_dtype
        self.update_in_backward = update_in_backward
        self.state_bits = state_bits
        all_params = [p for group in self.param_groups for p in group["params"]]
        self._masks = self._resolve_masks(all_params, masks)
        if grad_dtype == torch.bfloat16 or state_bits == 8:
            fp64 = [i for i, p in enumerate(all_params) if p.dtype == torch.float64]
            if fp64:
                mode = "grad_dtype=torch.bfloat16" if grad_dtype == torch.bfloat16 else "state_bits=8"
                raise ValueError(f"{mode} is a lean mode for float32 state; params at position {fp64} are float64 "
                                 "(whose state is float64): leave them to an optimizer without it")
        self._qmaps: dict[torch.device, dict[str, Tensor]] = {}  # 8-bit code books, per device
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

    @staticmethod
    def _gather(out: Tensor, dense: Tensor, mask) -> None:
        """out += dense.view(-1)[mask]. The implicit / block16 gathers write fp32 (or fp64)
        only: a bf16 `out` (grad_dtype=torch.bfloat16) takes the sum through a transient
        fp32 copy of one parameter's compact gradient, rounded to nearest even once, as
        the int32 gather rounds it."""
        if out.dtype == torch.bfloat16 and isinstance(mask, (ImplicitMask, Block16Mask)):
            tmp = torch.zeros(out.numel(), dtype=torch.float32, device=out.device)
            mask_gather_(tmp, dense, mask)
            out.add_(tmp)
            return
        mask_gather_(out, dense, mask)

    def _grad_dtype(self, p: Tensor) -> torch.dtype:
        return self.grad_dtype or _state_dtype(p)

    def _init_param(self, p: Tensor, group: dict) -> None:
        idx = self._masks[p]
        nnz, dtype = mask_nnz(idx), _state_dtype(p)
        size = p.numel() if self.dense_state else nnz
        state = self.state[p]
        state["step"] = 0
        _store_mask(state, idx)
        if self.state_bits == 8:
            self._init_quantized(p, nnz)
        else:
            state["exp_avg"] = torch.zeros(size, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(size, dtype=dtype, device=p.device)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros(size, dtype=dtype, device=p.device)
        if group["master_weights"] and p.dtype in (torch.float16, torch.bfloat16):
            flat = p.detach().view(-1)
            state["master"] = (flat if self.dense_state else flat[mask_indices(idx).long()]).to(dtype)
        self._has_grad[p] = False  # update_in_backward: "updated since the last step()"
        if self.update_in_backward:  # no compact gradient buffer at all
            self._hooks.append(p.register_post_accumulate_grad_hook(_backward_update_hook(self)))
            return
        self._grads[p] = torch.zeros(nnz, dtype=self._grad_dtype(p), device=p.device)
        if self.compact_grads:
            self._hooks.append(p.register_post_accumulate_grad_hook(_compact_hook(self)))

    def compact_(self, p: Tensor) -> None:
        """Add p.grad's masked entries to p's compact gradient and free p.grad (what the
        post-accumulate-grad hook runs after each backward)."""
        if self.update_in_backward:
            raise RuntimeError("update_in_backward=True keeps no compact gradient: the hooks update each "
                               "parameter during backward")
        buf = self._grads[p]
        if self._has_grad[p] and buf.dtype == torch.bfloat16:
            # a second micro-batch: accumulate in fp32 rather than round after every one
            buf = self._grads[p] = buf.float()
        self._gather(buf, p.grad, self._masks[p])
        self._has_grad[p] = True
        p.grad = None

    # ------------------------------------------------------------------ 8-bit state
    def _qmap(self, key: str, device: torch.device) -> Tensor:
        if device not in self._qmaps:
            self._qmaps[device] = quantization_maps(device)
        return self._qmaps[device][key]

    def _init_quantized(self, p: Tensor, nnz: int) -> None:
        """uint8 codes (nnz,) and fp32 block absmax (ceil(nnz / QUANT_BLOCK),) per moment;
        zeros quantize exactly (absmax 0)."""
        state, blocks = self.state[p], -(-nnz // QUANT_BLOCK)
        for key in _QUANT_KEYS:
            state[key] = torch.zeros(nnz, dtype=torch.uint8, device=p.device)
            state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            if nnz:  # the code of 0.0 in this map (not code 0: the signed map starts at -1)
                self._quantize_into(p, key, torch.zeros(nnz, device=p.device), 0)

    def _dequantize(self, p: Tensor, key: str, start: int = 0, stop: int | None = None) -> Tensor:
        """fp32 values of entries [start, stop) of quantized state `key` (start a multiple
        of QUANT_BLOCK): a new tensor, the transient of the step."""
        state = self.state[p]
        codes = state[key][start:stop]
        if codes.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=p.device)
        absmax = state[f"{key}_absmax"][start // QUANT_BLOCK:start // QUANT_BLOCK + -(-codes.numel() // QUANT_BLOCK)]
        return _bnb_functional().dequantize_blockwise(codes, absmax=absmax, code=self._qmap(key, p.device),
                                                      blocksize=QUANT_BLOCK)

    def _quantize_into(self, p: Tensor, key: str, values: Tensor, start: int) -> None:
        """Requantize fp32 `values` into entries [start, start + len) of state `key`."""
        if values.numel() == 0:
            return
        state = self.state[p]
        codes = state[key][start:start + values.numel()]
        first = start // QUANT_BLOCK
        absmax = state[f"{key}_absmax"][first:first + -(-values.numel() // QUANT_BLOCK)]
        out, _ = _bnb_functional().quantize_blockwise(values, code=self._qmap(key, p.device), absmax=absmax,
                                                      out=codes, blocksize=QUANT_BLOCK)
        if out.data_ptr() != codes.data_ptr():  # a bitsandbytes that ignores out=: copy back
            codes.copy_(out)

    def dequantized_state(self, p: Tensor) -> dict[str, Tensor]:
        """exp_avg / exp_avg_sq of p as fp32 (nnz,) tensors, whatever the storage (copies
        when 8-bit, the state tensors themselves otherwise)."""
        if self.state_bits == 8:
            return {key: self._dequantize(p, key) for key in _QUANT_KEYS}
        return {key: self.state[p][key] for key in _QUANT_KEYS}

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
            new_idx = mask_indices(new_mask)  # implicit / block16 masks materialized for the move only
            if self.state_bits == 8:  # remap the dequantized moments, then quantize anew
                values = self.dequantized_state(p)
                for key in _QUANT_KEYS:
                    del state[key], state[f"{key}_absmax"]
                state.update(values)
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
            if self.state_bits == 8:
                values = {key: state.pop(key) for key in _QUANT_KEYS}
                self._init_quantized(p, new_idx.numel())
                for key, v in values.items():
                    self._quantize_into(p, key, v, 0)
            if not self.update_in_backward:
                self._grads[p] = torch.zeros(new_idx.numel(), dtype=self._grad_dtype(p), device=p.device)

    def remove_hooks(self) -> None:
        """Stop compacting gradients (e.g. before handing the model to another optimizer)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.compact_grads = False

    # ------------------------------------------------------------------ gradients
    def compact_grad(self, p: Tensor) -> Tensor:
        """The compact gradient buffer of p ((nnz,), float32, or grad_dtype)."""
        if self.update_in_backward:
            raise RuntimeError("update_in_backward=True keeps no compact gradient (each update is applied "
                               "during backward)")
        return self._grads[p]

    def _collect_dense_grads(self) -> None:
        for p, idx in self._masks.items():
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise ValueError("SparseAdamW does not take sparse-layout gradients")
                self._gather(self._grads[p], p.grad.contiguous(), idx)
                self._has_grad[p] = True
                p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the compact gradients (and drop any dense .grad). With
        update_in_backward=True there is none to zero: the updates were applied, and only
        step() allows the next backward."""
        if self.update_in_backward:
            for p in self._masks:
                p.grad = None
            return
        for p, buf in self._grads.items():
            if buf.dtype != self._grad_dtype(p):  # promoted to fp32 for accumulation: back to bf16
                self._grads[p] = torch.zeros(buf.numel(), dtype=self._grad_dtype(p), device=buf.device)
            else:
                buf.zero_()
            self._has_grad[p] = False
            p.grad = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ over the compact gradients (the masked entries
        are the only ones trained, so this is the norm of the effective gradient)."""
        if self.update_in_backward:
            raise RuntimeError("clip_grad_norm_ is not possible with update_in_backward=True: each parameter is "
                               "updated during backward, before the global norm is known. Build the optimizer "
                               "with update_in_backward=False to clip (with SeatTrainer: max_grad_norm=0 to "
                               "train without clipping)")
        if not self.compact_grads:
            self._collect_dense_grads()
        grads = [g for p, g in self._grads.items() if self._has_grad[p]]
        if not grads:
            return torch.tensor(0.0)
        # torch's helpers: the same norm and clip coefficient as clip_grad_norm_; bf16
        # buffers are normed in fp32 (per tensor, so no fp32 copy of them exists)
        norms = grads if all(g.dtype != torch.bfloat16 for g in grads) else [
            torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads]
        total = torch.nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite)
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
        if self.update_in_backward:
            # the updates of this step were applied during backward: close the step
            for p in self._has_grad:
                self._has_grad[p] = False
            return loss
        if not self.compact_grads:
            self._collect_dense_grads()
        if self.state_bits == 8:
            self._step_quantized()
            return loss
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
        """One AdamW step of p alone from its compact gradient `grad` (advances
        state["step"]); 8-bit state is stepped chunk by chunk through fp32 transients."""
        state = self.state[p]
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     step=state["step"], maximize=group["maximize"], stochastic_rounding=group["stochastic_rounding"],
                     seed=self._param_seed(group_index, position), dense_state=self.dense_state)
        mask, master = self._masks[p], state.get("master")
        if self.state_bits != 8:
            self._adamw_one(p, mask, grad, state["exp_avg"], state["exp_avg_sq"], master,
                            state.get("max_exp_avg_sq"), hyper)
            return
        if isinstance(mask, (ImplicitMask, Block16Mask)):
            # their kernels step a whole parameter (the mask is found from the element index,
            # not from a slot): the transient is the fp32 moments of the whole parameter,
            # 8 bytes per trained entry of p, rather than of one STATE_CHUNK
            m, v = self._dequantize(p, "exp_avg"), self._dequantize(p, "exp_avg_sq")
            self._adamw_one(p, mask, grad, m, v, master, None, hyper)
            self._quantize_into(p, "exp_avg", m, 0)
            self._quantize_into(p, "exp_avg_sq", v, 0)
            return
        idx = mask
        for start in range(0, idx.numel(), STATE_CHUNK):
            stop = min(start + STATE_CHUNK, idx.numel())
            m, v = self._dequantize(p, "exp_avg", start, stop), self._dequantize(p, "exp_avg_sq", start, stop)
            ops.sparse_adamw_([p], [idx[start:stop]], [grad[start:stop]], [m], [v],
                              [None if master is None else master[start:stop]], None, **hyper)
            self._quantize_into(p, "exp_avg", m, start)
            self._quantize_into(p, "exp_avg_sq", v, start)
            del m, v  # before the next chunk's transients exist: one chunk's at a time

    @staticmethod
    def _adamw_one(p: Tensor, mask, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master, max_exp_avg_sq,
                   hyper: dict) -> None:
        """One AdamW step of p alone, with the kernel of its mask's form."""
        lists = ([grad], [exp_avg], [exp_avg_sq], [master], [max_exp_avg_sq])
        if isinstance(mask, Block16Mask):
            ops.sparse_adamw_block16_([p], [mask.block_starts], [mask.offsets], *lists, **hyper)
        elif isinstance(mask, ImplicitMask):
            ops.sparse_adamw_implicit_([p], [mask.block_offsets], *lists, seeds=[mask.seed],
                                       param_ids=[mask.param_id], thresholds=[mask.threshold], blocks=[mask.block],
                                       **hyper)
        else:
            ops.sparse_adamw_([p], [mask], *lists, **hyper)

    def _step_quantized(self) -> None:
        for group_index, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                if self._has_grad[p]:
                    self._update_param(p, self._grads[p], group_index, position, group)

    @torch.no_grad()
    def _update_in_backward_(self, p: Tensor) -> None:
        """The hook of update_in_backward=True: gather p.grad's masked entries into a
        transient compact gradient, free p.grad, update p now."""
        if self._has_grad[p]:
            p.grad = None
            raise RuntimeError("a second backward before optimizer.step(): update_in_backward=True applies each "
                               "update during backward and cannot accumulate gradients over micro-batches. Call "
                               "optimizer.step() after every backward, or build the optimizer with "
                               "update_in_backward=False (with SeatTrainer: gradient_accumulation_steps=1)")
        mask = self._masks[p]
        grad = torch.zeros(mask_nnz(mask), dtype=self._grad_dtype(p), device=p.device)
        self._gather(grad, p.grad, mask)  # the gather of the mask's form
        p.grad = None
        self._has_grad[p] = True
        self._update_param(p, grad, *self._where(p))

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
            self._check_state_storage(key, p, restored)
            new_state[p] = restored
        self.state = new_state
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})

    def _check_state_storage(self, key, p: Tensor, state: dict) -> None:
        """A checkpoint's moments must be stored as this optimizer stores them."""
        quantized = self.state_bits == 8
        for name in _QUANT_KEYS:
            if name not in state:
                continue
            saved_quantized = state[name].dtype == torch.uint8 and f"{name}_absmax" in state
            if saved_quantized != quantized:
                have = "8-bit" if saved_quantized else f"{state[name].dtype}"
                raise ValueError(f"the state_dict's {name} for parameter {key} is {have} but this optimizer has "
                                 f"state_bits={self.state_bits}: build it with the state_bits the checkpoint "
                                 "was saved with")

    def state_bytes(self) -> int:
        """Bytes held persistently by the optimizer for its params: state (8-bit codes and
        their absmax when state_bits=8), masks and compact grads (none with
        update_in_backward; bf16 ones with grad_dtype=torch.bfloat16). Transients of a
        step are not included: one parameter's compact gradient during its hook
        (update_in_backward), fp32 moments of one chunk of one parameter (state_bits=8;
        of the whole parameter with an ImplicitMask / Block16Mask)."""
        total = 0
        for p, state in self.state.items():
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
            if p in self._grads:
                total += self._grads[p].numel() * self._grads[p].element_size()
        return total

