"""seat.memory: an analytic model of the memory of one SEAT training step.

    python -m seat.memory --config Llama-3-8B --density 0.05 --seq 1024 --batch 1 \
        --gradient-checkpointing --gpu-memory 24GB

    est = seat.memory.estimate("Llama-3-8B", density=0.05, seq=1024, batch=1,
                               gradient_checkpointing=True)
    est.peak, est.breakdown, est.fits(24 * 10**9)

It counts the bytes of the tensors a step holds (weights, optimizer state, masks,
original values, activations, the loss's buffers, gradients), phase by phase, for seat
and for the baselines (naive SEAT, full fine-tuning, LoRA), and for the lean options of
the sparse update (index encodings, bf16 compact gradients, optimizer-in-backward, 8-bit
state). It imports neither torch nor transformers until a config is read.
"""
from __future__ import annotations

from ._arch import KNOWN, Architecture, known_names, load_config
from ._estimate import MemoryEstimate, estimate, estimate_arch, implicit_nnz, nnz_for
from ._options import METHODS, Options
from ._units import format_bytes, parse_bytes

__all__ = ["KNOWN", "METHODS", "Architecture", "MemoryEstimate", "Options", "estimate", "estimate_arch",
           "format_bytes", "implicit_nnz", "known_names", "load_config", "nnz_for", "parse_bytes"]
