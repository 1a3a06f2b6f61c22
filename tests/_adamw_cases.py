"""torch.optim.AdamW's test inputs, ported for SparseAdamW, and the pieces the conformance
tests share: a float64 problem, SparseAdamW at a density next to torch.optim.AdamW on the
masked entries alone, and a loop that steps both.

INPUTS is torch's `optim_inputs_func_adamw` (torch/testing/_internal/common_optimizers.py:
the CPU inputs, the CUDA-only capturable ones and the MPS tensor-lr one), each with what
SparseAdamW does with it: "run" (it must match torch.optim.AdamW) or the error it refuses it
with. EXTRA adds the implementation switches torch's tests sweep (foreach, fused,
differentiable) and the tensor-lr / tensor-betas inputs without capturable. ERROR_INPUTS is
torch's `optim_error_inputs_func_adamw` on CPU, with SparseAdamW's answer.
"""
from __future__ import annotations

import torch

from seat.masks import random_mask
from seat.optim import SparseAdamW

# (desc as torch names it, kwargs, None = runs like torch.optim.AdamW, else (error type, regex))
INPUTS = [
    ("default", {}, None),
    ("non-default lr", {"lr": 0.01}, None),
    ("nonzero weight_decay", {"weight_decay": 0.1}, None),
    ("maximize", {"weight_decay": 0.1, "maximize": True}, None),
    ("amsgrad", {"weight_decay": 0.1, "amsgrad": True}, None),
    ("capturable", {"capturable": True}, (ValueError, "capturable=True is not supported")),
    ("capturable, amsgrad", {"weight_decay": 0.1, "amsgrad": True, "capturable": True},
     (ValueError, "capturable=True is not supported")),
    ("Tensor lr with capturable and amsgrad", {"lr": torch.tensor(0.001), "amsgrad": True, "capturable": True},
     (ValueError, "capturable=True is not supported")),
    ("Tensor lr, Tensor betas, with capturable and amsgrad",
     {"lr": torch.tensor(0.001), "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])), "amsgrad": True,
      "capturable": True}, (ValueError, "capturable=True is not supported")),
    ("Tensor lr, Tensor betas, with capturable",
     {"lr": torch.tensor(0.001), "betas": (torch.tensor(0.9), torch.tensor(0.99)), "amsgrad": False,
      "capturable": True}, (ValueError, "capturable=True is not supported")),
    ("Tensor lr", {"lr": torch.tensor(0.01)}, None),
]
EXTRA = [
    ("foreach=True", {"weight_decay": 0.1, "foreach": True}, None),
    ("foreach=False", {"weight_decay": 0.1, "foreach": False}, None),
    ("Tensor lr, Tensor betas, amsgrad (capturable dropped)",
     {"lr": torch.tensor(0.001), "betas": (torch.tensor([[[0.9]]]), torch.tensor([[0.99]])), "amsgrad": True},
     None),
    ("Tensor lr (float64)", {"lr": torch.tensor(0.01, dtype=torch.float64), "weight_decay": 0.1}, None),
    ("fused", {"fused": True}, (ValueError, "fused=True selects torch's fused AdamW kernel")),
    ("differentiable", {"differentiable": True}, (ValueError, "differentiable=True is not supported")),
]
ALL_INPUTS = INPUTS + EXTRA
RUNNABLE = [(desc, kwargs) for desc, kwargs, refused in ALL_INPUTS if refused is None]
REFUSED = [(desc, kwargs, refused) for desc, kwargs, refused in ALL_INPUTS if refused is not None]

