"""The seat ops: one torch.library custom op each (namespace `seat`), with a fake
implementation, a pure-torch reference and kernels per backend (see _backend).

  masked_gather_, masked_swap_, sparse_adamw_   sparse-update family: a mask in any encoding
                                                (int32 indices, block16, hash; _encodings.py)
  implicit_block_offsets_                       builds the block offsets of a hash mask
  dequant4_delta                                a bitsandbytes 4-bit weight dequantized + a sparse delta
  kl_div, paired_loss, fused_linear_paired_loss paired-KL loss family

Importing this module registers the schemas (pure Python); native code loads on the
first call that needs it.
"""
from __future__ import annotations

from ._backend import BACKENDS, use_backend
from ._native import NativeBuildError
from ._registry import OPS
from ._encodings import MaskArgs
from .dequant4_delta import dequant4_delta
from .fused_linear_paired_loss import fused_linear_paired_loss
from .implicit_block_offsets import implicit_block_offsets_
from .kl_div import kl_div
from .masked_gather import masked_gather_
from .masked_swap import masked_swap_
from .paired_loss import paired_loss
from .sparse_adamw import sparse_adamw_

__all__ = [
    "BACKENDS", "OPS", "NativeBuildError", "use_backend", "MaskArgs", "masked_gather_", "masked_swap_",
    "sparse_adamw_", "implicit_block_offsets_", "dequant4_delta", "kl_div", "paired_loss", "fused_linear_paired_loss",
]
