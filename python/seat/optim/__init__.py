"""seat.optim: SparseAdamW, AdamW on the masked entries of each parameter with compact state.

  sparse_adamw.py   SparseAdamW: param groups, hooks, step, zero_grad, clip_grad_norm_,
                    set_masks, checkpoints (the orchestration; masks through the
                    seat.masks.Mask protocol only)
  state.py          the optimizer-state formats: fp32 (state_bits=32) and bitsandbytes
                    8-bit blockwise (state_bits=8); QUANT_BLOCK, STATE_CHUNK,
                    quantization_maps, quantization_error_bound
  grads.py          the gradient strategies: compact gradient buffers filled by the
                    post-accumulate-grad hook (default), or the update applied inside
                    the hook (update_in_backward=True)
  _params.py        the params' checks and their masks: normalized to seat.masks Mask
                    objects, stored in the state under their encoding's keys
  _groups.py        the param groups' hyperparameters: torch.optim.AdamW's keys and
                    defaults, one check for construction and load_state_dict
  _checkpoint.py    load_state_dict's reading of a state dict: every check before anything
                    is replaced
  _guards.py        what a step checks before writing: updates_forbidden, and the
                    `nonfinite` option (raise / skip / apply on a NaN or inf gradient)

STATE_CHUNK here is the default; a step reads seat.optim.state.STATE_CHUNK.
"""
from __future__ import annotations

from .sparse_adamw import SparseAdamW
from .state import QUANT_BLOCK, STATE_CHUNK, quantization_error_bound, quantization_maps

__all__ = ["SparseAdamW", "QUANT_BLOCK", "STATE_CHUNK", "quantization_maps", "quantization_error_bound"]
