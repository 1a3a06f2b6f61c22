"""Fuzzing the sparse-update ops (masked_gather_, masked_swap_, sparse_adamw_) on every
backend that runs on CPU (reference, cpu, triton through the interpreter) and every mask
encoding, with hostile inputs: values (extreme magnitudes, inf, NaN, extreme scalars),
masks that lie (edited through .numpy() after a first use), and aliased arguments.

Each example asserts: every backend gives the reference's result, or the reference's
error (same type and message) with every input unchanged. Per category the reference's
own verdict is pinned too (values: a result; lies: a ValueError, except the one lie a
hash mask accepts and numbers as documented; aliasing: a ValueError naming both
arguments), so a strategy that only produced rejected input would fail.

Integer limits (sizes past int32 through meta tensors, hash parameters and scalars at
their bounds) are a plain parametrized table at the end.
"""
from __future__ import annotations

import math

import _hostile as H
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from seat import ops
from seat.ops import _backend, _encodings

BACKENDS = tuple(b for b in H.CPU_BACKENDS if _backend.unusable_reason(b, torch.device("cpu")) is None)
SIZES = {"index": (1, 7, 300, 1000), "block16": (1, 300, 65536 + 300), "hash": (1, 255, 257, 1000)}
DENSITIES = (0.0, 0.1, 0.5, 1.0)
CATEGORIES = ("values", "lie", "alias")
EXAMPLES = 12  # per op and category under a bounded profile (ci: 40); the long profile keeps its own

SPECIAL = (float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 3.0e38, -3.0e38, 1e-40, 65504.0)


def _settings(fn):
    """Fewer examples than the ci profile's 40 (each runs every backend, the interpreter
    among them); the long profile (SEAT_HYPOTHESIS_PROFILE=long) runs its own count."""
    bounded = settings.default.max_examples <= 40
    return settings(max_examples=min(EXAMPLES, settings.default.max_examples))(fn) if bounded else fn


@st.composite
def mask_case(draw):
    encoding = draw(st.sampled_from(H.ENCODINGS))
    numel = draw(st.sampled_from(SIZES[encoding]))
    density = draw(st.sampled_from(DENSITIES))
    if numel > 10_000:  # several block16 blocks, few entries: the interpreter walks every entry
        density = min(density, 0.01)
    mask = H.build_mask(encoding, numel, density, draw(st.integers(0, 2**16)))
    return encoding, numel, mask


