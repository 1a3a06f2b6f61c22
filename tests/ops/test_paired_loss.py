"""seat.ops.paired_loss: (loss, ce, kl) and the gradient w.r.t. logits against a float64 oracle.

Oracle: F.cross_entropy on the x rows (summed, divided by the non-ignored count or by
ce_num_items) plus kl_weight * the F.kl_div KL on the x~ rows against ref_logits (mean over
kl_mask rows or divided by kl_num_items), in float64 with autograd, from the same (upcast)
input values. Every test runs on each backend that has a paired_loss kernel.
"""
from __future__ import annotations

import pytest
import torch

from _loss_cases import paired_check as check, paired_make_batch as make_batch, paired_oracle as oracle
from _loss_cases import loss_tol, paired_run as run
from conftest import backend_device
from seat import ops

OP = "paired_loss"
NEG_INF = float("-inf")
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


# --------------------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("kl_weight", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [17, 4097])
def test_matches_oracle(backend, vocab, dtype, reduction, kl_weight):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(5, 4, vocab, dtype, seed=1, device=device, n_ignored=2)
    loss, ce, kl, _ = check(backend, logits, labels, ref_logits, kl_weight=kl_weight, reduction=reduction)
    assert ce > 0 and kl > 0


@pytest.mark.parametrize(
    "combine",
    [
        lambda loss, ce, kl: loss,
        lambda loss, ce, kl: ce,
        lambda loss, ce, kl: kl,
        lambda loss, ce, kl: 2 * loss + ce,
        lambda loss, ce, kl: -0.5 * ce + 3 * kl,
        lambda loss, ce, kl: loss + ce + kl,
    ],
    ids=["loss", "ce-only", "kl-only", "2loss+ce", "-ce/2+3kl", "all-three"],
)
@pytest.mark.parametrize("kl_weight", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gradient_into_any_output(backend, dtype, kl_weight, combine):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 33, dtype, seed=2, device=device, n_ignored=1)
    check(backend, logits, labels, ref_logits, kl_weight=kl_weight, combine=combine)


@pytest.mark.parametrize("which", ["ce", "kl"])
def test_backward_through_one_output_touches_only_its_rows(backend, which):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 33, torch.float32, seed=3, device=device)
    _, _, _, grad = run(backend, logits, labels, ref_logits, kl_weight=2.5,
                        combine=lambda loss, ce, kl: ce if which == "ce" else kl)
    silent, active = (grad[4:], grad[:4]) if which == "ce" else (grad[:4], grad[4:])
    assert torch.equal(silent, torch.zeros_like(silent))
    assert (active.abs().amax(-1) > 0).all()


def test_backward_twice_and_into_an_existing_grad(backend):
    """A second backward (retain_graph), accumulation, and a .grad zeroed in place between
    them sum correctly (as with torch's own ops)."""
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 33, torch.float32, seed=4, device=device)
    _, _, _, grad = run(backend, logits, labels, ref_logits)
    x = logits.detach().requires_grad_()
    with ops.use_backend(backend):
        loss, _, _ = ops.paired_loss(x, labels, ref_logits)
    loss.backward(retain_graph=True)
    x.grad.zero_()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * grad, rtol=0, atol=0)


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ignored_labels(backend, dtype, ignore_index):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(6, 2, 17, dtype, seed=4, device=device, n_ignored=3,
                                            ignore_index=ignore_index)
    _, _, _, grad = check(backend, logits, labels, ref_logits, ignore_index=ignore_index)
    ignored = (labels == ignore_index).nonzero().flatten()
    assert ignored.numel() >= 3
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ce_num_items", [None, 8.0])
def test_all_labels_ignored(backend, reduction, ce_num_items):
    if ce_num_items is not None and reduction != "mean":
        pytest.skip("ce_num_items needs reduction='mean'")
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 17, torch.float32, seed=5, device=device, n_ignored=4)
    loss, ce, kl, grad = check(backend, logits, labels, ref_logits, reduction=reduction, ce_num_items=ce_num_items,
                               combine=lambda loss, ce, kl: loss + ce)
    assert torch.equal(ce, torch.zeros_like(ce))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[:4], torch.zeros_like(grad[:4]))


