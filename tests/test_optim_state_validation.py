"""SparseAdamW.load_state_dict checks a state dict whole before replacing anything (a
refused dict leaves the optimizer exactly as it was: same state_dict, same next step as an
untouched twin); the nonfinite option (raise / skip / apply); updates_forbidden."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from seat.masks import random_mask
from seat.optim import SparseAdamW

MODES = {
    "fp32": dict(),
    "amsgrad": dict(amsgrad=True),
    "bf16 master": dict(master_weights=True),
    "8-bit": dict(state_bits=8),
    "dense_state": dict(dense_state=True),
}


def _params(mode: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if mode == "bf16 master" else torch.float32
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in ((30, 20), (50,))]


def _opt(mode: str, params, **extra):
    masks = [random_mask(p, 0.3, seed=i) for i, p in enumerate(params)]
    return SparseAdamW(params, masks, lr=1e-2, **MODES[mode], **extra)


def _train(params, opt, steps, nan_at=None):
    for step in steps:
        g = torch.Generator().manual_seed(step)
        coefs = [torch.randn(p.shape, generator=g) for p in params]
        if nan_at is not None:
            coefs[nan_at].fill_(float("nan"))
        sum((p.float() * c).sum() + (p.float() ** 2).sum() for p, c in zip(params, coefs)).backward()
        opt.step()
        opt.zero_grad()


def _same(a, b) -> bool:
    """Deep equality of state dicts: tensors by dtype and value, the rest by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _set(where, key, value):
    def tamper(sd):
        target = sd["param_groups"][0] if where == "group" else sd["state"][0]
        if value is KeyError:
            del target[key]
        else:
            target[key] = value(target[key]) if callable(value) else value
    return tamper


def _grow(t):
    return torch.cat([t, t[:1]])


