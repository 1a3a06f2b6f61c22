"""Optimizer-state formats of SparseAdamW: how exp_avg / exp_avg_sq are stored, one
small strategy object per format.

  Fp32State        state_bits=32: the state dtype (float32; float64 for float64 params),
                   compact (nnz,) or full-size (dense_state=True). A step takes every
                   param's moments whole, so the params of a group share one kernel call.
  QuantizedState   state_bits=8: bitsandbytes blockwise quantization, uint8 codes and one
                   fp32 absmax per QUANT_BLOCK entries, each moment (1.016 bytes per entry
                   instead of 4; dynamic signed map for exp_avg, unsigned for exp_avg_sq,
                   as bitsandbytes' own 8-bit Adam). A step takes one param at a time, in
                   chunks of at most STATE_CHUNK entries whatever the mask's encoding: it
                   dequantizes a chunk to transient fp32 (8 bytes per entry of the chunk),
                   steps it with that chunk of the mask (Mask.chunk: a view for int32 and
                   block16 masks, int32 indices for an implicit one, 4 bytes per entry of
                   the chunk; a param of one chunk is stepped with its mask itself) and
                   requantizes it (bitsandbytes adds 1 byte per entry of the chunk).
                   Each stored moment is off by at most half the widest code gap of its
                   map (+1%) times its block's absmax (quantization_error_bound: <= 0.0036
                   * absmax for exp_avg_sq, <= 0.0071 * absmax for exp_avg), which the
                   tests propagate to a bound on the weights. Step time: four bitsandbytes
                   calls per chunk; on CPU its blockwise kernels cost ~15 ms a call
                   whatever the size (measured), on GPU they are CUDA kernels. Needs the
                   bitsandbytes package (pip install bitsandbytes, or seat[lean]).

Both offer the same few operations, so the optimizer steps every format through one code
path: ``spans`` (the [start, stop) entry ranges a step goes through), ``moments(state,
start, stop)`` (a context manager yielding fp32 (exp_avg, exp_avg_sq) of entries [start,
stop) of one param's state and writing them back on exit: views for fp32 state,
dequantized copies requantized on exit for 8-bit state), ``dequantized``, ``to_fp32`` /
``from_fp32`` (for moving state to a new mask) and ``layout`` (the keys, sizes and dtypes
a param's moments are stored under: what load_state_dict checks a checkpoint against).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

# 8-bit state: blockwise quantization block, and the most compact entries one step
# dequantizes at a time (a multiple of the block, so chunks quantize exactly as the whole
# array would). 2**20 entries = 8 MiB of transient fp32 moments. Read at each step (tests
# patch it down to force several chunks).
QUANT_BLOCK = 256
STATE_CHUNK = 1 << 20
MOMENTS = ("exp_avg", "exp_avg_sq")


def state_dtype(param: Tensor) -> torch.dtype:
    """The dtype of a param's compact state (float64 only for float64 params: the oracle tests)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


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