@pytest.mark.parametrize(
    "kl_mask, ce_num_items, kl_num_items",
    [
        ([True, False, True, True, False], None, None),
        ([False] * 5, None, None),
        (None, 10.0, None),
        (None, None, 7.5),
        ([True, True, False, True, True], 3.0, 2.0),
    ],
    ids=["kl-mask", "kl-all-masked", "ce-num-items", "kl-num-items", "both-num-items"],
)
def test_kl_mask_and_num_items(backend, kl_mask, ce_num_items, kl_num_items):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(3, 5, 29, torch.float32, seed=6, device=device, n_ignored=1)
    mask = None if kl_mask is None else torch.tensor(kl_mask, device=device)
    _, _, kl, grad = check(backend, logits, labels, ref_logits, mask, kl_weight=1.5, ce_num_items=ce_num_items,
                           kl_num_items=kl_num_items)
    if mask is not None:
        dead = grad[3:][~mask]
        assert torch.equal(dead, torch.zeros_like(dead))
        if not mask.any():
            assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reverse_kl", [False, True])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_and_reverse(backend, temperature, reverse_kl, dtype):
    """temperature applies to the KL only; reverse_kl gives KL(p_cur || p_ref)."""
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(3, 4, 65, dtype, seed=7, device=device)
    check(backend, logits, labels, ref_logits, temperature=temperature, reverse_kl=reverse_kl, kl_weight=0.7)


@pytest.mark.parametrize("n_ce, n_kl", [(0, 4), (4, 0)])
def test_empty_block(backend, n_ce, n_kl):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(n_ce, n_kl, 17, torch.float32, seed=8, device=device)
    _, ce, kl, _ = check(backend, logits, labels, ref_logits, combine=lambda loss, ce, kl: loss + ce + kl)
    empty = ce if n_ce == 0 else kl
    assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("reverse_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_neg_inf_vocab_entries(backend, dtype, reverse_kl):
    """Vocabulary entries at -inf in both the current and the reference logits (a padded
    or banned vocabulary): every output and the gradient stay finite and match."""
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 40, dtype, seed=9, device=device, n_ignored=1)
    banned = torch.zeros(40, dtype=torch.bool)
    banned[[3, 17, 36, 37, 38, 39]] = True
    labels = torch.where(banned.to(device)[labels.clamp(min=0)] & (labels >= 0), torch.zeros_like(labels), labels)
    logits = logits.masked_fill(banned.to(device), NEG_INF)
    ref_logits = ref_logits.masked_fill(banned.to(device), NEG_INF)
    loss, ce, kl, grad = check(backend, logits, labels, ref_logits, reverse_kl=reverse_kl, kl_weight=2.0,
                               temperature=0.5)
    assert all(torch.isfinite(t) for t in (loss, ce, kl)) and torch.isfinite(grad).all()
    assert torch.equal(grad[:, banned.to(device)], torch.zeros_like(grad[:, banned.to(device)]))


def test_int32_labels(backend):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(5, 2, 23, torch.float32, seed=10, device=device, n_ignored=1)
    check(backend, logits, labels.int(), ref_logits)


def test_non_contiguous_inputs(backend):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(4, 3, 31, torch.float32, seed=11, device=device, n_ignored=1)
    base = logits.t().contiguous().requires_grad_()  # (V, N): base.t() is a non-contiguous (N, V) view
    ref_wide = torch.stack([ref_logits, ref_logits + 1], dim=-1)  # (N_kl, V, 2)
    labels_wide = torch.stack([labels, labels], dim=-1)
    with ops.use_backend(backend):
        outputs = ops.paired_loss(base.t(), labels_wide[:, 0], ref_wide[..., 0], kl_weight=1.5)
    sum(outputs).backward()
    expected = run(backend, logits, labels, ref_logits, kl_weight=1.5, combine=lambda loss, ce, kl: loss + ce + kl)
    for got, want in zip(outputs, expected[:3]):
        assert torch.equal(got.detach(), want)
    assert torch.equal(base.grad.t(), expected[3])


