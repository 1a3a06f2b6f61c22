"""Liger-Kernel's loss test matrices, ported to seat's loss ops with torch as the oracle
at Liger's own tolerances (linkedin/Liger-Kernel, test/transformers/test_kl_div.py,
test_cross_entropy.py and test_fused_linear_cross_entropy.py).

Mapping (seat computes softmax of logits; torch's KLDivLoss takes log-probabilities):
  KLDivLoss(reduction, log_target)(log_softmax(z), target)
      -> kl_div(z, log(target)): "batchmean" -> "mean"; "sum" -> "sum"; torch's
         element-wise "mean" -> "mean" with num_items = N * V; "none" -> "none", compared
         with torch's per-element losses summed over the vocabulary. Gradients are
         compared w.r.t. z on both sides (torch's w.r.t. log-probabilities is not a
         logits gradient). Liger's log_target=True case feeds probabilities as log-targets
         (an unnormalized exp(target)), which logits cannot express: here the log-target
         is a normalized log_softmax.
  CrossEntropyLoss(reduction, ignore_index)(x, y)
      -> paired_loss(x, y, ref_logits with 0 rows, kl_weight=0): its `ce` term.
  Linear + CrossEntropyLoss(reduction, ignore_index)(x @ W.T + b, y)
      -> fused_linear_paired_loss(x, W, y, ref_hidden with 0 rows, bias=b): its `ce`;
         the input gradient is compared (seat gives no lm_head gradient: refused).
Refused with a clear error (seat has no such option): reduction="none" for the paired
losses, label_smoothing, softcap, lse_square_scale (z-loss), a class-weight vector, and a
trainable lm_head weight. Liger's JSD tests are not ported: seat has no JSD op.

CI runs Liger's shapes scaled down (SCALED below; the triton backend, interpreted on the
CPU, a smaller subset); SEAT_LIGER_FULL=1 runs Liger's full shapes.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_device
from seat import ops

FULL = os.environ.get("SEAT_LIGER_FULL") == "1"
KL_SHAPES = [(1, 4096, 32000), (41, 401, 1271)] if FULL else [(1, 16, 4000), (7, 3, 1271)]
KL_SHAPES_TRITON = [(3, 2, 1271)]
CE_SHAPES = [(2, 4096, 32000), (3, 423, 32000)] if FULL else [(2, 16, 4000), (3, 7, 4000)]
CE_SHAPES_TRITON = [(3, 2, 1271)]
CE_FUNCTIONAL_SHAPES = [(2, 2, 8), (9, 7, 41)]
FLCE_SHAPES = [(8, 128, 1024, 4096), (4, 47, 31, 123)] if FULL else [(2, 16, 128, 1024), (4, 47, 31, 123)]
FLCE_SHAPES_TRITON = [(1, 9, 31, 123)]

# (dtype, atol, rtol) as in Liger's test matrices
KL_DTYPES = [(torch.bfloat16, 1e-8, 5e-2), (torch.float32, 1e-8, 1e-6), (torch.float16, 1e-3, 1e-3)]
CE_DTYPES = [(torch.bfloat16, 1e-8, 5e-2), (torch.float32, 1e-8, 1e-6)]
FLCE_DTYPES = {  # per reduction
    "mean": [(torch.bfloat16, 5e-3, 5e-2), (torch.float32, 1e-5, 5e-4)],
    "sum": [(torch.bfloat16, 5e-0, 5e1), (torch.float32, 1e-3, 5e-2)],
}
BACKENDS = ["reference", "cpu", "triton"]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def upcast(t):
    """torch's oracle input: bfloat16 / float16 values upcast to float32 (torch's own
    half-precision log_softmax rounds log-probabilities to the input dtype, a ~3% gradient
    error that Liger's bfloat16 rtol does not cover; seat and Liger accumulate in fp32)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def close(got, want, atol, rtol):
    """torch.allclose at Liger's tolerances, in float64 (seat returns float32 losses where
    torch returns the input dtype)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=atol, rtol=rtol), (
        f"max abs diff {(got - want).abs().max().item():.3g}, max |want| {want.abs().max().item():.3g}")


def shapes_for(backend, full, triton):
    """Liger's (scaled) shapes for cpu; its odd-sized one for the reference; the triton
    subset (interpreted on the CPU without a GPU)."""
    if backend == "triton":
        return triton
    return full[-1:] if backend == "reference" else full


def kl_cases():
    """Liger's matrix; its not-last-layer variant (loss * 2 before backward) and
    log_target=True in float32 only, and the triton backend in float32 and bfloat16."""
    for backend in BACKENDS:
        for shape in shapes_for(backend, KL_SHAPES, KL_SHAPES_TRITON):
            for dtype, atol, rtol in KL_DTYPES:
                if backend == "triton" and dtype == torch.float16:
                    continue
                fp32 = dtype == torch.float32
                for reduction in ("batchmean", "sum", "mean", "none"):
                    for log_target in (True, False) if fp32 else (False,):
                        for last_layer in (True, False) if fp32 else (True,):
                            yield pytest.param(
                                backend, shape, dtype, atol, rtol, reduction, log_target, last_layer,
                                id=f"{backend}-{'x'.join(map(str, shape))}-{dtype_id(dtype)}-{reduction}"
                                   f"-{'log' if log_target else 'prob'}-{'last' if last_layer else 'not-last'}")


@pytest.mark.parametrize("backend, shape, dtype, atol, rtol, reduction, log_target, last_layer", list(kl_cases()))
def test_kl_div(backend, shape, dtype, atol, rtol, reduction, log_target, last_layer):
    device = backend_device("kl_div", backend)
    b, t, v = shape
    torch.manual_seed(0)
    z = torch.randn(b * t, v, dtype=dtype)
    with torch.no_grad():
        log_target_values = torch.randn(b * t, v).log_softmax(dim=-1)
    target = log_target_values if log_target else log_target_values.exp()
    z1 = upcast(z).requires_grad_(True)
    want = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(z1.log_softmax(dim=-1), target)

    z2 = z.to(device).requires_grad_(True)
    seat_reduction = {"batchmean": "mean", "sum": "sum", "mean": "mean", "none": "none"}[reduction]
    num_items = float(b * t * v) if reduction == "mean" else None
    with ops.use_backend(backend):
        got = ops.kl_div(z2, log_target_values.to(device), reduction=seat_reduction, num_items=num_items)
    if reduction == "none":
        # Liger's element-wise bound |got_v - want_v| <= atol + rtol |want_v|, summed over
        # the vocabulary: seat returns each row's sum.
        got_rows, want_elems = got.detach().double().cpu(), want.detach().double()
        bound = want_elems.shape[-1] * atol + rtol * want_elems.abs().sum(-1)
        assert bool(((got_rows - want_elems.sum(-1)).abs() <= bound).all())
        return  # as in Liger: no backward for "none"
    close(got, want, atol, rtol)
    scale = 1.0 if last_layer else 2.0
    (want * scale).backward()
    (got * scale).backward()
    close(z2.grad, z1.grad, atol, rtol)


def ce_cases():
    for backend in BACKENDS:
        for shape in shapes_for(backend, CE_SHAPES, CE_SHAPES_TRITON):
            for dtype, atol, rtol in CE_DTYPES:
                for reduction in ("sum", "mean"):
                    for ignore_index in (None, 2, -123):
                        yield pytest.param(backend, shape, dtype, atol, rtol, reduction, ignore_index,
                                           id=f"{backend}-{'x'.join(map(str, shape))}-{dtype_id(dtype)}-{reduction}"
                                              f"-ignore{ignore_index}")
        for shape in CE_FUNCTIONAL_SHAPES:
            for dtype, atol, rtol in CE_DTYPES:
                yield pytest.param(backend, shape, dtype, atol, rtol, "mean", None,
                                   id=f"{backend}-functional-{'x'.join(map(str, shape))}-{dtype_id(dtype)}")


def labels_with_ignored(n_rows, vocab, ignore_index):
    """Liger's targets: random labels, and a random number (1 .. n/2 - 1) of them ignored."""
    target = torch.randint(0, vocab, (n_rows,), dtype=torch.long)
    if ignore_index is not None:
        count = int(torch.randint(1, max(n_rows // 2, 2), (1,)))
        target[torch.randperm(n_rows)[:count]] = ignore_index
    return target


@pytest.mark.parametrize("backend, shape, dtype, atol, rtol, reduction, ignore_index", list(ce_cases()))
def test_cross_entropy(backend, shape, dtype, atol, rtol, reduction, ignore_index):
    device = backend_device("paired_loss", backend)
    b, t, v = shape
    torch.manual_seed(0)
    x = torch.randn(b * t, v, dtype=dtype)
    target = labels_with_ignored(b * t, v, ignore_index)
    index = -100 if ignore_index is None else ignore_index
    x1 = upcast(x).requires_grad_(True)
    want = torch.nn.CrossEntropyLoss(reduction=reduction, ignore_index=index)(x1, target)

    x2 = x.to(device).requires_grad_(True)
    with ops.use_backend(backend):
        _, got, _ = ops.paired_loss(x2, target.to(device), torch.empty(0, v, dtype=dtype, device=device),
                                    kl_weight=0.0, ignore_index=index, reduction=reduction)
    close(got, want, atol, rtol)
    want.backward()
    got.backward()
    close(x2.grad, x1.grad, atol, rtol)


def test_cross_entropy_not_last_layer():
    """Liger's not-last-layer case: the loss is scaled before backward."""
    torch.manual_seed(0)
    x = torch.randn(3 * 7, 4000)
    target = torch.randint(0, 4000, (21,))
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = F.cross_entropy(x1, target)
    with ops.use_backend("cpu"):
        _, got, _ = ops.paired_loss(x2, target, torch.empty(0, 4000), kl_weight=0.0)
    close(got, want, 1e-8, 1e-6)
    (want * 3).backward()
    (got * 3).backward()
    close(x2.grad, x1.grad, 1e-8, 1e-6)


def flce_cases():
    for backend in BACKENDS:
        for shape in shapes_for(backend, FLCE_SHAPES, FLCE_SHAPES_TRITON):
            for reduction, dtypes in FLCE_DTYPES.items():
                for dtype, atol, rtol in dtypes:
                    for bias in (True, False):
                        for ignore_index in (-100, 42) if backend != "triton" else (42,):
                            yield pytest.param(
                                backend, shape, dtype, atol, rtol, reduction, bias, ignore_index,
                                id=f"{backend}-{'x'.join(map(str, shape))}-{dtype_id(dtype)}-{reduction}"
                                   f"-{'bias' if bias else 'nobias'}-ignore{ignore_index}")


@pytest.mark.parametrize("backend, shape, dtype, atol, rtol, reduction, bias, ignore_index", list(flce_cases()))
def test_fused_linear_cross_entropy(backend, shape, dtype, atol, rtol, reduction, bias, ignore_index):
    device = backend_device("fused_linear_paired_loss", backend)
    b, t, h, v = shape
    torch.manual_seed(0)
    weight = torch.rand(v, h, dtype=dtype)
    bias_t = torch.rand(v, dtype=dtype) if bias else None
    x = torch.randn(b * t, h, dtype=dtype)
    target = labels_with_ignored(b * t, v, ignore_index)
    x1 = x.clone().requires_grad_(True)
    logits = F.linear(x1, weight, bias_t).to(torch.float32)  # Liger's oracle: bf16 matmul, fp32 CE
    want = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    x2 = x.to(device).requires_grad_(True)
    with ops.use_backend(backend):
        _, got, _ = ops.fused_linear_paired_loss(
            x2, weight.to(device), target.to(device), torch.empty(0, h, dtype=dtype, device=device),
            bias=None if bias_t is None else bias_t.to(device), kl_weight=0.0, ignore_index=ignore_index,
            reduction=reduction)
    close(got, want, atol, rtol)
    want.backward()
    got.backward()
    close(x2.grad, x1.grad, atol, rtol)


def _ce_args():
    x = torch.randn(4, 8, requires_grad=True)
    return x, torch.tensor([1, 2, 3, 4]), torch.empty(0, 8)


@pytest.mark.parametrize(
    "option, value, error, match",
    [
        ("label_smoothing", 0.1, TypeError, "label_smoothing"),
        ("softcap", 30.0, TypeError, "softcap"),
        ("lse_square_scale", 1e-4, TypeError, "lse_square_scale"),
        ("weight", torch.rand(8), TypeError, "weight"),
        ("reduction", "none", ValueError, "reduction must be one of 'mean', 'sum'"),
    ],
)
def test_cross_entropy_options_seat_lacks_are_refused(option, value, error, match):
    """Liger's label smoothing / softcap / z-loss / class-weight / reduction='none' cases:
    seat's paired_loss has no such option and says so, before computing anything."""
    x, y, ref = _ce_args()
    with pytest.raises(error, match=match):
        ops.paired_loss(x, y, ref, kl_weight=0.0, **{option: value})
    assert x.grad is None


def test_fused_linear_lm_head_gradient_is_refused():
    """Liger also checks the lm_head weight and bias gradients; seat freezes lm_head and
    refuses a weight that requires grad, with the fix in the message."""
    weight = torch.rand(16, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"weight requires grad.*requires_grad_\(False\)"):
        ops.fused_linear_paired_loss(torch.randn(4, 8, requires_grad=True), weight, torch.tensor([1, 2, 3, 4]),
                                     torch.empty(0, 8), kl_weight=0.0)