# name -> (tamper(sd) in place, error regex, modes it applies to; None = all)
TAMPERS = {
    "one group too many": (lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])),
                           "2 param groups", None),
    "a param id fewer": (lambda sd: sd["param_groups"][0]["params"].pop(), "params in state_dict", None),
    "a param id twice": (lambda sd: sd["param_groups"][0]["params"].__setitem__(1, 0), "repeats param id", None),
    "state of an unknown id": (lambda sd: sd["state"].__setitem__(7, sd["state"][0]), "for no param", None),
    "a param's state missing": (lambda sd: sd["state"].pop(1), "is missing", None),
    "state not a dict": (lambda sd: sd["state"].__setitem__(0, [1, 2]), "must be a dict", None),
    "no mask": (_set("state", "idx", KeyError), "holds no mask", None),
    "another mask": (_set("state", "idx", lambda t: torch.unique(t + 1).to(torch.int32)), "mask for parameter 0",
                     None),
    "exp_avg one entry longer": (_set("state", "exp_avg", _grow), "exp_avg must be a", ("fp32", "8-bit")),
    "exp_avg float64": (_set("state", "exp_avg", lambda t: t.double()), "exp_avg must be a torch.float32",
                        ("fp32", "amsgrad")),
    "exp_avg 2-d": (_set("state", "exp_avg", lambda t: t.view(1, -1)), "exp_avg must be a", ("fp32",)),
    "compact state in dense_state mode": (
        lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"][:180]), "shape", ("dense_state",)),
    "exp_avg holds NaN": (_set("state", "exp_avg", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                          "NaN or inf", ("fp32",)),
    "exp_avg_sq negative": (_set("state", "exp_avg_sq", lambda t: t - 1.0), "negative", ("fp32", "amsgrad")),
    "exp_avg_sq missing": (_set("state", "exp_avg_sq", KeyError), r"missing \['exp_avg_sq'\]", ("fp32",)),
    "max_exp_avg_sq without amsgrad": (
        lambda sd: sd["state"][0].update(max_exp_avg_sq=sd["state"][0]["exp_avg_sq"].clone()),
        r"unexpected \['max_exp_avg_sq'\]", ("fp32",)),
    "amsgrad without max_exp_avg_sq": (_set("group", "amsgrad", True), r"missing \['max_exp_avg_sq'\]",
                                       ("fp32",)),
    "amsgrad with 8-bit state": (_set("group", "amsgrad", True), "state_bits=8 does not support", ("8-bit",)),
    "master missing": (_set("state", "master", KeyError), r"missing \['master'\]", ("bf16 master",)),
    "master_weights off with a master": (_set("group", "master_weights", False), r"unexpected \['master'\]",
                                         ("bf16 master",)),
    "absmax one block longer": (_set("state", "exp_avg_absmax", _grow), "exp_avg_absmax must be", ("8-bit",)),
    "codes as fp32": (_set("state", "exp_avg", lambda t: t.float()), "exp_avg must be a torch.uint8",
                      ("8-bit",)),
    "step -1": (_set("state", "step", -1), "non-negative integer", None),
    "step 1.5": (_set("state", "step", 1.5), "non-negative integer", None),
    "step as text": (_set("state", "step", "2"), "step must be an integer", None),
    "step True": (_set("state", "step", True), "step must be an integer", None),
    "step of two numbers": (_set("state", "step", torch.tensor([1.0, 2.0])), "step must be one number", None),
    "lr -1": (_set("group", "lr", -1.0), "lr must be >= 0", None),
    "lr NaN": (_set("group", "lr", float("nan")), "lr must be >= 0", None),
    "lr as text": (_set("group", "lr", "0.1"), "lr must be a number", None),
    "beta1 1.0": (_set("group", "betas", (1.0, 0.999)), r"betas\[0\] must be in \[0, 1\)", None),
    "one beta": (_set("group", "betas", (0.9,)), "betas must be a pair", None),
    "eps 0": (_set("group", "eps", 0.0), "eps must be > 0", None),
    "weight_decay -0.1": (_set("group", "weight_decay", -0.1), "weight_decay must be >= 0", None),
    "no lr": (_set("group", "lr", KeyError), "has no lr", None),
    "maximize as text": (_set("group", "maximize", "yes"), "maximize must be True or False", None),
    "capturable": (_set("group", "capturable", True), "capturable=True is not supported", None),
    "Adam's L2 decay": (_set("group", "decoupled_weight_decay", False), "not AdamW", None),
    "skipped_steps -1": (lambda sd: sd.__setitem__("skipped_steps", -1), "skipped_steps", None),
    "no state": (lambda sd: sd.pop("state"), "'state' and 'param_groups'", None),
}
CASES = [(name, mode) for name, (_, regex, modes) in TAMPERS.items() for mode in (MODES if modes is None else modes)]


_TRAINED: dict[str, SparseAdamW] = {}


def _trained(mode: str) -> tuple[list, SparseAdamW]:
    """A copy of an optimizer of `mode` trained two steps (trained once per mode), and its params."""
    if mode not in _TRAINED:
        params = _params(mode)
        _TRAINED[mode] = _opt(mode, params)
        _train(params, _TRAINED[mode], range(2))
    opt = copy.deepcopy(_TRAINED[mode])  # the copy owns copies of the params, with its own hooks
    return [p for g in opt.param_groups for p in g["params"]], opt


@pytest.mark.parametrize("name,mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_a_refused_state_dict_changes_nothing(name, mode):
    tamper, regex, _ = TAMPERS[name]
    (params, opt), (twin_params, twin) = _trained(mode), _trained(mode)
    bad = copy.deepcopy(opt.state_dict())
    tamper(bad)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=regex):
        opt.load_state_dict(bad)
    assert _same(opt.state_dict(), before)
    _train(params, opt, range(2, 3))
    _train(twin_params, twin, range(2, 3))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


@pytest.mark.parametrize("mode", MODES)
def test_an_untampered_state_dict_loads_in_every_mode(mode):
    params, twin_params = _params(mode), _params(mode)
    opt, twin = _opt(mode, params), _opt(mode, twin_params)
    _train(params, opt, range(2))
    _train(twin_params, twin, range(2))
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(params, opt, range(2, 4))
    _train(twin_params, twin, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_a_param_group_added_later_is_refused():
    params = _params("fp32")
    opt = _opt("fp32", params[:1])
    with pytest.raises(RuntimeError, match="takes its params and their masks at construction"):
        opt.add_param_group({"params": params[1:]})
    assert len(opt.param_groups) == 1


def test_missing_group_flags_take_torch_adamw_defaults():
    """A state dict without maximize (an older one) loads maximize=False, as torch.optim.AdamW
    does; the optimizer's own value does not survive."""
    params = _params("fp32")
    opt = _opt("fp32", params, maximize=True, master_weights=True, stochastic_rounding=True)
    sd = copy.deepcopy(opt.state_dict())
    for key in ("maximize", "amsgrad", "master_weights", "stochastic_rounding"):
        del sd["param_groups"][0][key]
    opt.load_state_dict(sd)
    assert not any(opt.param_groups[0][k] for k in ("maximize", "amsgrad", "master_weights", "stochastic_rounding"))


def test_a_loaded_tensor_lr_is_the_optimizers_own():
    """As torch: the loaded groups are copies, so a scheduler on one optimizer does not move
    another's tensor lr."""
    params = _params("fp32")
    a = _opt("fp32", params)
    a.param_groups[0]["lr"] = torch.tensor(0.01)
    b = _opt("fp32", _params("fp32"))
    b.load_state_dict(a.state_dict())
    a.param_groups[0]["lr"].fill_(0.5)
    assert float(b.param_groups[0]["lr"]) == pytest.approx(0.01)


# ------------------------------------------------------------------ nonfinite

@pytest.mark.parametrize("mode", ["fp32", "8-bit"])
def test_nonfinite_raise_names_the_step_and_param_and_changes_nothing(mode):
    params, twin_params = _params(mode), _params(mode)
    opt, twin = _opt(mode, params), _opt(mode, twin_params)
    _train(params, opt, range(2))
    _train(twin_params, twin, range(2))
    before, values = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"step 3: the gradient of parameter 1 of param group 0 \(shape \(50,\)\)"):
        _train(params, opt, range(2, 3), nan_at=1)
    assert _same(opt.state_dict(), before) and all(torch.equal(a, b) for a, b in zip(params, values))
    opt.zero_grad()
    _train(params, opt, range(2, 4))
    _train(twin_params, twin, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_a_huge_finite_gradient_is_not_taken_for_nonfinite():
    """The fused check's norm overflows at |g| ~ 1e20 (fp32): confirmed entry by entry, such a
    gradient is stepped (as torch.optim.AdamW would), and a real inf next to it is found."""
    params = _params("fp32")
    opt = _opt("fp32", params)
    ref = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    for p, q in zip(params, ref.param_groups[0]["params"]):
        p.grad = torch.full_like(p, 1e30)
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    mask = opt._masks[params[0]].indices().long()
    torch.testing.assert_close(params[0].view(-1)[mask], ref.param_groups[0]["params"][0].view(-1)[mask])
    params[0].grad = torch.full_like(params[0], 1e30)
    params[1].grad = torch.full_like(params[1], float("-inf"))
    with pytest.raises(RuntimeError, match="gradient of parameter 1 of param group 0"):
        opt.step()


def test_nonfinite_raise_names_a_named_param():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = SparseAdamW([("layer.weight", p)], [random_mask(p, 0.5, seed=0)])
    p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(RuntimeError, match="parameter 0 'layer.weight' of param group 0"):
        opt.step()


def test_nonfinite_skip_warns_counts_and_saves_the_count():
    params, twin_params = _params("fp32"), _params("fp32")
    opt, twin = _opt("fp32", params, nonfinite="skip"), _opt("fp32", twin_params)
    _train(params, opt, range(2))
    _train(twin_params, twin, range(2))
    before = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="step 3 skipped"):
        _train(params, opt, range(2, 3), nan_at=0)
    assert opt.skipped_steps == 1
    after = opt.state_dict()
    assert after.pop("skipped_steps") == 1 and before.pop("skipped_steps") == 0 and _same(after, before)
    resumed = _opt("fp32", [torch.nn.Parameter(p.detach().clone()) for p in params], nonfinite="skip")
    resumed.load_state_dict(opt.state_dict())
    assert resumed.skipped_steps == 1
    _train(params, opt, range(2, 4))
    _train(twin_params, twin, range(2, 4))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


def test_nonfinite_apply_spreads_as_torch_adamw_does():
    params = _params("fp32")
    opt = _opt("fp32", params, nonfinite="apply")
    ref = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=1e-2)
    mask = opt._masks[params[0]].indices().long()
    params[0].grad = torch.full_like(params[0], float("nan"))
    ref.param_groups[0]["params"][0].grad = torch.full_like(params[0], float("nan"))
    opt.step()
    ref.step()
    assert params[0].view(-1)[mask].isnan().all() and ref.param_groups[0]["params"][0].isnan().all()
    assert not params[0].view(-1)[torch.ones(params[0].numel(), dtype=torch.bool).index_fill(0, mask, False)
                                  ].isnan().any()


