"""seat.ops.kl_div: value and gradient w.r.t. logits_cur against a float64 torch oracle.

The oracle is torch.nn.functional.kl_div on log_softmax(logits / T) with autograd, in
float64, fed the same (upcast) input values as the op. Every test runs on each backend
that has a kl_div kernel (the others skip).
"""
from __future__ import annotations

import pytest
import torch

from _loss_cases import kl_check as check, kl_oracle as oracle, kl_pair as pair, kl_randn as randn, kl_run as run
from _loss_cases import loss_tol
from conftest import backend_device, tol
from seat import ops

OP = "kl_div"
NEG_INF = float("-inf")
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def shape_for(vocab, ndim):
    lead = (2, 3) if vocab <= 4097 else (1, 2)
    return (lead[0] * lead[1], vocab) if ndim == 2 else (*lead, vocab)


# --------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("vocab", [1, 17, 4097, 32000])
def test_matches_oracle(backend, vocab, ndim, dtype, reduction):
    if vocab == 32000 and backend != "reference":
        pytest.skip("vocab 32000 is checked on the reference backend only")
    device = backend_device(OP, backend)
    shape = shape_for(vocab, ndim)
    cur, ref = pair(shape, dtype, seed=1, device=device)
    loss, _ = check(backend, cur, ref, reduction=reduction)
    assert loss.shape == (shape[:-1] if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mask(backend, dtype, reduction):
    device = backend_device(OP, backend)
    cur, ref = pair((2, 4, 33), dtype, seed=3, device=device)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]], device=device)
    loss, grad = check(backend, cur, ref, mask, reduction=reduction)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # masked rows: exactly no gradient
    assert grad[mask].abs().amax() > 0
    if reduction == "none":
        assert torch.equal(loss[~mask], torch.zeros_like(loss[~mask]))


