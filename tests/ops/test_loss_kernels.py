"""The fused loss kernels (kl_div, paired_loss, fused_linear_paired_loss) on the cases
the per-op tests leave out: a Llama-3 vocabulary (128256) on the cpu backend,
extreme and -inf logits in the paired loss, rows that are all ignored, identical inputs
giving exactly zero, and the chunking of the fused-linear loss."""
from __future__ import annotations

import importlib

import pytest
import torch

import _loss_cases as loss_cases
from conftest import backend_device, tol

fused_module = importlib.import_module("seat.ops.fused_linear_paired_loss")  # the module, not the function

LLAMA3_VOCAB = 128256
NEG_INF = float("-inf")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_div_llama3_vocab_on_cpu(dtype, reverse):
    """V = 128256 (many 1024-wide tiles per row): value and gradient vs float64."""
    cur, ref = loss_cases.kl_pair((3, LLAMA3_VOCAB), dtype, seed=31)
    ref[1, : LLAMA3_VOCAB // 2] = NEG_INF  # half the vocabulary ruled out by the reference
    if reverse:
        cur[1, : LLAMA3_VOCAB // 2] = NEG_INF
    loss_cases.kl_check("cpu", cur, ref, temperature=0.7, reduction="none", reverse=reverse,
                   grad_output=torch.tensor([1.0, -2.0, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paired_loss_llama3_vocab_on_cpu(dtype):
    logits, labels, ref_logits = loss_cases.paired_make_batch(2, 2, LLAMA3_VOCAB, dtype, seed=32, device="cpu")
    loss_cases.paired_check("cpu", logits, labels, ref_logits, kl_weight=0.5, combine=lambda loss, ce, kl: 3 * loss - ce)


@pytest.fixture
def four_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fewer_rows_than_threads_split_the_vocabulary(four_threads, dtype, reverse):
    """1-3 rows on 4 threads: the cpu kernel cuts each row's vocabulary into ranges summed
    in parallel and merged. Value and gradient vs float64, with ranges that hold only -inf
    (first, middle) in one input, a NaN row and a masked row."""
    vocab = 5 * 2048 + 77
    cur, ref = loss_cases.kl_pair((3, vocab), dtype, seed=34)
    ref[0, : 2 * 2048] = NEG_INF  # the first ranges ruled out by the target
    ref[1, 2048: 4 * 2048] = NEG_INF
    if reverse:
        cur[0, : 2 * 2048] = NEG_INF
        cur[1, 2048: 4 * 2048] = NEG_INF
    loss_cases.kl_check("cpu", cur, ref, temperature=0.7, reduction="none", reverse=reverse,
                        grad_output=torch.tensor([1.0, -2.0, 0.5]))
    loss_cases.kl_check("cpu", cur[:1], ref[:1], reverse=reverse)
    nan_row = cur[:2].clone()
    nan_row[0, 3 * 2048 + 5] = float("nan")
    loss, grad = loss_cases.kl_run("cpu", nan_row, ref[:2], torch.tensor([True, False]), reduction="none",
                                   reverse=reverse)
    assert loss[0].isnan() and loss[1] == 0 and grad[0].isnan().any() and (grad[1] == 0).all()
    logits, labels, ref_logits = loss_cases.paired_make_batch(1, 1, vocab, dtype, seed=35, device="cpu")
    loss_cases.paired_check("cpu", logits, labels, ref_logits, kl_weight=0.5, reverse_kl=reverse)


@pytest.mark.parametrize("reverse_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paired_loss_extreme_logits(backend, dtype, reverse_kl):
    """Logits of +-1e4 in both blocks: CE rows and KL rows stay finite and match."""
    device = backend_device("paired_loss", backend)
    g = torch.Generator().manual_seed(33)
    logits = (torch.randint(-1, 2, (6, 48), generator=g) * 1e4).to(dtype).to(device)
    ref_logits = (torch.randint(-1, 2, (3, 48), generator=g) * 1e4).to(dtype).to(device)
    labels = torch.randint(0, 48, (3,), generator=g).to(device)
    got = loss_cases.paired_run(backend, logits, labels, ref_logits, reverse_kl=reverse_kl, kl_weight=0.5)
    want = loss_cases.paired_oracle(logits, labels, ref_logits, reverse_kl=reverse_kl, kl_weight=0.5)
    for value, expected in zip(got[:3], want[:3]):
        assert torch.isfinite(value)
        torch.testing.assert_close(value.double().cpu(), expected, **loss_cases.loss_tol(dtype))
    assert torch.isfinite(got[3]).all()
    # one fp32 ulp of a 1e4 log-probability is ~1e-3 (see test_kl_div.test_extreme_logits)
    torch.testing.assert_close(got[3].double().cpu(), want[3], rtol=tol(dtype)["rtol"],
                               atol=max(tol(dtype)["atol"], 2e-3))
    assert want[0] > 1e3


@pytest.mark.parametrize("where", ["ref", "cur"])
def test_paired_loss_neg_inf_in_one_input(backend, where):
    """-inf only where the KL target has no mass: the reference (forward KL) or the
    current logits (reverse KL)."""
    device = backend_device("paired_loss", backend)
    logits, labels, ref_logits = loss_cases.paired_make_batch(2, 3, 40, torch.float32, seed=34, device=device)
    dead = torch.zeros(3, 40, dtype=torch.bool)
    dead[:, 5:15] = True
    dead[1, 20:] = True
    dead = dead.to(device)
    if where == "ref":
        ref_logits = ref_logits.masked_fill(dead, NEG_INF)
    else:
        logits = torch.cat([logits[:2], logits[2:].masked_fill(dead, NEG_INF)])
    loss, _, kl, grad = loss_cases.paired_check(backend, logits, labels, ref_logits, reverse_kl=where == "cur",
                                           temperature=0.5)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and kl > 0
    if where == "cur":
        assert torch.equal(grad[2:][dead], torch.zeros_like(grad[2:][dead]))


def test_paired_loss_everything_ignored(backend):
    """All labels ignored and every x~ row masked: zero outputs, zero gradient."""
    device = backend_device("paired_loss", backend)
    logits, labels, ref_logits = loss_cases.paired_make_batch(3, 2, 21, torch.float32, seed=35, device=device, n_ignored=3)
    mask = torch.zeros(2, dtype=torch.bool, device=device)
    for reduction in ("mean", "sum"):
        loss, ce, kl, grad = loss_cases.paired_run(backend, logits, labels, ref_logits, mask, reduction=reduction,
                                              combine=lambda loss, ce, kl: loss + ce + kl)
        for t in (loss, ce, kl, grad):
            assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("reverse_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_paired_loss_identical_reference_gives_exact_zero_kl(backend, dtype, reverse_kl):
    device = backend_device("paired_loss", backend)
    logits, labels, _ = loss_cases.paired_make_batch(2, 3, 300, dtype, seed=36, device=device)
    logits[3, :50] = NEG_INF
    ref_logits = logits[2:].clone()
    _, _, kl, grad = loss_cases.paired_run(backend, logits, labels, ref_logits, reverse_kl=reverse_kl, temperature=0.5,
                                      kl_weight=2.0, combine=lambda loss, ce, kl: loss - 7 * kl)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(grad[2:], torch.zeros_like(grad[2:]))
    assert (grad[:2].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("chunk_size", [0, 3, 16])
def test_fused_identical_reference_gives_exact_zero_kl(backend, chunk_size):
    """The kernels project hidden and ref_hidden rows with the same chunk shapes, so equal
    rows give bit-equal logits and an exactly zero KL. (The reference projects all rows
    and the ref rows in two matmuls of different heights: equal to rounding only.)"""
    if backend == "reference":
        pytest.skip("the reference's two matmuls of different heights round differently")
    device = backend_device("fused_linear_paired_loss", backend)
    inputs = loss_cases.fused_make_inputs(torch.float32, seed=37, device=device, bias=True)
    inputs["ref_hidden"] = inputs["hidden"][loss_cases.FUSED_N_CE:].clone()
    _, _, kl, grad = loss_cases.fused_run(backend, **inputs, chunk_size=chunk_size, reverse_kl=chunk_size == 3)
    assert torch.equal(kl, torch.zeros_like(kl))
    assert torch.equal(grad[loss_cases.FUSED_N_CE:], torch.zeros_like(grad[loss_cases.FUSED_N_CE:]))


def test_fused_many_chunks_match_oracle(backend):
    """More rows than a chunk in both blocks, a chunk size that is not a multiple of the
    row padding, and the default chunk: the same values (bit for bit) and the oracle's."""
    device = backend_device("fused_linear_paired_loss", backend)
    inputs = loss_cases.fused_make_inputs(torch.float32, seed=38, device=device, bias=True, n_ce=40, n_kl=35, vocab=70)
    mask = (torch.arange(35) % 4 != 1).to(device)
    first = loss_cases.fused_check(backend, inputs, mask, chunk_size=0, kl_weight=0.3)
    second = loss_cases.fused_check(backend, inputs, mask, chunk_size=11, kl_weight=0.3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_chunk_rows_respects_the_budget():
    for vocab in (17, 32000, 128256, 10**7):
        for dtype in (torch.float32, torch.float64):
            rows = fused_module.auto_chunk_rows(vocab, dtype)
            assert rows % fused_module.ROW_MULTIPLE == 0 and rows >= fused_module.ROW_MULTIPLE
            if rows > fused_module.ROW_MULTIPLE:  # only a huge vocabulary forces the minimum
                assert rows * vocab * torch.finfo(dtype).bits // 8 <= fused_module.CHUNK_BYTES
    assert fused_module.auto_chunk_rows(128256, torch.float32) == 128  # 128 x 128256 x 4 B = 62.6 MiB


def test_chunks_never_hold_all_logits():
    """The chunked driver runs the per-row kernel on one chunk of logits at a time (at
    most chunk_size rows, padded to ROW_MULTIPLE), never on all N x V logits."""
    seen = []

    def spy(logits, *args):
        seen.append(tuple(logits.shape))
        return fused_module._loss_rows.native_rows(logits, *args)

    kernel = fused_module.chunked(spy)
    inputs = loss_cases.fused_make_inputs(torch.float32, seed=39, device="cpu", n_ce=37, n_kl=20)
    out = kernel(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["ref_hidden"], None, None,
                 kl_weight=1.0, ignore_index=-100, temperature=1.0, reduction="mean", ce_num_items=None,
                 kl_num_items=None, reverse_kl=False, chunk_size=16, compute_grad=True)
    # 37 x rows -> chunks of 16, 16, 5 (padded to 16); 20 x~ rows -> 16, 4 (padded to 16)
    assert seen == [(16, loss_cases.FUSED_VOCAB)] * 5
    want = loss_cases.fused_oracle(**inputs)
    for got, expected in zip(out[:3], want[:3]):
        torch.testing.assert_close(got.double(), expected, **tol(torch.float32))


# Non-finite input and empty input: the reference defines the result (see seat.ops.kl_div's
# module docstring) and every backend gives the same class (NaN / +inf / -inf / finite)
# entry for entry, and the same values where finite.
DOCUMENTED_KL_LOSS = {  # (forward, reverse) class of the hostile row's loss: 0 NaN, 1 +inf, 3 finite
    "finite": (3, 3), "masked-vocab": (3, 3), "ref-all-neg-inf": (0, 0), "cur-all-neg-inf": (0, 0),
    "both-all-neg-inf": (0, 0), "ref-some-neg-inf": (3, 1), "cur-some-neg-inf": (1, 3), "ref-nan": (0, 0),
    "cur-nan": (0, 0), "ref-pos-inf": (0, 0), "cur-pos-inf": (0, 0),
}


def _check_same(got, want, tolerance):
    assert loss_cases.same_class(got, want), (loss_cases.result_class(got), loss_cases.result_class(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double().cpu()[finite], want.double().cpu()[finite], **tolerance)


@pytest.mark.parametrize("case", sorted(loss_cases.KL_ROWS))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_div_non_finite_rows(backend, case, reverse, dtype):
    device = backend_device("kl_div", backend)
    cur_row, ref_row = loss_cases.KL_ROWS[case]
    finite_c, finite_r = loss_cases.KL_ROWS["finite"]
    cur = torch.tensor([finite_c, cur_row], dtype=dtype)
    ref = torch.tensor([finite_r, ref_row], dtype=dtype)
    want_loss, want_grad = loss_cases.kl_div_call("reference", cur, ref, temperature=0.7, reduction="none",
                                                  reverse=reverse)
    if case in DOCUMENTED_KL_LOSS:
        assert loss_cases.result_class(want_loss)[1] == DOCUMENTED_KL_LOSS[case][int(reverse)]
    loss, grad = loss_cases.kl_div_call(backend, cur.to(device), ref.to(device), temperature=0.7, reduction="none",
                                        reverse=reverse)
    _check_same(loss, want_loss, loss_cases.loss_tol(dtype))
    _check_same(grad, want_grad, tol(dtype))
    # a masked-out row gives 0 whatever it holds
    mask = torch.tensor([True, False], device=device)
    loss, grad = loss_cases.kl_div_call(backend, cur.to(device), ref.to(device), mask, reduction="none",
                                        reverse=reverse)
    assert loss[1] == 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))


@pytest.mark.parametrize("case", sorted(loss_cases.CE_ROWS))
def test_cross_entropy_non_finite_rows(backend, case):
    """CE rows follow F.cross_entropy's classes: NaN for NaN / +inf / all -inf rows, +inf
    for a -inf label logit."""
    device = backend_device("paired_loss", backend)
    row, label = loss_cases.CE_ROWS[case]
    logits = torch.tensor([loss_cases.CE_ROWS["finite"][0], row])
    labels = torch.tensor([0, label])
    torch_ce = torch.nn.functional.cross_entropy(logits.double(), labels, reduction="sum")
    (_, want_ce, _), want_grad = loss_cases.paired_loss_call("reference", logits, labels, torch.empty(0, 3),
                                                             reduction="sum")
    assert loss_cases.same_class(want_ce, torch_ce)
    (_, ce, _), grad = loss_cases.paired_loss_call(backend, logits.to(device), labels.to(device),
                                                   torch.empty(0, 3, device=device), reduction="sum")
    _check_same(ce, want_ce, tol(torch.float32))
    _check_same(grad, want_grad, tol(torch.float32))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_zero_rows_forward_and_backward(backend, reduction):
    """N = 0: an empty loss for "none", 0 for "sum" (as torch) and "mean" (seat's mean over
    no rows; torch gives NaN), and an empty gradient from backward, for all three ops."""
    device = backend_device("kl_div", backend)
    empty = torch.empty(0, 7, device=device)
    loss, grad = loss_cases.kl_div_call(backend, empty, empty, reduction=reduction)
    assert loss.shape == ((0,) if reduction == "none" else ()) and grad.shape == (0, 7)
    assert reduction == "none" or loss.item() == 0.0
    if reduction == "none":
        return
    no_labels = torch.empty(0, dtype=torch.int64, device=device)
    losses, grad = loss_cases.paired_loss_call(backend, empty, no_labels, empty, reduction=reduction)
    assert all(t.item() == 0.0 for t in losses) and grad.shape == (0, 7)
    hidden = torch.empty(0, 5, device=device)
    losses, grad = loss_cases.fused_call(backend, hidden, torch.randn(7, 5, device=device), no_labels, hidden,
                                         reduction=reduction)
    assert all(t.item() == 0.0 for t in losses) and grad.shape == (0, 5)
