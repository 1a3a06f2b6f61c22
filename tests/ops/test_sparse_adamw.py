"""seat.ops.sparse_adamw_ against torch.optim.AdamW on the masked entries only.

The oracle is torch.optim.AdamW (foreach=False) on a float64 leaf tensor holding only the
nnz masked entries, fed the same compact gradients as .grad each step. Entries outside the
mask must come out bit-exact unchanged. Every test runs on each backend that has a kernel.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import backend_device, random_indices, tol
from seat import ops

OP = "sparse_adamw_"
STEPS = 20
BETAS = (0.9, 0.99)
EPS = 1e-8

# name: (param dtype, state dtype, with masters)
CONFIGS = {
    "fp64": (torch.float64, torch.float64, False),
    "fp32": (torch.float32, torch.float32, False),
    "fp32-masters": (torch.float32, torch.float32, True),
    "bf16-masters": (torch.bfloat16, torch.float32, True),
    "fp16-masters": (torch.float16, torch.float32, True),
    "bf16-no-masters": (torch.bfloat16, torch.float32, False),
}


def constant_lr(step):
    return 1e-2


def warmup_cosine_lr(step):
    """Linear warmup over 5 steps, then cosine decay: a different lr at every step."""
    if step <= 5:
        return 2e-2 * step / 5
    return 1e-3 + (2e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (step - 5) / STEPS))


SCHEDULES = {"constant": constant_lr, "warmup-cosine": warmup_cosine_lr}


class Slot:
    """One param of a sparse_adamw_ call: the param, its compact state, and the oracle."""

    def __init__(self, shape, nnz, config, seed, device, *, amsgrad=False, weight_decay=0.0, maximize=False):
        param_dtype, self.state_dtype, with_master = CONFIGS[config]
        self.weight_decay, self.maximize = weight_decay, maximize
        self.g = torch.Generator().manual_seed(seed)
        numel = math.prod(shape)
        self.param = torch.randn(shape, generator=self.g, dtype=torch.float64).to(param_dtype).to(device)
        self.idx = random_indices(numel, nnz, self.g, device)
        self.untouched = torch.ones(numel, dtype=torch.bool, device=device)
        self.untouched[self.idx.long()] = False
        self.before = self.param.clone()
        entries = self.param.view(-1)[self.idx.long()]

        def zeros():
            return torch.zeros(nnz, dtype=self.state_dtype, device=device)

        self.exp_avg, self.exp_avg_sq = zeros(), zeros()
        self.max_exp_avg_sq = zeros() if amsgrad else None
        self.master = entries.to(self.state_dtype) if with_master else None
        # Without masters the step runs on the param's own values: the oracle rounds to the
        # param dtype after every step the same way.
        self.round_to = None if with_master or param_dtype == torch.float64 else param_dtype
        self.weight = entries.detach().cpu().double().clone().requires_grad_()
        self.optimizer = torch.optim.AdamW([self.weight], lr=1.0, betas=BETAS, eps=EPS, weight_decay=weight_decay,
                                           amsgrad=amsgrad, maximize=maximize, foreach=False)

    def new_grad(self):
        scale = torch.rand((), generator=self.g, dtype=torch.float64) * 2
        grad = torch.randn(self.idx.numel(), generator=self.g, dtype=torch.float64) * scale
        return grad.to(self.state_dtype).to(self.param.device)

    def oracle_step(self, grad, lr):
        self.optimizer.param_groups[0]["lr"] = lr
        self.weight.grad = grad.detach().cpu().double()
        self.optimizer.step()
        if self.round_to is not None:
            with torch.no_grad():
                self.weight.copy_(self.weight.to(self.round_to).double())

    def check(self):
        """State and masked entries match the oracle; everything else is untouched."""
        flat, before = self.param.view(-1), self.before.view(-1)
        assert torch.equal(flat[self.untouched], before[self.untouched]), "entries outside the mask changed"
        if self.idx.numel() == 0:
            return
        state = self.optimizer.state[self.weight]
        state_tol = tol(self.state_dtype)
        torch.testing.assert_close(self.exp_avg.cpu().double(), state["exp_avg"], **state_tol)
        torch.testing.assert_close(self.exp_avg_sq.cpu().double(), state["exp_avg_sq"], **state_tol)
        if self.max_exp_avg_sq is not None:
            torch.testing.assert_close(self.max_exp_avg_sq.cpu().double(), state["max_exp_avg_sq"], **state_tol)
        entries = flat[self.idx.long()]
        if self.master is not None:
            torch.testing.assert_close(self.master.cpu().double(), self.weight.detach(), **state_tol)
            assert torch.equal(entries, self.master.to(self.param.dtype)), "param is not its master, rounded"
        else:
            torch.testing.assert_close(entries.cpu().double(), self.weight.detach(), **tol(self.param.dtype))
        assert not torch.equal(entries, before[self.idx.long()]), "the masked entries never moved"


def adamw_steps(backend, slots, *, steps=STEPS, schedule=constant_lr):
    """Run `steps` steps of sparse_adamw_ (all slots in one call) and of the oracles."""
    weight_decay, maximize = slots[0].weight_decay, slots[0].maximize
    assert all((s.weight_decay, s.maximize) == (weight_decay, maximize) for s in slots)
    with_masters = any(s.master is not None for s in slots)
    with_amsgrad = any(s.max_exp_avg_sq is not None for s in slots)
    for step in range(1, steps + 1):
        lr = schedule(step)
        grads = [s.new_grad() for s in slots]
        with ops.use_backend(backend):
            ops.sparse_adamw_(
                [s.param for s in slots], [s.idx for s in slots], grads, [s.exp_avg for s in slots],
                [s.exp_avg_sq for s in slots],
                [s.master for s in slots] if with_masters else None,
                [s.max_exp_avg_sq for s in slots] if with_amsgrad else None,
                lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=weight_decay, step=step,
                maximize=maximize,
            )
        for slot, grad in zip(slots, grads):
            slot.oracle_step(grad, lr)
    for slot in slots:
        slot.check()


# --------------------------------------------------------------------------- against torch.optim.AdamW


# (weight_decay, amsgrad, maximize, lr schedule): each option on and off, and together
VARIANTS = {
    "adam": (0.0, False, False, "constant"),
    "wd-lr-schedule": (0.1, False, False, "warmup-cosine"),
    "amsgrad-wd": (0.1, True, False, "constant"),
    "maximize": (0.0, False, True, "constant"),
    "maximize-amsgrad-wd-lr-schedule": (0.1, True, True, "warmup-cosine"),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_torch_adamw(backend, config, variant):
    device = backend_device(OP, backend)
    weight_decay, amsgrad, maximize, schedule = VARIANTS[variant]
    slot = Slot((37, 11), 150, config, seed=1, device=device, amsgrad=amsgrad, weight_decay=weight_decay,
                maximize=maximize)
    adamw_steps(backend, [slot], schedule=SCHEDULES[schedule])


@pytest.mark.parametrize(
    "shape, nnz",
    [((7, 5), 0), ((1,), 1), ((4097,), 1), ((17, 3), 51), ((4097,), 4097)],
    ids=["empty", "single-full", "nnz-1", "full-17x3", "full-4097"],
)
@pytest.mark.parametrize("config", ["fp64", "bf16-masters"])
def test_edge_sizes(backend, config, shape, nnz):
    device = backend_device(OP, backend)
    slot = Slot(shape, nnz, config, seed=2, device=device, amsgrad=True, weight_decay=0.05)
    adamw_steps(backend, [slot])
    if nnz == 0:
        assert torch.equal(slot.param, slot.before)
        assert slot.exp_avg.numel() == 0 and slot.exp_avg_sq.numel() == 0


@pytest.mark.parametrize("config", ["fp64", "fp32", "bf16-masters", "fp16-masters"])
def test_several_params_in_one_call(backend, config):
    """Different shapes and fill ratios, amsgrad for some params only, one call per step."""
    device = backend_device(OP, backend)
    layout = [((1,), 1, True), ((17, 3), 20, False), ((4097,), 1000, True), ((2, 3, 5), 0, False),
              ((9, 13), 117, False)]
    slots = [Slot(shape, nnz, config, seed=10 + i, device=device, amsgrad=amsgrad, weight_decay=0.1)
             for i, (shape, nnz, amsgrad) in enumerate(layout)]
    adamw_steps(backend, slots, schedule=warmup_cosine_lr)


def test_masters_for_some_params_only(backend):
    """masters is per param: None entries take the step on the param's own values."""
    device = backend_device(OP, backend)
    slots = [Slot((33,), 20, "bf16-masters", seed=20, device=device, weight_decay=0.1),
             Slot((5, 7), 30, "bf16-no-masters", seed=21, device=device, weight_decay=0.1)]
    adamw_steps(backend, slots)