def fill(t: torch.Tensor, draw, hostile: bool) -> torch.Tensor:
    """Random values; hostile: some entries replaced by extremes, infinities and NaN."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
    if hostile and t.numel():
        k = draw(st.integers(1, min(8, t.numel())))
        spots = torch.randint(0, t.numel(), (k,), generator=g)
        t.view(-1)[spots] = torch.tensor([draw(st.sampled_from(SPECIAL)) for _ in range(k)],
                                         dtype=torch.float64).to(t.dtype)
    return t


def lie_about(draw, encoding: str, numel: int, mask):
    """Pick a lie that applies to this mask; returns (name, edit)."""
    name, edit = draw(st.sampled_from(H.LIES[encoding]))
    assume(edit(H.clone_mask(mask), numel))  # does it apply (on a scratch copy)?
    return name, edit


def check_category(category: str, ref: H.Outcome, lie: str | None = None) -> None:
    if category == "values" or lie in H.ACCEPTED_LIES:
        assert ref.error is None, f"the reference refused valid input: {ref.error}"
    elif category == "lie":
        assert ref.error is not None and ref.error[0] is ValueError, f"lie {lie} not refused: {ref.error}"
    else:
        assert ref.error is not None and ref.error[0] is ValueError and "share memory" in ref.error[1], ref.error


def on_every_backend(make, call, prime=None, lie=None):
    """Per backend: fresh inputs from make() (a list of tensors plus the mask), an
    optional priming call with the valid mask (what a validation cache would remember),
    then the lie (through .numpy()), then the call. Returns the outcomes."""
    outcomes = {}
    for backend in BACKENDS:
        tensors, mask = make()
        if prime is not None:
            with ops.use_backend(backend):
                prime(mask)
        if lie is not None:
            assert lie(mask)
        outcomes[backend] = H.run(backend, lambda: call(tensors, mask), [*tensors, mask.index, mask.offsets])
    return outcomes


# ----------------------------------------------------------------------------- masked_gather_


@pytest.mark.parametrize("category", CATEGORIES)
@_settings
@given(data=st.data())
def test_masked_gather_fuzz(category, data):
    draw = data.draw
    encoding, numel, mask = draw(mask_case())
    nnz = H.nnz_of(mask)
    dense_dtype = draw(st.sampled_from((torch.float32, torch.float16, torch.bfloat16, torch.float64)))
    out_dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float64)))
    hostile = category == "values" and draw(st.booleans())
    dense = fill(torch.empty(numel, dtype=dense_dtype), draw, hostile)
    out = fill(torch.empty(nnz, dtype=out_dtype), draw, hostile)
    alias = lie = None
    if category == "alias":
        choices = ["out_in_dense"] if 0 < nnz <= numel else []
        choices += ["out_in_mask"] if nnz and encoding != "hash" else []
        assume(choices)
        alias = draw(st.sampled_from(choices))
        start = draw(st.integers(0, numel - nnz)) if alias == "out_in_dense" else 0
    if category == "lie":
        lie_name, edit = lie_about(draw, encoding, numel, mask)
        lie = lambda m: edit(m, numel)  # noqa: E731

    def make():
        m = H.clone_mask(mask)
        d, o = dense.clone(), out.clone()
        if alias == "out_in_dense":
            d = d.to(torch.float32)
            o = d.view(-1)[start:start + nnz]
        elif alias == "out_in_mask":
            o = m.index.view(torch.float32) if encoding == "index" else m.offsets.view(torch.bfloat16)
        return [o, d], m

    def prime(m):
        ops.masked_gather_(torch.zeros(nnz, dtype=out_dtype), dense.clone(), m)

    outcomes = on_every_backend(make, lambda t, m: ops.masked_gather_(t[0], t[1], m),
                                prime if lie else None, lie)
    ref = H.assert_same(outcomes)
    check_category(category, ref, lie_name if lie else None)


# ----------------------------------------------------------------------------- masked_swap_


@pytest.mark.parametrize("category", CATEGORIES)
@_settings
@given(data=st.data())
def test_masked_swap_fuzz(category, data):
    draw = data.draw
    encoding, numel, mask = draw(mask_case())
    nnz = H.nnz_of(mask)
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16, torch.float64)))
    param = fill(torch.empty(numel, dtype=dtype), draw, category == "values")
    values = fill(torch.empty(nnz, dtype=dtype), draw, category == "values")
    alias = lie = None
    if category == "alias":
        choices = ["values_in_param"] if 0 < nnz <= numel else []
        choices += ["values_in_mask"] if nnz and encoding == "index" else []
        assume(choices)
        alias = draw(st.sampled_from(choices))
        start = draw(st.integers(0, numel - nnz)) if alias == "values_in_param" else 0
    if category == "lie":
        lie_name, edit = lie_about(draw, encoding, numel, mask)
        lie = lambda m: edit(m, numel)  # noqa: E731

    def make():
        m = H.clone_mask(mask)
        p, v = param.clone(), values.clone()
        if alias == "values_in_param":
            v = p[start:start + nnz]
        elif alias == "values_in_mask":
            p, v = p.float(), m.index.view(torch.float32)
        return [p, v], m

    def prime(m):
        ops.masked_swap_(param.clone(), m, values.clone())

    outcomes = on_every_backend(make, lambda t, m: ops.masked_swap_(t[0], m, t[1]), prime if lie else None, lie)
    ref = H.assert_same(outcomes, exact=True)  # a swap moves bits
    check_category(category, ref, lie_name if lie else None)


# ----------------------------------------------------------------------------- sparse_adamw_

ADAMW_ALIASES = ("moments_same", "master_is_state", "grad_is_state", "params_overlap", "state_in_mask",
                 "param_is_dense_state")


@st.composite
def hyper(draw, extreme: bool):
    if not extreme:
        return dict(lr=draw(st.sampled_from((1e-3, 0.1))), beta1=draw(st.sampled_from((0.0, 0.3, 0.9))),
                    beta2=draw(st.sampled_from((0.5, 0.999))), eps=1e-8,
                    weight_decay=draw(st.sampled_from((0.0, 0.01))), step=draw(st.integers(1, 1000)))
    return dict(lr=draw(st.sampled_from((0.0, 1e-3, 1e30, math.inf))),
                beta1=draw(st.sampled_from((0.0, 0.2, 0.5, 0.9, 1 - 1e-7))),
                beta2=draw(st.sampled_from((0.0, 0.5, 1 - 1e-7))),
                eps=draw(st.sampled_from((1e-45, 1e-8, 1e30, math.inf))),
                weight_decay=draw(st.sampled_from((0.0, 0.1, 1e30))),
                step=draw(st.sampled_from((1, 2, 2**31, 2**62))))


@pytest.mark.parametrize("category", CATEGORIES)
@_settings
@given(data=st.data())
def test_sparse_adamw_fuzz(category, data):
    draw = data.draw
    encoding, numel, mask = draw(mask_case())
    nnz = H.nnz_of(mask)
    dtype = draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16, torch.float64)))
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_dtype = torch.bfloat16 if dtype != torch.float64 and draw(st.booleans()) else state_dtype
    has_master = draw(st.booleans())
    amsgrad = draw(st.booleans())
    dense_state = draw(st.booleans())
    stochastic = dtype == torch.bfloat16 and draw(st.booleans())
    hostile = category == "values" and draw(st.booleans())
    flags = dict(maximize=draw(st.booleans()), stochastic_rounding=stochastic, seed=draw(st.integers(0, 2**40)),
                 dense_state=dense_state, **draw(hyper(extreme=hostile)))
    n_state = numel if dense_state else nnz
    param = fill(torch.empty(numel, dtype=dtype), draw, hostile)
    grad = fill(torch.empty(nnz, dtype=grad_dtype), draw, hostile)
    states = [fill(torch.empty(n_state, dtype=state_dtype), draw, hostile) for _ in range(4)]
    states[1] = states[1].abs()  # second moments are >= 0 (NaN stays NaN)
    states[3] = states[3].abs()
    alias = lie = None
    if category == "alias":
        choices = [a for a in ADAMW_ALIASES if
                   (a != "master_is_state" or has_master)
                   and (a != "grad_is_state" or (grad_dtype == state_dtype and not dense_state))
                   and (a != "state_in_mask" or (encoding == "index" and state_dtype == torch.float32
                                                  and not dense_state))
                   and (a != "param_is_dense_state" or (dense_state and dtype == state_dtype))]
        alias = draw(st.sampled_from(choices))
        assume(nnz > 0 or alias in ("params_overlap", "param_is_dense_state"))
        if alias == "params_overlap":  # the same memory stepped twice in one call: refused
            assume(nnz > 0)
    if category == "lie":
        assume(nnz > 0)
        lie_name, edit = lie_about(draw, encoding, numel, mask)
        lie = lambda m: edit(m, numel)  # noqa: E731

    def make():
        m = H.clone_mask(mask)
        p, g = param.clone(), grad.clone()
        m1, v, w, vmax = (s.clone() for s in states)
        if alias == "moments_same":
            v = m1
        elif alias == "master_is_state":
            w = m1
        elif alias == "grad_is_state":
            g = m1
        elif alias == "state_in_mask":
            m1 = m.index.view(torch.float32)
        elif alias == "param_is_dense_state":
            m1 = p
        return [p, g, m1, v, w if has_master else torch.empty(0, dtype=state_dtype),
                vmax if amsgrad else torch.empty(0, dtype=state_dtype)], m

    def call(t, m):
        p, g, m1, v, w, vmax = t
        copies = 1 if alias == "params_overlap" else 0  # a second entry stepping the same param

        def listed(x, present=True):
            return [x if present else None] + [x.clone() if present else None] * copies

        ops.sparse_adamw_([p] * (1 + copies), [m] * (1 + copies), listed(g), listed(m1), listed(v), listed(w, has_master),
                          listed(vmax, amsgrad), **flags)
        if copies:
            raise AssertionError("unreachable: params_overlap must be refused")

    def prime(m):
        t, _ = make()
        call([x.clone() for x in t], m)

    outcomes = on_every_backend(make, call, prime if lie else None, lie)
    ref = H.assert_same(outcomes)
    check_category(category, ref, lie_name if lie else None)


@pytest.mark.parametrize("beta1", (0.0, 0.3, 0.5, 0.9))
@pytest.mark.parametrize("grad_value", (math.inf, -math.inf, math.nan))
def test_non_finite_gradients_step_as_the_reference(grad_value, beta1):
    """torch's lerp (the reference's exp_avg update) computes a weight >= 0.5 from the far
    end, which turns an inf gradient into NaN: every backend does the same."""
    idx = torch.arange(0, 40, 4, dtype=torch.int32)
    grad = torch.randn(10)
    grad[::3] = grad_value

    def make():
        return [torch.randn(40, generator=torch.Generator().manual_seed(0)), grad.clone(), torch.full((10,), 0.5),
                torch.full((10,), 0.25)], _encodings.as_mask_args("mask", idx.clone())

    def call(t, m):
        ops.sparse_adamw_([t[0]], [m], [t[1]], [t[2]], [t[3]], lr=0.1, beta1=beta1, step=3)

    ref = H.assert_same(on_every_backend(make, call))
    assert ref.error is None and not torch.isfinite(ref.after[2][::3]).any()


@pytest.mark.parametrize("nan_in", ("running_max", "second_moment"))
def test_amsgrad_maximum_keeps_nan_from_either_side(nan_in):
    """The amsgrad maximum is torch.maximum: NaN in the running maximum or in the new
    second moment (beta2 = 0 times an inf moment) stays NaN on every backend."""
    idx = torch.arange(0, 24, 3, dtype=torch.int32)
    exp_avg_sq = torch.full((8,), 0.25)
    vmax = torch.full((8,), 0.5)
    if nan_in == "running_max":
        vmax[::2] = math.nan
    else:
        exp_avg_sq[::2] = math.inf  # 0 * inf

    def make():
        return [torch.randn(24, generator=torch.Generator().manual_seed(0)), torch.ones(8), torch.zeros(8),
                exp_avg_sq.clone(), vmax.clone()], _encodings.as_mask_args("mask", idx.clone())

    def call(t, m):
        ops.sparse_adamw_([t[0]], [m], [t[1]], [t[2]], [t[3]], max_exp_avg_sqs=[t[4]], lr=0.1, beta2=0.0, step=1)

    ref = H.assert_same(on_every_backend(make, call))
    assert ref.error is None
    assert ref.after[4][::2].isnan().all() and not ref.after[4][1::2].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_views_of_one_buffer_are_not_aliases(backend):
    """Two params and their states as disjoint slices of flat buffers (how flattened
    parameter storage looks) step like separate tensors."""
    flat, state = torch.randn(600), torch.zeros(4, 50)
    params, masks = [flat[:300], flat[300:]], [torch.arange(0, 300, 6, dtype=torch.int32)] * 2
    grads = [torch.randn(50), torch.randn(50)]
    expected = [p.clone() for p in params]
    with ops.use_backend("reference"):
        ops.sparse_adamw_(expected, masks, grads, [torch.zeros(50), torch.zeros(50)],
                          [torch.zeros(50), torch.zeros(50)], lr=0.1, step=1)
    with ops.use_backend(backend):
        ops.sparse_adamw_(params, masks, grads, [state[0], state[1]], [state[2], state[3]], lr=0.1, step=1)
    torch.testing.assert_close(flat, torch.cat(expected))


# ----------------------------------------------------------------------------- integer limits


def _meta(n, dtype=torch.float32):
    return torch.empty(n, dtype=dtype, device="meta")


BIG = 2**31  # one past what int32 indices address


def limit_cases():
    idx4 = torch.arange(4, dtype=torch.int32)
    yield "gather dense past int32", lambda: ops.masked_gather_(_meta(4), _meta(BIG), idx4.to("meta")), \
        "int32 indices reach at most"
    yield "swap block16 past int32", lambda: ops.masked_swap_(
        _meta(BIG), _encodings.MaskArgs(_encodings.BLOCK16, _meta(BIG // 65536 + 1, torch.int32),
                                        _meta(4, torch.uint16), _encodings.NO_INTS), _meta(4)), \
        "masks reach at most 2\\*\\*31-1"
    yield "implicit offsets past int32", lambda: ops.implicit_block_offsets_(
        _meta(BIG // 256 + 1, torch.int32), numel=BIG, seed=0, threshold=1, block=256), "masks reach at most"
    yield "hash key 2**32", lambda: ops.masked_gather_(
        torch.zeros(0), torch.zeros(10), _encodings.MaskArgs(_encodings.HASH, torch.zeros(2, dtype=torch.int32),
                                                             _encodings.no_offsets(torch.device("cpu")),
                                                             (2**32, 1, 256))), "key must be in"
    yield "hash threshold 2**32+1", lambda: ops.masked_gather_(
        torch.zeros(0), torch.zeros(10), _encodings.MaskArgs(_encodings.HASH, torch.zeros(2, dtype=torch.int32),
                                                             _encodings.no_offsets(torch.device("cpu")),
                                                             (1, 2**32 + 1, 256))), "threshold must be in"
    yield "hash block 2**31", lambda: ops.masked_gather_(
        torch.zeros(0), torch.zeros(10), _encodings.MaskArgs(_encodings.HASH, torch.zeros(2, dtype=torch.int32),
                                                             _encodings.no_offsets(torch.device("cpu")),
                                                             (1, 1, 2**31))), "block must be a power of two"
    yield "implicit seed 2**63", lambda: ops.implicit_block_offsets_(
        torch.zeros(2, dtype=torch.int32), numel=10, seed=2**63, threshold=1, block=256), "seed must be in"
    yield "implicit numel -1", lambda: ops.implicit_block_offsets_(
        torch.zeros(2, dtype=torch.int32), numel=-1, seed=0, threshold=1, block=256), "numel must be an int >= 0"
    unknown = max(_encodings.NAMES) + 1  # the first id that is no encoding
    yield f"encoding {unknown}", lambda: ops.masked_gather_(
        torch.zeros(1), torch.zeros(10), _encodings.MaskArgs(unknown, idx4[:1],
                                                             _encodings.no_offsets(torch.device("cpu")),
                                                             _encodings.NO_INTS)), "encoding must be one of"
    adamw = dict(lr=1e-3, step=1)
    one = ([torch.zeros(10)], [idx4], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)])
    for name, value, message in (("step", 0, "step must be an int >= 1"), ("step", True, "step must be an int"),
                                 ("step", 2**64, "step must be an int"),
                                 ("lr", math.nan, "lr must be >= 0"), ("lr", -1.0, "lr must be >= 0"),
                                 ("beta1", 1.0, "beta1 must be in"), ("beta2", math.nan, "beta2 must be in"),
                                 ("eps", 0.0, "eps must be > 0"), ("eps", math.nan, "eps must be > 0"),
                                 ("weight_decay", math.nan, "weight_decay must be >= 0")):
        yield f"adamw {name}={value}", (lambda n=name, v=value: ops.sparse_adamw_(*one, **{**adamw, n: v})), message


@pytest.mark.parametrize("case", list(limit_cases()), ids=lambda c: c[0])
def test_limits_refused_on_every_backend(case):
    _, call, message = case
    for backend in BACKENDS:
        with ops.use_backend(backend), pytest.raises(ValueError, match=message):
            call()
