"""Tiny causal LMs loaded with bitsandbytes 4-bit weights on the CPU, the way a user loads
a real one: the tiny model of tests/_models.py (widened to hidden 64, MLP 128, so every
weight's rows are whole 64-element absmax blocks, as in real models: bitsandbytes
0.50.2's CPU dequantize mis-scales rows of other widths, see tests/_quant4.py) saved to
a folder, then
``from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...),
device_map="cpu")`` (transformers quantizes it on the CPU; no hub access).

Also: the naive computation QSEAT must equal (every 4-bit weight dequantized, its delta
added, as a plain float model) and the fp32 / bf16 float twins of the same checkpoint.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

from _models import tiny_config

_SAVED: dict[tuple, str] = {}


def _saved_checkpoint(kind: str, seed: int) -> str:
    """A folder holding the tiny fp32 model of (kind, seed) (made once per process)."""
    import transformers as tf

    key = (kind, seed)
    if key not in _SAVED:
        torch.manual_seed(seed)
        config = tiny_config(kind)
        config.hidden_size, config.intermediate_size = 64, 128
        if "head_dim" in config.to_dict():  # Llama fixes its head_dim at construction
            config.head_dim = 64 // config.num_attention_heads
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        folder = tempfile.mkdtemp(prefix=f"seat-qseat-{kind}-")
        model.save_pretrained(folder)
        _SAVED[key] = folder
    return _SAVED[key]


def quant_config(quant_type: str = "nf4", compute_dtype=torch.bfloat16, double_quant: bool = False):
    import transformers as tf

    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)


def tiny_4bit_model(kind: str = "llama", seed: int = 0, quant_type: str = "nf4", compute_dtype=torch.bfloat16,
                    double_quant: bool = False, dtype=torch.float32):
    """The tiny model of (kind, seed) with its decoder's linear layers in 4-bit
    (bitsandbytes Linear4bit; embeddings, norms and lm_head in `dtype`)."""
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    folder = _saved_checkpoint(kind, seed)
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant_config(quant_type, compute_dtype, double_quant), device_map="cpu",
        dtype=dtype, attn_implementation="eager")
    return model.eval()


def tiny_float_model(kind: str = "llama", seed: int = 0, dtype=torch.float32):
    """The same checkpoint as tiny_4bit_model, unquantized."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(_saved_checkpoint(kind, seed), dtype=dtype,
                                                     attn_implementation="eager")
    return model.eval()


def linear4bit_modules(model):
    from seat.quant import linear4bit_modules as found

    return found(model)


def packed_snapshot(model) -> dict[str, tuple]:
    """Copies of every 4-bit weight's packed codes and quantization state tensors."""
    out = {}
    for name, module in linear4bit_modules(model):
        state = module.weight.quant_state
        tensors = [module.weight.detach().clone(), state.absmax.clone()]
        if state.nested:
            tensors += [state.state2.absmax.clone(), state.state2.code.clone(), state.offset.clone()]
        out[name] = tuple(tensors)
    return out


def same_snapshot(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                        for k in a)


def dequantized_float_twin(model, handle=None, dtype=torch.float32):
    """The naive computation: a float model of the same class whose every 4-bit linear is
    dequant(W) in float32 (+ its QSEAT delta at the mask when `handle` is given), and
    every other parameter copied from `model`, all in `dtype`."""
    import bitsandbytes.functional as bnbf
    import transformers as tf

    from seat.masks import mask_indices

    twin = tf.AutoModelForCausalLM.from_config(model.config, attn_implementation="eager").to(dtype).eval()
    deltas = {}
    if handle is not None:
        for name, t in handle.targets.items():
            if hasattr(t, "delta"):
                deltas[name] = (mask_indices(t.mask).long(), t.delta.detach().float())
    state = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name and linear4bit_modules_contains(module):
                w = bnbf.dequantize_4bit(module.weight, module.weight.quant_state).float()
                if f"{name}.weight" in deltas:
                    idx, values = deltas[f"{name}.weight"]
                    w.view(-1)[idx] += values
                state[f"{name}.weight"] = w.to(dtype)
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach().to(dtype)
        for name, p in model.named_parameters():
            if name not in state and not name.endswith("seat_delta") and p.is_floating_point():
                state[name] = p.detach().to(dtype)
        missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return twin


def linear4bit_modules_contains(module) -> bool:
    from seat.quant import is_4bit_linear

    return is_4bit_linear(module)


def bnb_forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits through bitsandbytes' own forward (its dequantize-then-matmul
    path: training mode, no CPU repacking; the tiny models have no dropout)."""
    flags = {}
    for name, module in linear4bit_modules(model):
        flags[name] = module.__dict__.get("support_avx512bf16_for_cpu")
        module.support_avx512bf16_for_cpu = False
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for name, module in linear4bit_modules(model):
            module.support_avx512bf16_for_cpu = flags[name]


def cleanup_checkpoints() -> None:  # pragma: no cover - for interactive use
    import shutil

    for folder in _SAVED.values():
        if os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
    _SAVED.clear()


# ---------------------------------------------------------------------- a measured step
def load_4bit(config, dtype, folder, double_quant: bool = False, gradient_checkpointing: bool = False):
    """A random model of `config` (seeded) saved to `folder`, loaded back with its
    decoder's linears in nf4 (compute dtype = `dtype`) as benchmarks/bench_seat_step.py's
    make_model prepares a model: train mode, no cache, non-reentrant checkpointing."""
    import transformers as tf

    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant_config("nf4", dtype, double_quant), device_map="cpu", dtype=dtype)
    model.config.use_cache = False
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_qseat(config, batch, device, dtype, folder, density: float, gradient_checkpointing: bool = False,
                optimizer_kwargs: dict | None = None, seat_kwargs: dict | None = None, double_quant: bool = False):
    """benchmarks/bench_seat_step.py's build_seat on the model loaded in 4-bit: (step,
    alive, tokens, info) for benchmarks/_memory.PeakMemory."""
    import seat
    from _memory import module_tensors, optimizer_tensors, quant_state_tensors
    from bench_seat_step import LR, _seat_step, mask_tensors

    model = load_4bit(config, dtype, folder, double_quant, gradient_checkpointing)
    handle = seat.patch(model, density=density, **(seat_kwargs or {}))
    opt = handle.optimizer(lr=LR, **{"weight_decay": 0.0, **(optimizer_kwargs or {})})
    step = _seat_step(handle, opt, batch)
    masks = lambda: [mask_tensors(t.mask) for t in handle.targets.values()]  # noqa: E731
    alive = lambda: [module_tensors(model), quant_state_tensors(model), optimizer_tensors(opt), masks(),  # noqa: E731
                     batch]
    tokens = int(batch["attention_mask"].sum() + batch["pert_attention_mask"].sum())
    info = {"trainable_params": handle.num_trainable, "keep": (model, handle, opt), "cleanup": handle.revert}
    return step, alive, tokens, info
