"""The seat ops: one torch.library custom op each (namespace `seat`), with a fake
implementation, a pure-torch reference and kernels per backend (see _backend).

  masked_gather_, masked_swap_, sparse_adamw_   sparse-update family (idx: int32 indices)
  implicit_block_offsets_, masked_gather_implicit_, masked_swap_implicit_,
  sparse_adamw_implicit_                        the same on implicit random masks (no idx)
  masked_gather_block16_, masked_swap_block16_,
  sparse_adamw_block16_                         the same on block16-encoded masks (2 B/entry)
  kl_div, paired_loss, fused_linear_paired_loss paired-KL loss family

Importing this module registers the schemas (pure Python); native code loads on the
first call that needs it.
"""
from __future__ import annotations

from ._backend import BACKENDS, use_backend
from ._native import NativeBuildError
from ._registry import OPS
from .block16_masks import (decode_block16, encode_block16, masked_gather_block16_, masked_swap_block16_,
                            sparse_adamw_block16_)
from .fused_linear_paired_loss import fused_linear_paired_loss
from .implicit_masks import (implicit_block_offsets_, masked_gather_implicit_, masked_swap_implicit_,
                             sparse_adamw_implicit_)
from .kl_div import kl_div
from .masked_gather import masked_gather_
from .masked_swap import masked_swap_
from .paired_loss import paired_loss
from .sparse_adamw import sparse_adamw_

__all__ = [
    "BACKENDS", "OPS", "NativeBuildError", "use_backend", "masked_gather_", "masked_swap_", "sparse_adamw_",
    "kl_div", "paired_loss", "fused_linear_paired_loss", "implicit_block_offsets_", "masked_gather_implicit_",
    "masked_swap_implicit_", "sparse_adamw_implicit_", "masked_gather_block16_", "masked_swap_block16_",
    "sparse_adamw_block16_", "encode_block16", "decode_block16",
]