@pytest.mark.parametrize("num_items", [None, 5.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fully_masked_is_zero(backend, reduction, num_items):
    if num_items is not None and reduction != "mean":
        pytest.skip("num_items needs reduction='mean'")
    device = backend_device(OP, backend)
    cur, ref = pair((3, 2, 17), torch.float32, seed=5, device=device)
    mask = torch.zeros((3, 2), dtype=torch.bool, device=device)
    loss, grad = run(backend, cur, ref, mask, reduction=reduction, num_items=num_items)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("num_items", [1, 3.5, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_num_items(backend, num_items, masked):
    device = backend_device(OP, backend)
    cur, ref = pair((6, 17), torch.float32, seed=7, device=device)
    mask = torch.tensor([True, True, False, True, False, True], device=device) if masked else None
    loss, _ = check(backend, cur, ref, mask, reduction="mean", num_items=num_items)
    total, _ = run(backend, cur, ref, mask, reduction="sum")
    torch.testing.assert_close(loss, total / num_items)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_and_reverse(backend, temperature, reverse, dtype):
    device = backend_device(OP, backend)
    cur, ref = pair((5, 129), dtype, seed=9, device=device)
    check(backend, cur, ref, temperature=temperature, reverse=reverse, reduction="mean")
    check(backend, cur, ref, temperature=temperature, reverse=reverse, reduction="none")


def test_reverse_is_the_other_direction(backend):
    """KL is asymmetric: reverse=True on (cur, ref) equals forward on (ref, cur)."""
    device = backend_device(OP, backend)
    cur, ref = pair((4, 65), torch.float64, seed=11, device=device)
    with ops.use_backend(backend):
        forward = ops.kl_div(cur, ref, reduction="none")
        reverse = ops.kl_div(cur, ref, reduction="none", reverse=True)
        swapped = ops.kl_div(ref, cur, reduction="none")
    torch.testing.assert_close(reverse, swapped, **tol(torch.float64))
    assert (forward - reverse).abs().amax() > 1e-3


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grad_output(backend, dtype, reduction):
    device = backend_device(OP, backend)
    cur, ref = pair((3, 2, 50), dtype, seed=13, device=device)
    if reduction == "none":
        grad_output = randn((3, 2), torch.float32, seed=15, scale=2.0, device=device)
    else:
        grad_output = torch.tensor(3.5, device=device)
    check(backend, cur, ref, reduction=reduction, grad_output=grad_output)


def test_scaled_loss_backward(backend):
    """(loss * 3.5).backward() gives 3.5 times the gradient of loss.backward()."""
    device = backend_device(OP, backend)
    cur, ref = pair((4, 31), torch.float32, seed=16, device=device)
    _, grad = run(backend, cur, ref)
    leaf = cur.detach().requires_grad_()
    with ops.use_backend(backend):
        (ops.kl_div(leaf, ref) * 3.5).backward()
    torch.testing.assert_close(leaf.grad, grad * 3.5)
    _, expected = oracle(cur, ref, grad_output=torch.tensor(3.5, dtype=torch.float64))
    torch.testing.assert_close(leaf.grad.cpu().double(), expected, **tol(torch.float32))


def test_backward_twice_and_into_an_existing_grad(backend):
    """The saved row gradient survives what autograd users do with theirs: a second
    backward (retain_graph), accumulation into an existing .grad, that .grad zeroed in
    place between the two (as torch's own ops allow)."""
    device = backend_device(OP, backend)
    cur, ref = pair((5, 37), torch.float32, seed=21, device=device)
    _, grad = run(backend, cur, ref)
    leaf = cur.detach().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.kl_div(leaf, ref)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)
    leaf.grad.zero_()  # an optimizer's zero_grad(set_to_none=False) between the two
    loss.backward(retain_graph=True)
    torch.testing.assert_close(leaf.grad, grad, rtol=0, atol=0)
    loss.backward()
    torch.testing.assert_close(leaf.grad, 2 * grad, rtol=0, atol=0)


@pytest.mark.parametrize("keep", ["output", "detached alias"])
def test_a_kept_gradient_output_is_never_changed(backend, keep):
    """The op's own gradient output, kept by a caller of torch.ops.seat.kl_div (as is, or
    a detached alias of it), is never the buffer that becomes .grad, which later backward
    calls accumulate into."""
    device = backend_device(OP, backend)
    cur, ref = pair((3, 21), torch.float32, seed=22, device=device)
    leaf = cur.detach().requires_grad_()
    with ops.use_backend(backend):
        loss, out = torch.ops.seat.kl_div(leaf, ref, None, temperature=1.0, reduction="mean", num_items=None,
                                          reverse=False, compute_grad=True)
        kept = out if keep == "output" else out.detach()
        del out
        before = kept.detach().clone()
        loss.backward()
        assert kept.data_ptr() != leaf.grad.data_ptr()
        ops.kl_div(leaf, ref).backward()
        leaf.grad.add_(1.0)
    assert torch.equal(kept.detach(), before)


def test_autograd_grad_gives_a_plain_tensor_usable_in_another_graph(backend):
    """torch.autograd.grad's result is a detached tensor (no grad_fn of the op) that can
    enter a new computation and be backpropagated through it."""
    device = backend_device(OP, backend)
    cur, ref = pair((4, 19), torch.float32, seed=23, device=device)
    _, expected = run(backend, cur, ref)
    leaf = cur.detach().requires_grad_()
    weight = torch.ones((), device=device, requires_grad=True)
    with ops.use_backend(backend):
        (grad,) = torch.autograd.grad(ops.kl_div(leaf, ref), leaf)
    assert not grad.requires_grad and grad.grad_fn is None
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    (grad * weight).sum().backward()
    torch.testing.assert_close(weight.grad, expected.sum())


def test_batched_output_gradients(backend):
    """is_grads_batched=True (vmap over output gradients) works like torch's own ops."""
    device = backend_device(OP, backend)
    cur, ref = pair((3, 17), torch.float32, seed=24, device=device)
    _, expected = run(backend, cur, ref, reduction="sum")
    leaf = cur.detach().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.kl_div(leaf, ref, reduction="sum")
    scales = torch.tensor([1.0, 2.0], device=device)
    (grads,) = torch.autograd.grad(loss, leaf, scales, is_grads_batched=True)
    torch.testing.assert_close(grads, torch.stack([expected, 2 * expected]))


# --------------------------------------------------------------------------- special values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "where, reverse",
    [("ref", False), ("cur", True), ("both", False), ("both", True)],
    ids=["ref-forward", "cur-reverse", "both-forward", "both-reverse"],
)
def test_neg_inf_logits(backend, where, reverse, dtype):
    """-inf where the target distribution (p_ref forward, p_cur reverse) is 0: finite."""
    device = backend_device(OP, backend)
    shape = (2, 3, 40)
    cur, ref = pair(shape, dtype, seed=18, device=device)
    g = torch.Generator().manual_seed(20)
    dead = torch.rand(shape, generator=g) < 0.3
    dead[..., 0] = False  # keep every row alive
    dead = dead.to(device)
    if where in ("ref", "both"):
        ref = ref.masked_fill(dead, NEG_INF)
    if where in ("cur", "both"):
        cur = cur.masked_fill(dead, NEG_INF)
    for reduction in ("mean", "none"):
        loss, grad = check(backend, cur, ref, temperature=0.5, reduction=reduction, reverse=reverse)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if where != "ref":  # no probability on -inf logits of cur: no gradient there either
        assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_extreme_logits(backend, dtype, reverse):
    device = backend_device(OP, backend)
    g = torch.Generator().manual_seed(21)
    shape = (4, 2, 64)
    cur = (torch.randint(-1, 2, shape, generator=g) * 1e4).to(dtype).to(device)
    ref = (torch.randint(-1, 2, shape, generator=g) * 1e4).to(dtype).to(device)
    # log-probabilities of size 1e4 carry an fp32 rounding error of ~1e-3 (one ulp), and the
    # reverse gradient p * (log-ratio - KL) subtracts two such numbers.
    grad_tol = {"rtol": tol(dtype)["rtol"], "atol": max(tol(dtype)["atol"], 2e-3)}
    for temperature in (0.5, 1.0):
        for reduction in ("sum", "none"):
            loss, grad = check(backend, cur, ref, temperature=temperature, reduction=reduction, reverse=reverse,
                               grad_tol=grad_tol)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss.amax() > 1e3  # the rows really are far apart


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_identical_inputs_give_exact_zero(backend, dtype, temperature, reverse, reduction):
    device = backend_device(OP, backend)
    cur = randn((3, 2, 4097), dtype, seed=22, device=device)
    cur[0, 0, :7] = NEG_INF
    loss, grad = run(backend, cur, cur.clone(), temperature=temperature, reverse=reverse, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


# --------------------------------------------------------------------------- inputs


def test_ref_requiring_grad_raises(backend):
    device = backend_device(OP, backend)
    cur, ref = pair((2, 17), torch.float32, seed=23, device=device)
    cur.requires_grad_()
    ref.requires_grad_()
    with ops.use_backend(backend), pytest.raises(ValueError, match="logits_ref requires grad"):
        ops.kl_div(cur, ref)
    with ops.use_backend(backend), torch.no_grad():  # no autograd graph: nothing to refuse
        loss = ops.kl_div(cur, ref)
    expected, _ = oracle(cur, ref)
    torch.testing.assert_close(loss.double().cpu(), expected, **loss_tol(torch.float32))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(backend, reduction):
    device = backend_device(OP, backend)
    base_cur = randn((33, 2, 3), torch.float32, seed=25, device=device)  # (V, B, T)
    cur = base_cur.permute(1, 2, 0)  # (B, T, V), non-contiguous
    ref = randn((2, 3, 66), torch.float32, seed=26, device=device)[..., ::2]
    mask = torch.tensor([[True, False, True, True, True, False]], device=device).view(2, 3).t().contiguous().t()
    assert not (cur.is_contiguous() or ref.is_contiguous() or mask.is_contiguous())

    leaf = base_cur.clone().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.kl_div(leaf.permute(1, 2, 0), ref, mask, reduction=reduction)
    loss.sum().backward()
    expected_loss, expected_grad = run(backend, cur.contiguous(), ref.contiguous(), mask.contiguous(),
                                       reduction=reduction, grad_output=torch.ones_like(loss))
    assert torch.equal(loss.detach(), expected_loss)
    assert torch.equal(leaf.grad.permute(1, 2, 0), expected_grad)


@pytest.mark.parametrize("ref_dtype", [torch.bfloat16, torch.float64], ids=str)
def test_ref_in_another_dtype(backend, ref_dtype):
    device = backend_device(OP, backend)
    cur, ref = pair((4, 45), torch.float32, seed=27, device=device)
    ref = ref.to(ref_dtype)
    check(backend, cur, ref, reduction="sum")


def test_no_grad_needed(backend):
    """A logits_cur that does not require grad still gives the loss."""
    device = backend_device(OP, backend)
    cur, ref = pair((3, 19), torch.float32, seed=29, device=device)
    with ops.use_backend(backend):
        loss = ops.kl_div(cur, ref, reduction="none")
    assert not loss.requires_grad
    expected, _ = oracle(cur, ref, reduction="none")
    torch.testing.assert_close(loss.double().cpu(), expected, **loss_tol(torch.float32))


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(ref=torch.zeros(3, 16)), ValueError, "logits_ref must have"),
        (dict(cur=torch.zeros(3, 0), ref=torch.zeros(3, 0)), ValueError, "logits_cur must have a non-empty"),
        (dict(cur=torch.zeros(3, 17, dtype=torch.int64)), TypeError, "logits_cur must have dtype"),
        (dict(mask=torch.ones(4, dtype=torch.bool)), ValueError, "mask must have shape"),
        (dict(mask=torch.ones(3)), TypeError, "mask must have dtype"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=1e-40), ValueError, r"temperature must be >= .*1/temperature must be a finite float32"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(reduction="sum", num_items=4), ValueError, "num_items"),
        (dict(num_items=0), ValueError, "num_items must be a finite number > 0"),
        (dict(num_items=float("inf")), ValueError, "num_items must be a finite number > 0"),
        (dict(num_items=1e-30, temperature=1e-30), ValueError, r"num_items \* temperature must be >= .*finite float32"),
    ],
    ids=["ref-shape", "empty-vocab", "int-logits", "mask-shape", "mask-dtype", "temperature", "temperature-inf",
         "temperature-nan", "temperature-tiny", "reduction", "num-items-sum", "num-items-zero", "num-items-inf", "num-items-times-temperature-tiny"],
)
def test_bad_inputs(backend, change, error, match):
    device = backend_device(OP, backend)
    args = dict(cur=torch.zeros(3, 17), ref=torch.zeros(3, 17), mask=None, temperature=1.0, reduction="mean",
                num_items=None)
    args.update(change)
    tensors = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.kl_div(tensors.pop("cur"), tensors.pop("ref"), tensors.pop("mask"), **tensors)