def test_nonfinite_in_backward_is_checked_per_param():
    """update_in_backward: the hook of the param with the NaN raises before its update; a
    param whose hook ran before keeps its update."""
    params = _params("fp32")
    opt = _opt("fp32", params, update_in_backward=True)
    before = [p.detach().clone() for p in params]
    # (autograd runs the later-built branch first: params[0]'s hook before params[1]'s)
    loss = (params[1] * float("nan")).sum() + (params[0] ** 2).sum()
    with pytest.raises(RuntimeError, match="parameter 1 of param group 0.*its update was not applied"):
        loss.backward()
    assert torch.equal(params[1], before[1]) and opt.state[params[1]]["step"] == 0
    assert not torch.equal(params[0], before[0]) and opt.state[params[0]]["step"] == 1


def test_nonfinite_option_is_checked():
    params = _params("fp32")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        _opt("fp32", params, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite='skip' needs the whole step"):
        _opt("fp32", params, nonfinite="skip", update_in_backward=True)


# ------------------------------------------------------------------ updates_forbidden

def test_updates_forbidden_refuses_step_nests_and_ends():
    params, twin_params = _params("fp32"), _params("fp32")
    opt, twin = _opt("fp32", params), _opt("fp32", twin_params)
    _train(params, opt, range(1))
    _train(twin_params, twin, range(1))
    before = copy.deepcopy(opt.state_dict())
    sum((p ** 2).sum() for p in params).backward()
    with opt.updates_forbidden("outer: the model holds its base values"):
        with opt.updates_forbidden("inner reason"):
            with pytest.raises(RuntimeError, match="^inner reason$"):
                opt.step()
        with pytest.raises(RuntimeError, match="^outer: the model holds its base values$"):
            opt.step()
        assert copy.deepcopy(opt) is not None and not copy.deepcopy(opt)._forbidden  # a copy is not held
    with pytest.raises(KeyError), opt.updates_forbidden("left by an exception"):
        raise KeyError("x")
    assert _same(opt.state_dict(), before)
    opt.step()  # the gradient kept through the refusals is applied now
    opt.zero_grad()
    sum((p ** 2).sum() for p in twin_params).backward()
    twin.step()
    twin.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    with pytest.raises(ValueError, match="non-empty reason"):
        with opt.updates_forbidden(""):
            pass


def test_updates_forbidden_refuses_the_update_in_backward_hooks():
    params = _params("fp32")
    opt = _opt("fp32", params, update_in_backward=True)
    before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    with opt.updates_forbidden("reference pass"):
        with pytest.raises(RuntimeError, match="^reference pass$"):
            sum((p ** 2).sum() for p in params).backward()
    assert _same(opt.state_dict(), before[0]) and all(torch.equal(a, b) for a, b in zip(params, before[1]))
    assert all(p.grad is None for p in params)  # the refused gradient is not applied later
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    _train(params, opt, range(1))
    assert all(opt.state[p]["step"] == 1 for p in params)
