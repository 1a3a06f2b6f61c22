"""torch.optim.AdamW's tests ported to seat.optim.SparseAdamW (float64, against
torch.optim.AdamW itself): torch's AdamW inputs and error inputs, LR schedulers, state_dict
round trips (torch.save / torch.load(weights_only=True), deepcopy, pickle), older state
dicts, torch AdamW state dicts, optimizer hooks. At density 1.0 every entry trains and the
params must follow torch's AdamW on the params; at density 0.05 the masked entries follow
torch's AdamW run on those entries alone and the rest stay bit for bit."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _adamw_cases import ERROR_INPUTS, REFUSED, RUNNABLE, Pair, coefficients, loss_of, make_params, train
from conftest import backend_device

from seat import ops
from seat.masks import random_mask
from seat.optim import SparseAdamW

STEPS = 6
DENSITIES = [1.0, 0.05]


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("desc,kwargs", RUNNABLE, ids=[d for d, _ in RUNNABLE])
def test_torch_adamw_input_matches_torch(desc, kwargs, backend, density):
    backend_device("sparse_adamw_", backend)
    pair = Pair(kwargs, density)
    with ops.use_backend(backend):
        for step in range(STEPS):
            pair.step(step)
            pair.check()


@pytest.mark.parametrize("desc,kwargs", RUNNABLE[:2] + RUNNABLE[3:5], ids=[d for d, _ in RUNNABLE[:2] + RUNNABLE[3:5]])
def test_torch_adamw_input_on_the_triton_backend(desc, kwargs):
    """A subset on triton (through the interpreter on CPU: slow)."""
    backend_device("sparse_adamw_", "triton")
    pair = Pair(kwargs, 0.05)
    with ops.use_backend("triton"):
        for step in range(3):
            pair.step(step)
            pair.check()


@pytest.mark.parametrize("desc,kwargs,refused", REFUSED, ids=[d for d, _, _ in REFUSED])
def test_torch_adamw_input_refused_with_a_message(desc, kwargs, refused):
    params = make_params()
    error, regex = refused
    with pytest.raises(error, match=regex):
        SparseAdamW(params, [random_mask(p, 0.05, seed=0) for p in params], **kwargs)
    # torch takes it (on this device, or on CUDA): the refusal is SparseAdamW's own
    if not kwargs.get("capturable"):
        torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], **kwargs)


@pytest.mark.parametrize("desc,kwargs,answer", ERROR_INPUTS, ids=[d for d, _, _ in ERROR_INPUTS])
def test_torch_adamw_error_input(desc, kwargs, answer):
    params = make_params()
    masks = [random_mask(p, 0.05, seed=0) for p in params]
    with pytest.raises(ValueError):
        torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], **kwargs)
    if answer is not None:
        error, regex = answer
        with pytest.raises(error, match=regex):
            SparseAdamW(params, masks, **kwargs)
    else:  # a limit of torch's foreach kernels that SparseAdamW's kernels do not have: it runs like AdamW
        torch_kwargs = dict(kwargs, foreach=False)
        if "betas" in kwargs:
            torch_kwargs["betas"] = tuple(float(b) for b in kwargs["betas"])
        pair = Pair(kwargs, 0.05, torch_kwargs=torch_kwargs)
        for step in range(3):
            pair.step(step)
            pair.check()


def test_param_types_and_duplicates_are_refused():
    """torch's error inputs common to all optimizers: a tensor as params, a param twice
    (torch warns and updates it twice; SparseAdamW refuses: it would compact its gradient
    twice), a param in two groups."""
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    mask = random_mask(p, 0.5, seed=0)
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        SparseAdamW(p, [mask])
    with pytest.raises(ValueError, match="more than once"), pytest.warns(UserWarning, match="duplicate"):
        SparseAdamW([p, p], [mask, mask])
    with pytest.raises(ValueError, match="more than one parameter group"):
        SparseAdamW([{"params": [p]}, {"params": [p]}], [mask, mask])


def test_default_hyperparameters_are_torch_adamws():
    params = make_params()
    ours = SparseAdamW(params, [random_mask(p, 1.0, seed=0) for p in params]).defaults
    theirs = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params]).defaults
    assert {k: ours[k] for k in theirs} == theirs


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 4], gamma=0.3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
         torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_lr_scheduler_drives_it_like_adamw(name, density):
    """The scheduler sets lr (and, for OneCycleLR / CyclicLR, beta1) in SparseAdamW's groups
    as in AdamW's; the params follow."""
    pair = Pair({"lr": 1e-2, "weight_decay": 0.05}, density)
    scheds = [SCHEDULERS[name](pair.sparse), SCHEDULERS[name](pair.torch_opt)]
    for step in range(8):
        pair.step(step)
        for s in scheds:
            s.step(*([float(step % 3)] if name == "ReduceLROnPlateau" else []))
        assert pair.sparse.param_groups[0]["lr"] == pair.torch_opt.param_groups[0]["lr"]
        assert pair.sparse.param_groups[0]["betas"] == pair.torch_opt.param_groups[0]["betas"]
        pair.check()


