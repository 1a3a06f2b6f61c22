"""Fuzz of the loss ops (kl_div, paired_loss, fused_linear_paired_loss) with hypothesis:
each backend a machine without a GPU runs (cpu; triton, interpreted) against the pure-torch
reference, on hostile input: NaN / +-inf / huge logits and whole -inf rows, extreme
scalars (temperature, kl_weight, num_items, chunk_size), ignore_index and labels at the
int64 limits or everywhere, empty blocks. Property: the backend gives the same result as
the reference (the same class, NaN / +inf / -inf / finite, entry for entry, and close
values where finite) or the same error, and no input is changed either way. Integer
limits that need more memory than a test has go through meta tensors.

`hypothesis.event` labels each example (op, backend, outcome); run with
--hypothesis-show-statistics to see the counts per category.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import _loss_cases as loss_cases
from conftest import backend_device
from seat import ops

INF, NAN = float("inf"), float("nan")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
HOSTILE = [INF, -INF, NAN, 1e30, -1e30, 1e-30, 0.0]
TEMPERATURES = [1.0, 0.5, 3.0, 1e-3, 1e30, 1e-30, 1e-40, 0.0, -1.0, INF, NAN]
WEIGHTS = [0.0, 1.0, 0.5, 1e30, -0.0, -1.0, INF, NAN]
NUM_ITEMS = [None, 1.0, 3.0, 1e-30, 1e30, 0.0, -2.0, INF, NAN]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
BACKENDS = ["cpu", "triton"]
# examples per test: a share of the active profile's (ci: 40 -> 25 / 15), so the "long"
# profile scales these up too
PROFILE_EXAMPLES = settings.default.max_examples


def examples(share: float) -> int:
    return max(1, int(PROFILE_EXAMPLES * share))


def logit_values():
    """Mostly ordinary logits, with hostile values mixed in."""
    return st.one_of(st.floats(-30, 30, width=32), st.sampled_from(HOSTILE))


@st.composite
def logit_rows(draw, rows, vocab, dtype):
    values = draw(st.lists(logit_values(), min_size=rows * vocab, max_size=rows * vocab))
    t = torch.tensor(values, dtype=torch.float64).reshape(rows, vocab)
    if rows and draw(st.booleans()):
        t[draw(st.integers(0, rows - 1))] = -INF  # a row without any mass
    return t.to(dtype)


def scale_of(*tensors, temperature=1.0):
    """Magnitude of the tempered finite logits: the loss's rounding scales with it."""
    big = 1.0
    for t in tensors:
        finite = t[torch.isfinite(t)].double()
        if finite.numel():
            big = max(big, float(finite.abs().max()))
    inv_t = 1.0 / temperature if math.isfinite(temperature) and temperature > 0 else 1.0
    return big * max(inv_t, 1.0)


def assert_same(got, want, scale):
    assert loss_cases.same_class(got, want), (got, want)
    finite = torch.isfinite(want)
    got, want = got.double().cpu()[finite], want.double().cpu()[finite]
    # float32 (or bfloat16 gradient) rounding relative to the logits' magnitude
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-4 * scale)


def unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(b, torch.Tensor):
            assert torch.equal(b.isnan(), a.isnan()) if b.is_floating_point() else True
            assert torch.equal(torch.nan_to_num(b), torch.nan_to_num(a)) if b.is_floating_point() else torch.equal(b, a)


OP_NAMES = {loss_cases.kl_div_call: "kl_div", loss_cases.paired_loss_call: "paired_loss",
            loss_cases.fused_call: "fused_linear_paired_loss"}


def compare(call, backend, args, options, scale):
    """Run call on the reference and on backend: same error or same results; inputs kept."""
    op = OP_NAMES[call]
    device = backend_device(op, backend)
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    want = loss_cases.outcome(call, "reference", *args, **options)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    got = loss_cases.outcome(call, backend, *on_device, **options)
    unchanged(copies, args)
    unchanged(copies, [a.cpu() if isinstance(a, torch.Tensor) else a for a in on_device])
    event(f"{op} / {backend}: {'same error' if want[0] == 'error' else 'same result'}")
    assert got[0] == want[0], (got, want)
    if want[0] == "error":
        assert got[1] == want[1]
        return
    (got_losses, got_grad), (want_losses, want_grad) = got[1], want[1]
    if isinstance(want_losses, torch.Tensor):
        got_losses, want_losses = (got_losses,), (want_losses,)
    if not all(torch.isfinite(t).all() for t in want_losses):
        event("non-finite result, class matched")
    for g, w in zip(got_losses, want_losses):
        assert_same(g, w, scale)
    assert_same(got_grad, want_grad, scale)


