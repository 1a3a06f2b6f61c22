"""seat.memory: an analytic model of the memory of one SEAT training step.

    python -m seat.memory --config Llama-3-8B --density 0.05 --seq 1024 --batch 1 \
        --gradient-checkpointing --gpu-memory 24GB

    est = seat.memory.estimate("Llama-3-8B", density=0.05, seq=1024, batch=1,
                               gradient_checkpointing=True)
    est.peak, est.breakdown, est.fits(24 * 10**9)

    est = seat.memory.estimate("Llama-3-70B", density=0.05, gradient_checkpointing=True,
                               gpus=8, strategy="fsdp")      # or "dp"; batch is per GPU
    est.peak (per GPU), est.communication.sent (bytes per GPU and optimizer step)

It counts the bytes of the tensors a step holds (weights, optimizer state, masks,
original values, activations, the loss's buffers, gradients), phase by phase, for seat
and for the baselines (naive SEAT, full fine-tuning, LoRA), and for the lean options of
the sparse update (index encodings, bf16 compact gradients, optimizer-in-backward, 8-bit
state), on one GPU or as one GPU's share of N (data parallel or FSDP, with the bytes each
GPU sends per step). It imports neither torch nor transformers until a config is read.
"""
from __future__ import annotations

from ._arch import KNOWN, Architecture, known_names, load_config
from ._estimate import MemoryEstimate, estimate, estimate_arch, implicit_nnz, nnz_for
from ._gpu_table import multi_gpu_table, smallest_fit, traffic_table
from ._multi_gpu import Communication
from ._options import METHODS, STRATEGIES, Options
from ._units import format_bytes, parse_bytes

__all__ = ["KNOWN", "METHODS", "STRATEGIES", "Architecture", "Communication", "MemoryEstimate", "Options", "estimate",
           "estimate_arch", "format_bytes", "implicit_nnz", "known_names", "load_config", "multi_gpu_table", "nnz_for",
           "parse_bytes", "smallest_fit", "traffic_table"]