def _through(how: str, opt: SparseAdamW) -> dict:
    sd = opt.state_dict()
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)
    return copy.deepcopy(sd) if how == "deepcopy" else pickle.loads(pickle.dumps(sd))


OPTIONS = {"plain": {}, "amsgrad": {"amsgrad": True}, "tensor lr": {"lr": torch.tensor(0.01)},
           "maximize": {"maximize": True, "weight_decay": 0.1}}


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("how", ["torch.save", "deepcopy", "pickle"])
@pytest.mark.parametrize("options", OPTIONS)
def test_state_dict_round_trip_continues_identically(options, how, density):
    """torch's test_state_dict_deterministic / test_save_load_equality_with_weights_only:
    a run interrupted by a save and a load into a new optimizer continues bit for bit."""
    kwargs = OPTIONS[options]
    params = make_params()
    masks = [random_mask(p, density, seed=i) for i, p in enumerate(params)]
    opt = SparseAdamW(params, masks, **kwargs)
    train(params, opt, range(3))
    saved_params = [p.detach().clone() for p in params]
    sd = _through(how, opt)
    train(params, opt, range(3, 6))
    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    fresh = SparseAdamW(resumed, [random_mask(p, density, seed=i) for i, p in enumerate(resumed)], **kwargs)
    fresh.load_state_dict(sd)
    assert fresh.state_dict()["param_groups"] == _through(how, opt)["param_groups"]
    train(resumed, fresh, range(3, 6))
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_continues_identically(how):
    """torch's test_deepcopy_copies_all_public_attrs, and a copy that steps like the original."""
    params = make_params()
    opt = SparseAdamW(params, [random_mask(p, 0.05, seed=i) for i, p in enumerate(params)], weight_decay=0.1)
    train(params, opt, range(2))
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(twin) if not k.startswith("_")}
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    train(params, opt, range(2, 5))
    train(twin_params, twin, range(2, 5))
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def test_older_state_dict_without_flags_takes_torch_defaults():
    """torch's test_can_load_older_state_dict: a state dict without the flags newer
    versions added loads with torch's defaults for them (maximize=False, ...), and steps."""
    params = make_params()
    masks = [random_mask(p, 0.05, seed=i) for i, p in enumerate(params)]
    opt = SparseAdamW(params, masks, maximize=True, foreach=True)
    train(params, opt, range(2))
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in ("foreach", "differentiable", "fused", "maximize", "capturable", "decoupled_weight_decay"):
            del group[flag]
    opt.load_state_dict(old)
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).param_groups[0]
    for flag in ("foreach", "differentiable", "fused", "maximize", "capturable", "decoupled_weight_decay"):
        assert opt.param_groups[0][flag] == reference[flag], flag
    train(params, opt, range(2, 3))


def test_a_torch_adamw_state_dict_is_refused_with_a_message():
    """torch.optim.AdamW's state holds dense moments and no mask: not SparseAdamW's."""
    params = make_params()
    dense = torch.optim.AdamW(params)
    train(params, dense, range(1))
    opt = SparseAdamW(params, [random_mask(p, 1.0, seed=i) for i, p in enumerate(params)])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="holds no mask"):
        opt.load_state_dict(dense.state_dict())
    assert repr(opt.state_dict()) == repr(before)


def test_a_tensor_step_as_torch_saves_it_loads():
    """torch's test_load_nontensor_step, the other way round: torch keeps step as a float
    tensor, SparseAdamW as an int; either loads."""
    params = make_params()
    opt = SparseAdamW(params, [random_mask(p, 0.05, seed=i) for i, p in enumerate(params)])
    train(params, opt, range(2))
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        s["step"] = torch.tensor(float(s["step"]))
    opt.load_state_dict(sd)
    assert all(opt.state[p]["step"] == 2 and isinstance(opt.state[p]["step"], int) for p in params)


def test_optimizer_hooks_run_as_torchs():
    """torch's test_step_all_hooks / test_state_dict_pre_hook / test_load_state_dict_*_hook."""
    params = make_params()
    opt = SparseAdamW(params, [random_mask(p, 0.05, seed=i) for i, p in enumerate(params)])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    train(params, opt, range(1))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["step pre", "step post", "sd pre", "sd post", "load pre", "load post"]


def test_closure_loss_is_returned():
    """torch's closure protocol: step(closure) evaluates it with grad enabled and returns its loss."""
    params = make_params()
    opt = SparseAdamW(params, [random_mask(p, 0.05, seed=i) for i, p in enumerate(params)])

    def closure():
        opt.zero_grad()
        loss = loss_of(params, coefficients(0))
        loss.backward()
        return loss

    pair = Pair({}, 0.05)
    loss = opt.step(closure)
    pair.step(0)
    assert loss is not None and loss.requires_grad
    for p, q in zip(params, pair.params):
        assert torch.equal(p, q)