def test_no_grad_gives_the_values(backend):
    device = backend_device(OP, backend)
    logits, labels, ref_logits = make_batch(3, 3, 19, torch.float32, seed=12, device=device)
    with ops.use_backend(backend), torch.no_grad():
        outputs = ops.paired_loss(logits.requires_grad_(), labels, ref_logits.requires_grad_())
    expected = oracle(logits, labels, ref_logits)
    for got, want in zip(outputs, expected[:3]):
        assert not got.requires_grad
        torch.testing.assert_close(got.double().cpu(), want, **loss_tol(torch.float32))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=[0, 1, 17, 2]), ValueError, "labels holds 17, outside"),
        (dict(labels=[0, -1, 3, 2]), ValueError, "labels holds -1, outside"),
        (dict(labels=[0, 1, 2, 3, 4]), ValueError, "logits must have labels.numel"),
        (dict(ref_logits=torch.zeros(2, 17)), ValueError, "logits must have labels.numel"),
        (dict(ref_logits=torch.zeros(3, 16)), ValueError, "ref_logits must have logits' vocabulary"),
        (dict(kl_mask=torch.ones(2, dtype=torch.bool)), ValueError, "kl_mask must have one entry"),
        (dict(kl_mask=torch.ones(3)), TypeError, "kl_mask must have dtype"),
        (dict(labels=[0.0, 1.0, 2.0, 3.0]), TypeError, "labels must have dtype"),
        (dict(logits=torch.zeros(7, 17)[None]), ValueError, "logits must be 2-D"),
        (dict(kl_weight=-1.0), ValueError, "kl_weight must be a finite number >= 0"),
        (dict(kl_weight=float("inf")), ValueError, "kl_weight must be a finite number >= 0"),
        (dict(reduction="none"), ValueError, "reduction must be one of"),
        (dict(reduction="sum", ce_num_items=3), ValueError, "ce_num_items"),
        (dict(kl_num_items=float("nan")), ValueError, "kl_num_items must be a finite number > 0"),
        (dict(ce_num_items=1e-40), ValueError, r"ce_num_items must be >= .*finite float32"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
        (dict(logits=torch.zeros(7, 0), ref_logits=torch.zeros(3, 0), labels=[-100] * 4), ValueError,
         "logits must have a non-empty vocabulary"),
        (dict(ref_logits=torch.zeros(3, 17, requires_grad=True)), ValueError, "ref_logits requires grad"),
    ],
    ids=["label-too-big", "label-negative", "rows-vs-labels", "rows-vs-ref", "ref-vocab", "kl-mask-length",
         "kl-mask-dtype", "float-labels", "3d-logits", "negative-kl-weight", "inf-kl-weight", "reduction-none",
         "num-items-sum", "nan-kl-num-items", "tiny-ce-num-items", "temperature", "temperature-inf", "empty-vocab", "ref-requires-grad"],
)
def test_bad_inputs(backend, change, error, match):
    device = backend_device(OP, backend)
    args = dict(logits=torch.zeros(7, 17, requires_grad=True), labels=[0, 1, 16, 2], ref_logits=torch.zeros(3, 17),
                kl_mask=None)
    args.update(change)
    args["labels"] = torch.tensor(args["labels"])

    def to_device(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().to(device).requires_grad_(v.requires_grad)

    args = {k: to_device(v) for k, v in args.items()}
    with ops.use_backend(backend), pytest.raises(error, match=match):
        ops.paired_loss(args.pop("logits"), args.pop("labels"), args.pop("ref_logits"), args.pop("kl_mask"), **args)