@settings(max_examples=examples(0.625))
@given(data=st.data())
def test_fuzz_kl_div(data):
    backend = data.draw(st.sampled_from(BACKENDS))
    dtype = data.draw(st.sampled_from(DTYPES))
    rows, vocab = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 9))
    cur = data.draw(logit_rows(rows, vocab, dtype))
    ref = data.draw(logit_rows(rows, vocab, data.draw(st.sampled_from(DTYPES))))
    mask = data.draw(st.none() | st.lists(st.booleans(), min_size=rows, max_size=rows).map(torch.tensor))
    if mask is not None:
        mask = mask.reshape(rows).bool()
    temperature = data.draw(st.sampled_from(TEMPERATURES))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    num_items = data.draw(st.sampled_from(NUM_ITEMS)) if reduction == "mean" else None
    options = dict(temperature=temperature, reduction=reduction, num_items=num_items,
                   reverse=data.draw(st.booleans()))
    compare(loss_cases.kl_div_call, backend, (cur, ref, mask), options, scale_of(cur, ref, temperature=temperature))


@st.composite
def labels_for(draw, n_ce, vocab, ignore_index):
    choices = st.one_of(st.integers(0, vocab - 1), st.just(ignore_index),
                        st.sampled_from([-1, vocab, INT64_MIN, INT64_MAX]))
    return torch.tensor(draw(st.lists(choices, min_size=n_ce, max_size=n_ce)), dtype=torch.int64)


@settings(max_examples=examples(0.625))
@given(data=st.data())
def test_fuzz_paired_loss(data):
    backend = data.draw(st.sampled_from(BACKENDS))
    dtype = data.draw(st.sampled_from(DTYPES))
    n_ce, n_kl, vocab = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)), data.draw(st.integers(1, 9))
    ignore_index = data.draw(st.sampled_from([-100, 0, INT64_MIN, INT64_MAX]))
    logits = data.draw(logit_rows(n_ce + n_kl, vocab, dtype))
    ref = data.draw(logit_rows(n_kl, vocab, dtype))
    labels = data.draw(labels_for(n_ce, vocab, ignore_index))
    if data.draw(st.booleans()):
        labels = torch.full_like(labels, ignore_index)  # every label ignored
    temperature = data.draw(st.sampled_from(TEMPERATURES))
    reduction = data.draw(st.sampled_from(["mean", "sum"]))
    options = dict(kl_weight=data.draw(st.sampled_from(WEIGHTS)), ignore_index=ignore_index,
                   temperature=temperature, reduction=reduction, reverse_kl=data.draw(st.booleans()))
    if reduction == "mean":
        options.update(ce_num_items=data.draw(st.sampled_from(NUM_ITEMS)),
                       kl_num_items=data.draw(st.sampled_from(NUM_ITEMS)))
    compare(loss_cases.paired_loss_call, backend, (logits, labels, ref), options,
            scale_of(logits, ref, temperature=temperature))


@settings(max_examples=examples(0.375))
@given(data=st.data())
def test_fuzz_fused_linear_paired_loss(data):
    backend = data.draw(st.sampled_from(BACKENDS))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    n_ce, n_kl = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))
    hidden_size, vocab = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7))
    hidden = data.draw(logit_rows(n_ce + n_kl, hidden_size, dtype))
    ref_hidden = data.draw(logit_rows(n_kl, hidden_size, dtype))
    weight = torch.randn(vocab, hidden_size, generator=torch.Generator().manual_seed(vocab), dtype=dtype)
    labels = data.draw(labels_for(n_ce, vocab, -100))
    options = dict(kl_weight=data.draw(st.sampled_from(WEIGHTS)), temperature=data.draw(st.sampled_from(TEMPERATURES)),
                   chunk_size=data.draw(st.sampled_from([0, 1, 16, 2**62, -1])))
    # hidden @ weight.T: the logits' magnitude is about |hidden| * |weight| * H
    scale = scale_of(hidden, ref_hidden, temperature=options["temperature"]) * hidden_size * 5
    compare(loss_cases.fused_call, backend, (hidden, weight, labels, ref_hidden), options, scale)


@pytest.mark.parametrize("rows, vocab", [(2**31 + 5, 3), (3, 2**31 + 3), (2**20, 2**31 + 3)])
def test_integer_limits_through_meta_tensors(rows, vocab):
    """Row and vocabulary counts past int32 (meta tensors: no memory): the ops' checks and
    shape logic give correctly shaped results, no overflow."""
    cur = torch.empty(rows, vocab, device="meta")
    loss = ops.kl_div(cur, cur, reduction="none")
    assert loss.shape == (rows,) and loss.device.type == "meta"
    labels = torch.empty(rows // 2, dtype=torch.int64, device="meta")
    ref = torch.empty(rows - rows // 2, vocab, device="meta")
    loss, ce, kl = ops.paired_loss(cur, labels, ref, kl_weight=0.5)
    assert loss.shape == ce.shape == kl.shape == ()
    hidden = torch.empty(rows, 2, device="meta")
    weight = torch.empty(vocab, 2, device="meta")
    loss, _, _ = ops.fused_linear_paired_loss(hidden, weight, labels, hidden[rows // 2:], chunk_size=2**62)
    assert loss.shape == ()