class Fp32State:
    """exp_avg / exp_avg_sq held as they are stepped (see the module docstring)."""

    bits = 32
    whole = True  # a step takes every param's moments whole: the params of a group share one call

    def __init__(self):
        self.code_books: dict = {}  # none: only the 8-bit format has code books

    def init(self, state: dict, size: int, dtype: torch.dtype, device) -> None:
        for key in MOMENTS:
            state[key] = torch.zeros(size, dtype=dtype, device=device)

    def spans(self, nnzs: list[int]) -> list[tuple[int, int | None]]:
        """One span, every param whole (full-size state with dense_state is indexed by
        position, so only the whole of it is meaningful)."""
        return [(0, None)]

    @contextmanager
    def moments(self, state: dict, start: int = 0, stop: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Views of the stored moments: the kernel updates them in place, nothing to write back."""
        yield state["exp_avg"][start:stop], state["exp_avg_sq"][start:stop]

    def dequantized(self, state: dict) -> dict[str, Tensor]:
        return {key: state[key] for key in MOMENTS}

    def to_fp32(self, state: dict) -> None:
        """Nothing to do: the stored moments are the fp32 ones."""

    def from_fp32(self, state: dict) -> None:
        """Nothing to do: fp32 moments are stored as they are."""

    def layout(self, size: int, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
        """{key: (numel, dtype)} of the stored moments of `size` entries."""
        return {key: (size, dtype) for key in MOMENTS}


class QuantizedState:
    """exp_avg / exp_avg_sq as 8-bit blockwise codes (see the module docstring)."""

    bits = 8
    whole = False  # a step takes one param at a time, chunk by chunk

    def __init__(self):
        self.code_books: dict[torch.device, dict[str, Tensor]] = {}  # per device, made on first use

    def _code(self, key: str, device) -> Tensor:
        device = torch.device(device)
        if device not in self.code_books:
            self.code_books[device] = quantization_maps(device)
        return self.code_books[device][key]

    def init(self, state: dict, size: int, dtype: torch.dtype, device) -> None:
        """uint8 codes (size,) and fp32 block absmax (ceil(size / QUANT_BLOCK),) per moment,
        holding zeros: absmax 0 and, in every entry, the code bitsandbytes gives 0.0 (not
        code 0: the signed map starts at -1), found by quantizing one block of zeros."""
        blocks = -(-size // QUANT_BLOCK)
        for key in MOMENTS:
            state[key] = torch.zeros(size, dtype=torch.uint8, device=device)
            state[f"{key}_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            if size:
                zeros = torch.zeros(min(size, QUANT_BLOCK), dtype=torch.float32, device=device)
                codes, _ = _bnb_functional().quantize_blockwise(zeros, code=self._code(key, device),
                                                               blocksize=QUANT_BLOCK)
                state[key].fill_(int(codes[0]))

    def spans(self, nnzs: list[int]) -> list[tuple[int, int]]:
        """Chunks of at most STATE_CHUNK entries of one param (each param is stepped alone)."""
        (nnz,) = nnzs
        if STATE_CHUNK <= 0 or STATE_CHUNK % QUANT_BLOCK:
            # a chunk boundary inside a quantization block would requantize that block twice
            raise ValueError(f"STATE_CHUNK must be a positive multiple of QUANT_BLOCK = {QUANT_BLOCK}; "
                             f"got {STATE_CHUNK}")
        return [(start, min(start + STATE_CHUNK, nnz)) for start in range(0, nnz, STATE_CHUNK)]

    @contextmanager
    def moments(self, state: dict, start: int = 0, stop: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """fp32 copies of entries [start, stop) (start a multiple of QUANT_BLOCK: the
        transient of the step, 8 bytes per entry), requantized into the state on a normal
        exit; an exception leaves the stored state as it was."""
        m, v = self._dequantize(state, "exp_avg", start, stop), self._dequantize(state, "exp_avg_sq", start, stop)
        yield m, v
        self._quantize_into(state, "exp_avg", m, start)
        self._quantize_into(state, "exp_avg_sq", v, start)

    def dequantized(self, state: dict) -> dict[str, Tensor]:
        """fp32 copies of the whole moments."""
        return {key: self._dequantize(state, key) for key in MOMENTS}

    def to_fp32(self, state: dict) -> None:
        """Replace the codes by fp32 moments (the whole param's: a move to a new mask is rare)."""
        values = self.dequantized(state)
        for key in MOMENTS:
            del state[key], state[f"{key}_absmax"]
        state.update(values)

    def from_fp32(self, state: dict) -> None:
        """Quantize fp32 moments (from to_fp32, moved to a new mask) anew."""
        values = {key: state.pop(key) for key in MOMENTS}
        nnz = values["exp_avg"].numel()
        self.init(state, nnz, torch.float32, values["exp_avg"].device)
        for key, v in values.items():
            self._quantize_into(state, key, v, 0)

    def layout(self, size: int, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
        """{key: (numel, dtype)} of the stored moments of `size` entries: codes and block absmax."""
        blocks = -(-size // QUANT_BLOCK)
        out = {}
        for key in MOMENTS:
            out[key] = (size, torch.uint8)
            out[f"{key}_absmax"] = (blocks, torch.float32)
        return out

    def _dequantize(self, state: dict, key: str, start: int = 0, stop: int | None = None) -> Tensor:
        """fp32 values of entries [start, stop) of `key` (start a multiple of QUANT_BLOCK): a new tensor."""
        codes = state[key][start:stop]
        if codes.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=codes.device)
        first = start // QUANT_BLOCK
        absmax = state[f"{key}_absmax"][first:first + -(-codes.numel() // QUANT_BLOCK)]
        return _bnb_functional().dequantize_blockwise(codes, absmax=absmax, code=self._code(key, codes.device),
                                                      blocksize=QUANT_BLOCK)

    def _quantize_into(self, state: dict, key: str, values: Tensor, start: int) -> None:
        """Requantize fp32 `values` into entries [start, start + len) of `key`."""
        if values.numel() == 0:
            return
        codes = state[key][start:start + values.numel()]
        first = start // QUANT_BLOCK
        absmax = state[f"{key}_absmax"][first:first + -(-values.numel() // QUANT_BLOCK)]
        out, _ = _bnb_functional().quantize_blockwise(values, code=self._code(key, codes.device), absmax=absmax,
                                                      out=codes, blocksize=QUANT_BLOCK)
        if out.data_ptr() != codes.data_ptr():  # a bitsandbytes that ignores out=: copy back
            codes.copy_(out)


def state_format(bits: int):
    """The strategy object of state_bits=`bits` (32 or 8)."""
    return QuantizedState() if bits == 8 else Fp32State()