def test_no_params(backend):
    backend_device(OP, backend)
    with ops.use_backend(backend):
        ops.sparse_adamw_([], [], [], [], [], lr=1e-3, step=1)


# --------------------------------------------------------------------------- bad inputs


def valid_args(device):
    """Two fp32 params with compact fp32 state: a valid call to break one piece of."""
    g = torch.Generator().manual_seed(40)
    params = [torch.randn(4, 5, generator=g).to(device), torch.randn(33, generator=g).to(device)]
    idxs = [random_indices(20, 6, g, device), random_indices(33, 9, g, device)]

    def compact():
        return [torch.zeros(i.numel(), device=device) for i in idxs]

    return dict(params=params, masks=idxs, grads=[torch.randn(i.numel(), generator=g).to(device) for i in idxs],
                exp_avgs=compact(), exp_avg_sqs=compact(), masters=None, max_exp_avg_sqs=None, lr=1e-3, step=1)


def set_item(name, i, make):
    def change(args):
        args[name][i] = make(args[name][i])
    return change


def set_arg(name, value):
    def change(args):
        args[name] = value(args) if callable(value) else value
    return change


@pytest.mark.parametrize(
    "change, error, match",
    [
        (set_arg("grads", lambda a: a["grads"][:1]), ValueError, r"grads has 1 tensors but params has 2"),
        (set_arg("exp_avgs", lambda a: a["exp_avgs"] * 2), ValueError, r"exp_avgs has 4 tensors"),
        (set_arg("masters", lambda a: [None]), ValueError, r"masters has 1 tensors"),
        (set_item("masks", 1, lambda t: t.flip(0)), ValueError, r"masks\[1\] must be sorted"),
        (set_item("masks", 1, lambda t: torch.cat([t[:1], t[:-1]])), ValueError, r"masks\[1\] must be sorted"),
        (set_item("masks", 1, lambda t: torch.cat([t[:-1], t.new_tensor([33])])), ValueError, r"masks\[1\] holds"),
        (set_item("masks", 1, lambda t: torch.cat([t.new_tensor([-1]), t[1:]])), ValueError, r"masks\[1\] holds"),
        (set_item("masks", 1, lambda t: t.long()), TypeError, r"masks\[1\] must have dtype int32"),
        (set_item("params", 1, lambda t: torch.zeros(66, device=t.device)[::2]), ValueError,
         r"params\[1\] must be contiguous"),
        (set_item("params", 1, lambda t: t.int()), TypeError, r"params\[1\] must have dtype"),
        (set_item("grads", 1, lambda t: t.half()), TypeError, r"grads\[1\] must (have dtype|be) float32"),
        (set_item("grads", 1, lambda t: t[:-1]), ValueError, r"grads\[1\] must be 1-D with one entry per index"),
        (set_item("exp_avgs", 1, lambda t: t.double()), TypeError, r"exp_avgs\[1\] must (have dtype|be) float32"),
        (set_item("exp_avg_sqs", 1, lambda t: t[:-1]), ValueError, r"exp_avg_sqs\[1\] must be 1-D"),
        (set_arg("masters", lambda a: [None, a["grads"][1].bfloat16()]), TypeError,
         r"masters\[1\] must (have dtype|be) float32"),
        (set_arg("max_exp_avg_sqs", lambda a: [None, a["grads"][1][:-1]]), ValueError, r"max_exp_avg_sqs\[1\]"),
        (set_arg("step", 0), ValueError, r"step must be an int >= 1"),
        (set_arg("step", -3), ValueError, r"step must be an int >= 1"),
        (set_arg("lr", -1e-3), ValueError, r"lr must be >= 0"),
        (set_arg("beta1", 1.0), ValueError, r"beta1 must be in \[0, 1\)"),
        (set_arg("beta2", -0.1), ValueError, r"beta2 must be in \[0, 1\)"),
        (set_arg("eps", 0.0), ValueError, r"eps must be > 0"),
        (set_arg("weight_decay", -0.1), ValueError, r"weight_decay must be >= 0"),
        (set_arg("params", lambda a: tuple(a["params"])[0]), TypeError, r"params must be a list"),
    ],
    ids=["lengths-grads", "lengths-exp-avgs", "lengths-masters", "idx-unsorted", "idx-duplicate",
         "idx-too-big", "idx-negative", "idx-int64", "param-non-contiguous", "param-int", "grads-fp16",
         "grads-length", "exp-avgs-dtype", "exp-avg-sqs-length", "masters-dtype", "max-exp-avg-sqs-length",
         "step-0", "step-negative", "lr", "beta1", "beta2", "eps", "weight-decay", "params-not-a-list"],
)
def test_bad_inputs(backend, change, error, match):
    device = backend_device(OP, backend)
    args = valid_args(device)
    first_param = args["params"][0].clone()
    change(args)
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.sparse_adamw_(**args)
    # every check runs before any update: the valid first param was not stepped either
    if isinstance(args["params"], list):
        assert torch.equal(args["params"][0], first_param)