# torch's error inputs on CPU: (desc, kwargs, torch's error, SparseAdamW's answer: an error
# (type, regex), or None where SparseAdamW runs it because its kernels have no such limit)
ERROR_INPUTS = [
    ("Tensor lr must be 1-element", {"lr": torch.tensor([0.001, 0.001])}, (ValueError, "one floating-point element")),
    ("beta1 should be between 0 and 1", {"lr": 1e-2, "betas": (1.0, 0.0)}, (ValueError, r"betas\[0\] must be in")),
    ("weight_decay should > 0", {"lr": 1e-2, "weight_decay": -1}, (ValueError, "weight_decay must be >= 0")),
    ("lr as Tensor doesn't work with foreach & not capturable", {"lr": torch.tensor(0.001), "foreach": True}, None),
    ("betas must be either both floats or both Tensors", {"lr": 1e-2, "betas": (0.9, torch.tensor(0.99))}, None),
    ("betas as Tensors with foreach", {"lr": 1e-2, "betas": (torch.tensor(0.9), torch.tensor(0.99)),
                                       "foreach": True}, None),
]

SHAPES = [(17, 13), (1, 17), (13,), (40, 9)]


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in SHAPES]


def coefficients(step: int) -> list[torch.Tensor]:
    """Per-entry coefficients of step `step`'s loss."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def loss_of(params, coefs) -> torch.Tensor:
    """An elementwise loss: entry i's gradient depends on entry i alone, so AdamW on the
    masked entries alone sees exactly the masked entries of the full gradient."""
    return sum((torch.sin(p * c) + 0.1 * p * p).sum() for p, c in zip(params, coefs))


class Pair:
    """SparseAdamW over params at `density` and torch.optim.AdamW (foreach=False, the
    for-loop reference) over leaves holding only the masked entries."""

    def __init__(self, kwargs: dict, density: float, sparse_options: dict | None = None, seed: int = 0,
                 torch_kwargs: dict | None = None):
        self.params = make_params(seed)
        self.initial = [p.detach().clone() for p in self.params]
        self.masks = [random_mask(p, density, seed=i) for i, p in enumerate(self.params)]
        self.idx = [m.long() for m in self.masks]
        self.leaves = [p.detach().view(-1)[i].clone().requires_grad_() for p, i in zip(self.params, self.idx)]
        torch_kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                        for k, v in (kwargs if torch_kwargs is None else torch_kwargs).items()}
        torch_kwargs.setdefault("foreach", False)
        self.torch_opt = torch.optim.AdamW(self.leaves, **torch_kwargs)
        self.sparse = SparseAdamW(self.params, self.masks, **kwargs, **(sparse_options or {}))

    def coefs(self, step: int):
        return coefficients(step), [c.view(-1)[i] for c, i in zip(coefficients(step), self.idx)]

    def backward(self, step: int) -> None:
        full, masked = self.coefs(step)
        loss_of(self.params, full).backward()
        loss_of(self.leaves, masked).backward()

    def step(self, step: int) -> None:
        self.backward(step)
        self.sparse.step()
        self.sparse.zero_grad()
        self.torch_opt.step()
        self.torch_opt.zero_grad()

    def check(self) -> None:
        """Masked entries as torch's, every other entry bit for bit the initial value.
        float64 tolerance, except with a float32 tensor lr or beta: torch computes the step
        size in the tensor's dtype, SparseAdamW reads the value as a Python float, so the two
        differ by float32 rounding (relative 6e-8 per step)."""
        float32_hyper = any(isinstance(v, torch.Tensor) and v.dtype == torch.float32
                            for g in self.torch_opt.param_groups for v in (g["lr"], *g["betas"]))
        rtol, atol = (1e-6, 1e-8) if float32_hyper else (1e-10, 1e-12)
        for p, p0, i, leaf in zip(self.params, self.initial, self.idx, self.leaves):
            flat = p.detach().view(-1)
            torch.testing.assert_close(flat[i], leaf.detach(), rtol=rtol, atol=atol)
            outside = torch.ones(flat.numel(), dtype=torch.bool)
            outside[i] = False
            assert torch.equal(flat[outside], p0.view(-1)[outside])


def train(params, opt, steps: range) -> None:
    """Steps of the elementwise loss with one optimizer."""
    for step in steps:
        loss_of(params, coefficients(step)).backward()
        opt.step()
        opt.zero_grad()
