"""seat.ops.fused_linear_paired_loss: the paired loss on hidden @ weight.T (+ bias).

Oracle: the paired-loss oracle (F.cross_entropy + kl_weight * F.kl_div KL) on logits built
in float64 from the same (upcast) hidden, weight and bias, with autograd for the gradient
w.r.t. hidden. Every test runs on each backend that has a kernel for the op.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _loss_cases import FUSED_N_CE as N_CE, FUSED_VOCAB as VOCAB, loss_tol
from _loss_cases import fused_check as check, fused_make_inputs as make_inputs, fused_oracle as oracle, fused_run as run
from conftest import backend_device, tol
from seat import ops

OP = "fused_linear_paired_loss"
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# --------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("kl_weight", [0.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_oracle(backend, dtype, bias, reduction, kl_weight):
    device = backend_device(OP, backend)
    inputs = make_inputs(dtype, seed=1, device=device, bias=bias)
    _, ce, kl, _ = check(backend, inputs, kl_weight=kl_weight, reduction=reduction)
    assert ce > 0 and kl > 0


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_chunk_size_does_not_change_the_result(backend, dtype, bias):
    device = backend_device(OP, backend)
    inputs = make_inputs(dtype, seed=2, device=device, bias=bias, n_ce=9, n_kl=8)
    mask = torch.tensor([True, False, True, True, True, True, False, True], device=device)
    results = {}
    for chunk_size in (0, 1, 7):
        results[chunk_size] = check(backend, inputs, mask, chunk_size=chunk_size, kl_weight=1.5,
                                    combine=lambda loss, ce, kl: loss + ce)
    for chunk_size in (1, 7):
        for got, want in zip(results[chunk_size], results[0]):
            assert torch.equal(got, want), f"chunk_size={chunk_size} differs from chunk_size=0"


@pytest.mark.parametrize(
    "combine",
    [lambda loss, ce, kl: ce, lambda loss, ce, kl: kl, lambda loss, ce, kl: 2 * loss + ce],
    ids=["ce-only", "kl-only", "2loss+ce"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gradient_into_any_output(backend, dtype, combine):
    device = backend_device(OP, backend)
    check(backend, make_inputs(dtype, seed=3, device=device, bias=True), kl_weight=2.5, combine=combine)


@pytest.mark.parametrize("kl_weight", [0.0, 0.5, 4.0])
def test_kl_weight_scales_only_the_x_tilde_rows(backend, kl_weight):
    """d loss / d hidden: the x rows get the CE gradient, the x~ rows kl_weight times the KL one."""
    device = backend_device(OP, backend)
    inputs = make_inputs(torch.float64, seed=9, device=device)
    _, _, _, grad = run(backend, **inputs, kl_weight=kl_weight)
    _, _, _, ce_grad = run(backend, **inputs, kl_weight=kl_weight, combine=lambda loss, ce, kl: ce)
    _, _, _, kl_grad = run(backend, **inputs, kl_weight=kl_weight, combine=lambda loss, ce, kl: kl)
    torch.testing.assert_close(grad[:N_CE], ce_grad[:N_CE], **tol(torch.float64))
    torch.testing.assert_close(grad[N_CE:], kl_weight * kl_grad[N_CE:], **tol(torch.float64))
    assert torch.equal(ce_grad[N_CE:], torch.zeros_like(ce_grad[N_CE:]))
    assert torch.equal(kl_grad[:N_CE], torch.zeros_like(kl_grad[:N_CE]))


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.5),
        dict(temperature=2.0, reverse_kl=True),
        dict(ce_num_items=11.0, kl_num_items=3.0),
        dict(ignore_index=4),
        dict(kl_mask=[False, True, False, True]),
        dict(kl_mask=[False] * 4),
    ],
    ids=["T0.5", "T2-reverse", "num-items", "ignore-index-4", "kl-mask", "kl-all-masked"],
)
def test_options(backend, options):
    device = backend_device(OP, backend)
    inputs = make_inputs(torch.float32, seed=4, device=device, bias=True)
    options = dict(options)
    mask = options.pop("kl_mask", None)
    mask = None if mask is None else torch.tensor(mask, device=device)
    if "ignore_index" in options:  # an in-vocabulary id as the ignore marker
        labels = inputs["labels"]
        labels[labels == -100] = options["ignore_index"]
        labels[1] = options["ignore_index"]
    _, _, kl, grad = check(backend, inputs, mask, kl_weight=1.5, **options)
    if mask is not None and not mask.any():
        assert torch.equal(kl, torch.zeros_like(kl))
        assert torch.equal(grad[N_CE:], torch.zeros_like(grad[N_CE:]))


def test_all_labels_ignored(backend):
    device = backend_device(OP, backend)
    inputs = make_inputs(torch.float32, seed=5, device=device, n_ignored=N_CE)
    loss, ce, _, grad = check(backend, inputs, combine=lambda loss, ce, kl: loss + ce)
    assert torch.equal(ce, torch.zeros_like(ce))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[:N_CE], torch.zeros_like(grad[:N_CE]))


def test_matches_paired_loss_on_the_logits(backend):
    """Same loss as paired_loss on hidden @ weight.T + bias (float64 inputs: to fp64 rounding)."""
    device = backend_device(OP, backend)
    inputs = make_inputs(torch.float64, seed=6, device=device, bias=True)
    got = run(backend, **inputs, kl_weight=0.8)
    h = inputs["hidden"].detach().requires_grad_()
    logits = F.linear(h, inputs["weight"], inputs["bias"])
    ref_logits = F.linear(inputs["ref_hidden"], inputs["weight"], inputs["bias"])
    with ops.use_backend("reference"):
        expected = ops.paired_loss(logits, inputs["labels"], ref_logits, kl_weight=0.8)
    expected[0].backward()
    for value, want in zip(got, (*expected, h.grad)):
        torch.testing.assert_close(value, want.detach(), **tol(torch.float64))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a["weight"].requires_grad_(), ValueError, "weight requires grad"),
        (lambda a: a["bias"].requires_grad_(), ValueError, "bias requires grad"),
        (lambda a: a["ref_hidden"].requires_grad_(), ValueError, "ref_hidden requires grad"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight must have dtype float32"),
        (lambda a: a.update(weight=a["weight"].half()), TypeError, "weight must have dtype float32"),
        (lambda a: a.update(ref_hidden=a["ref_hidden"].bfloat16()), TypeError, "ref_hidden must have dtype"),
        (lambda a: a.update(bias=a["bias"].double()), TypeError, "bias must have dtype"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight must be"),
        (lambda a: a.update(ref_hidden=a["ref_hidden"][:, :-1]), ValueError, "ref_hidden must have hidden's width"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias must have weight.shape"),
        (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "hidden must have labels.numel"),
        (lambda a: a["labels"].__setitem__(0, VOCAB), ValueError, f"labels holds {VOCAB}, outside"),
        (lambda a: a.update(chunk_size=-1), ValueError, "chunk_size must be >= 0"),
        (lambda a: a.update(reduction="none"), ValueError, "reduction must be one of"),
    ],
    ids=["weight-requires-grad", "bias-requires-grad", "ref-requires-grad", "weight-fp64", "weight-fp16",
         "ref-dtype", "bias-dtype", "weight-width", "ref-width", "bias-length", "rows-vs-labels",
         "label-too-big", "chunk-size", "reduction-none"],
)
def test_bad_inputs(backend, change, error, match):
    device = backend_device(OP, backend)
    args = make_inputs(torch.float32, seed=7, device=device, bias=True)
    args["hidden"].requires_grad_()
    change(args)
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.fused_linear_paired_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"),
                                     args.pop("ref_hidden"), None, args.pop("bias"), **args)


def test_frozen_weight_may_require_grad_under_no_grad(backend):
    """The frozen-weight rule is about autograd: with grad disabled nothing is refused."""
    device = backend_device(OP, backend)
    inputs = make_inputs(torch.float32, seed=8, device=device, bias=True)
    for name in ("weight", "bias", "ref_hidden"):
        inputs[name].requires_grad_()
    with ops.use_backend(backend), torch.no_grad():
        outputs = ops.fused_linear_paired_loss(inputs["hidden"], inputs["weight"], inputs["labels"],
                                               inputs["ref_hidden"], None, inputs["bias"])
    for got, want in zip(outputs, oracle(**inputs)[:3]):
        torch.testing.assert_close(got.double().cpu(), want, **loss_tol(torch.float32))