# --------------------------------------------------------------------------- bf16 compact gradients


class Bf16GradSlot(Slot):
    """The lean mode: compact gradients stored in bf16 (fp32 state). The oracle gets the
    bf16-rounded gradient (exactly representable in float64): the documented tolerance of
    the mode is the bf16 rounding of the gradient, nothing more."""

    def new_grad(self):
        return super().new_grad().to(torch.bfloat16)


@pytest.mark.parametrize("variant", ["adam", "maximize-amsgrad-wd-lr-schedule"])
@pytest.mark.parametrize("config", ["fp32", "bf16-masters", "bf16-no-masters", "fp16-masters"])
def test_bf16_grads_match_torch_adamw(backend, config, variant):
    device = backend_device(OP, backend)
    weight_decay, amsgrad, maximize, schedule = VARIANTS[variant]
    slot = Bf16GradSlot((37, 11), 150, config, seed=3, device=device, amsgrad=amsgrad, weight_decay=weight_decay,
                        maximize=maximize)
    adamw_steps(backend, [slot], schedule=SCHEDULES[schedule])


@pytest.mark.parametrize("config", ["fp32", "bf16-no-masters"])
def test_bf16_grads_equal_their_fp32_upcast(backend, config):
    """A bf16 gradient is upcast exactly on load: the step equals, bit for bit, the step
    with the same values given as fp32; fp32 and bf16 grads mix in one call."""
    device = backend_device(OP, backend)
    pair = [Slot((4097,), 1000, config, seed=5, device=device, weight_decay=0.1) for _ in range(2)]
    other = Slot((9, 13), 50, config, seed=6, device=device)
    for step in range(1, 4):
        grad = pair[0].new_grad().to(torch.bfloat16)
        other_grad = other.new_grad()
        results = []
        for slot, g in zip(pair, (grad, grad.float())):
            with ops.use_backend(backend):
                ops.sparse_adamw_([slot.param, other.param.clone()], [slot.idx, other.idx], [g, other_grad],
                                  [slot.exp_avg, other.exp_avg.clone()], [slot.exp_avg_sq, other.exp_avg_sq.clone()],
                                  lr=1e-2, weight_decay=0.1, step=step)
            results.append((slot.param.clone(), slot.exp_avg.clone(), slot.exp_avg_sq.clone()))
        for a, b in zip(*results):
            assert torch.equal(a, b)


def test_bf16_grads_refused_for_fp64_params(backend):
    device = backend_device(OP, backend)
    args = valid_args(device)
    args["params"] = [p.double() for p in args["params"]]
    for name in ("exp_avgs", "exp_avg_sqs"):
        args[name] = [t.double() for t in args[name]]
    args["grads"] = [g.bfloat16() for g in args["grads"]]
    with ops.use_backend(backend), pytest.raises(TypeError, match=r"grads\[0\] must be float64 for a float64"):
        ops.sparse_adamw_(**args)
