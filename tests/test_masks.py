"""seat.masks: exact counts, the compact index contract, random-mask determinism,
uniformity and memory, magnitude and importance masks against brute force (ties
included), stable per-parameter seeds, dense <-> compact conversions, bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from itertools import combinations

import pytest
import torch

from seat import masks
from seat.masks import (
    ImportanceScores, build_masks, dense_to_indices, indices_to_dense, magnitude_mask, nnz_for, param_seed,
    random_mask,
)
from seat.ops import _checks

HAS_CUDA = torch.cuda.is_available()


def assert_compact(idx: torch.Tensor, numel: int, nnz: int, device="cpu") -> None:
    """The mask contract: 1-D int32, sorted, unique, in [0, numel), exactly nnz entries."""
    assert idx.dtype == torch.int32
    assert idx.dim() == 1
    assert idx.device.type == torch.device(device).type
    assert idx.numel() == nnz
    assert idx.is_contiguous()
    if nnz:
        i = idx.cpu().long()
        assert int(i[0]) >= 0 and int(i[-1]) < numel
        assert bool((i[1:] > i[:-1]).all())
        _checks.index_values("idx", idx, numel)  # what every op checks: accepted as is


def brute_top(values: list[float], k: int) -> list[int]:
    """The k largest values, ties to the lower index; returned sorted ascending."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


# ----------------------------------------------------------------------------- nnz_for


@pytest.mark.parametrize(
    "numel, density, expected",
    [
        (100, 0.0, 0),
        (100, 1.0, 100),
        (100, 1e-9, 1),  # tiny density still trains one entry
        (100, 0.05, 5),
        (10, 0.25, 2),  # round half to even
        (10, 0.35, 4),
        (0, 0.5, 0),  # an empty tensor has nothing to mask
        (0, 1.0, 0),
        (1, 0.01, 1),
        (58_720_256, 0.05, 2_936_013),
        (7, 0.999, 7),
    ],
)
def test_nnz_for_exact_counts(numel, density, expected):
    assert nnz_for(numel, density) == expected


# ----------------------------------------------------------------------------- random_mask

RANDOM_CASES = [
    (1, 0.5), (7, 0.3), (63, 0.2), (100, 0.1), (100, 0.5), (100, 0.9), (1000, 0.001), (1000, 0.01),
    (1000, 0.25), (1000, 0.26), (1000, 0.5), (1000, 0.75), (1000, 0.999), (5000, 1.0), (5000, 0.0), (0, 0.5),
    (100_003, 0.05), (100_003, 0.6),
]


@pytest.mark.parametrize("numel, density", RANDOM_CASES)
def test_random_mask_contract(numel, density):
    idx = random_mask(numel, density, seed=3)
    assert_compact(idx, numel, nnz_for(numel, density))


def test_random_mask_takes_a_tensor_and_a_device():
    w = torch.empty(12, 34, dtype=torch.bfloat16)
    a = random_mask(w, 0.1, seed=5)
    assert torch.equal(a, random_mask(12 * 34, 0.1, seed=5))
    b = random_mask(w, 0.1, seed=5, device="cpu")
    assert torch.equal(a, b) and b.device.type == "cpu"


@pytest.mark.parametrize("numel, density", [(100, 0.1), (5000, 0.02), (5000, 0.5), (5000, 0.9)])
def test_random_mask_deterministic_per_seed_and_varies_across_seeds(numel, density):
    a = random_mask(numel, density, seed=11)
    assert torch.equal(a, random_mask(numel, density, seed=11))
    others = [random_mask(numel, density, seed=s) for s in (12, 13, 2**63 + 5)]
    assert all(not torch.equal(a, o) for o in others)


def test_random_mask_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    random_mask(1000, 0.1, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])  # sparse, hit and complement samplers
def test_random_mask_positions_are_uniform(density):
    numel, trials = 100, 2000
    nnz = nnz_for(numel, density)
    counts = torch.zeros(numel, dtype=torch.int64)
    for s in range(trials):
        counts[random_mask(numel, density, seed=s).long()] += 1
    p = nnz / numel
    mean, sd = trials * p, math.sqrt(trials * p * (1 - p))
    # each position's count is Binomial(trials, p); 5 sd over 100 positions: false alarm < 1e-4
    assert int((counts - mean).abs().max()) <= 5 * sd, (counts.min(), counts.max(), mean, sd)
    # and overall: a chi-square-like statistic with ~numel - 1 degrees of freedom
    stat = float(((counts - mean) ** 2).sum()) / (sd * sd)
    df = numel - 1
    assert abs(stat - df) <= 6 * math.sqrt(2 * df), stat


@pytest.mark.parametrize("k", [2, 3, 6])  # sparse sampler, hit sampler, complement
def test_random_mask_subsets_are_uniform(monkeypatch, k):
    """Every k-subset equally likely (not only the marginals), with the randperm shortcut
    lowered to sizes < 4 so the candidate samplers and their recursion run at size 8."""
    monkeypatch.setattr(masks.select, "_RANDPERM_BELOW", 4)
    numel, trials = 8, 3000
    subsets = {c: 0 for c in combinations(range(numel), k)}
    for s in range(trials):
        subsets[tuple(random_mask(numel, k / numel, seed=s).tolist())] += 1
    expected = trials / len(subsets)
    stat = sum((c - expected) ** 2 / expected for c in subsets.values())
    df = len(subsets) - 1
    assert stat <= df + 6 * math.sqrt(2 * df), (stat, df)
    assert min(subsets.values()) > 0


def test_random_mask_large():
    """A Llama-3-8B-sized matrix (time printed, not asserted: speed belongs to benchmarks)."""
    numel, density = 16_777_216, 0.05
    t = time.perf_counter()
    idx = random_mask(numel, density, seed=0)
    print(f"random_mask({numel}, {density}): {(time.perf_counter() - t) * 1e3:.0f} ms")
    assert_compact(idx, numel, nnz_for(numel, density))


def test_random_mask_memory_is_o_nnz_not_o_numel():
    """A mask of 21475 entries of a 2**31-1 element tensor: an O(numel) step would need
    >= 2 GB; measured as the peak RSS growth in a fresh process."""
    code = (
        "import json, resource, torch\n"
        "from seat.masks import random_mask\n"
        "random_mask(100_000, 0.01, seed=0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "idx = random_mask(2**31 - 1, 1e-5, seed=0)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'kb': after - before, 'nnz': idx.numel(), 'last': int(idx[-1])}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["nnz"] == nnz_for(2**31 - 1, 1e-5)
    assert result["kb"] < 64 * 1024, result


@pytest.mark.cuda
def test_random_mask_on_cuda_equals_cpu():
    a = random_mask(10_000, 0.05, seed=2)
    b = random_mask(10_000, 0.05, seed=2, device="cuda")
    assert_compact(b, 10_000, a.numel(), device="cuda")
    assert torch.equal(a, b.cpu())


# ----------------------------------------------------------------------------- magnitude_mask


@pytest.mark.parametrize("density", [0.0, 0.004, 0.1, 0.37, 0.5, 0.99, 1.0])
def test_magnitude_mask_is_the_top_abs_with_ties_to_the_lower_index(density):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-4, 5, (13, 17), generator=g).float()  # many ties
    w[0, :3] = -0.0  # -0.0 and 0.0 tie
    idx = magnitude_mask(w, density)
    k = nnz_for(w.numel(), density)
    assert_compact(idx, w.numel(), k)
    assert idx.tolist() == brute_top(w.abs().view(-1).tolist(), k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_magnitude_mask_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(31, 29, generator=g, dtype=torch.float64).to(dtype)
    k = nnz_for(w.numel(), 0.2)
    idx = magnitude_mask(w, 0.2)
    assert_compact(idx, w.numel(), k)
    assert idx.tolist() == brute_top(w.float().abs().view(-1).tolist(), k)  # ranked in float32
    stable = torch.sort(-w.float().abs().view(-1), stable=True).indices[:k].sort().values
    assert torch.equal(idx.long(), stable)


def test_magnitude_mask_all_equal_takes_the_first_entries():
    assert magnitude_mask(torch.ones(10), 0.3).tolist() == [0, 1, 2]
    assert magnitude_mask(torch.zeros(4, 4), 0.25).tolist() == [0, 1, 2, 3]


def test_magnitude_mask_non_contiguous_indexes_the_logical_layout():
    w = torch.randn(8, 5).t()
    assert torch.equal(magnitude_mask(w, 0.3), magnitude_mask(w.contiguous(), 0.3))


def test_magnitude_mask_keeps_infinities_and_rejects_nan():
    w = torch.tensor([1.0, -float("inf"), 3.0, float("inf"), 2.0])
    assert magnitude_mask(w, 0.4).tolist() == [1, 3]
    w[0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN"):
        magnitude_mask(w, 0.4)


@pytest.mark.cuda
def test_magnitude_mask_on_cuda_equals_cpu():
    w = torch.randint(-50, 50, (257, 129)).to(torch.bfloat16)
    a = magnitude_mask(w, 0.05)
    b = magnitude_mask(w.cuda(), 0.05)
    assert_compact(b, w.numel(), a.numel(), device="cuda")
    assert torch.equal(a, b.cpu())


# ----------------------------------------------------------------------------- importance


def _calibrate(kind: str, density: float):
    """3 calibration backward passes of a tiny Linear; returns (masks, scores, expected
    float32 scores accumulated by hand)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    params = dict(model.named_parameters())
    scores = ImportanceScores(model.named_parameters(), kind=kind)
    expected = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for _ in range(3):
        x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in params.items():
            contrib = p.grad.abs() if kind == "grad" else (p.detach() * p.grad).abs()
            expected[n] += contrib
        scores.update()
        model.zero_grad()
    return scores.masks(density), scores, expected, params


@pytest.mark.parametrize("kind", ["grad", "wgrad"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_importance_matches_brute_force(kind, density):
    result, scores, expected, params = _calibrate(kind, density)
    assert scores.num_updates == 3
    assert list(result) == list(params)
    for name, p in params.items():
        assert torch.allclose(scores.scores[name], expected[name], rtol=1e-6, atol=0)
        k = nnz_for(p.numel(), density)
        assert_compact(result[name], p.numel(), k)
        assert result[name].tolist() == brute_top(scores.scores[name].view(-1).tolist(), k)
    if 0 < density < 1:  # against the float64 brute force, away from near-ties
        w_scores = expected["weight"].double().view(-1)
        k = nnz_for(w_scores.numel(), density)
        assert result["weight"].tolist() == brute_top(w_scores.tolist(), k)


def test_importance_wgrad_differs_from_grad():
    g_masks = _calibrate("grad", 0.25)[0]
    w_masks = _calibrate("wgrad", 0.25)[0]
    assert not torch.equal(g_masks["weight"], w_masks["weight"])


@pytest.mark.parametrize("kind", ["grad", "wgrad"])
def test_importance_ties_go_to_the_lower_index(kind):
    p = torch.nn.Parameter(torch.tensor([[1.0, -2.0, 2.0], [1.0, 0.5, -2.0]]))
    scores = ImportanceScores({"p": p}, kind)
    p.grad = torch.ones_like(p)
    scores.update()
    expected = [0, 1, 2, 3] if kind == "grad" else [1, 2, 5, 0]
    assert scores.masks(4 / 6)["p"].tolist() == sorted(expected)


def test_importance_skips_params_without_grad_and_accumulates_low_precision_in_float32():
    a = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(5))
    scores = ImportanceScores([("a", a), ("b", b)], kind="grad")
    (a.float().sum() * 3).backward()
    scores.update()
    assert scores.scores["a"].dtype == torch.float32 and "b" not in scores.scores
    assert torch.equal(scores.scores["a"], torch.full((3, 4), 3.0))
    with pytest.raises(ValueError, match=r"never had a gradient in 1 update\(s\).*: b"):
        scores.masks(0.5)
    b.grad = torch.ones(5)
    scores.update()
    assert scores.num_updates == 2
    assert torch.equal(scores.scores["a"], torch.full((3, 4), 6.0))
    out = scores.masks(0.5)
    assert_compact(out["a"], 12, 6)
    assert out["b"].tolist() == [0, 1]


def test_importance_before_update_and_without_grads():
    model = torch.nn.Linear(3, 2)
    scores = ImportanceScores(model.named_parameters(), "wgrad")
    with pytest.raises(ValueError, match=r"call update\(\) after loss.backward\(\)"):
        scores.masks(0.1)
    with pytest.raises(ValueError, match=r"no parameter has a .grad; call update\(\) after loss.backward\(\)"):
        scores.update()
    assert scores.num_updates == 0


def test_importance_rejects_nan_gradients():
    p = torch.nn.Parameter(torch.ones(4))
    scores = ImportanceScores({"p": p}, "grad")
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    scores.update()
    with pytest.raises(ValueError, match="importance scores of 'p' contains NaN"):
        scores.masks(0.5)


# ----------------------------------------------------------------------------- seeds, build_masks


def test_param_seed_range_and_dependence():
    s = param_seed(0, "layers.0.q_proj.weight")
    assert isinstance(s, int) and 0 <= s < 2**63
    assert s == param_seed(0, "layers.0.q_proj.weight")
    assert s != param_seed(1, "layers.0.q_proj.weight")
    assert s != param_seed(0, "layers.0.k_proj.weight")
    assert param_seed(1, "2:x") != param_seed(12, ":x")
    # pinned: changing the derivation would silently change every saved run's masks
    assert param_seed(0, "model.layers.0.self_attn.q_proj.weight") == 2824522380559718767
    assert param_seed(1234, "lm.w") == 5329529291022138610


def test_param_seed_is_stable_across_processes():
    names = ["model.layers.0.self_attn.q_proj.weight", "mlp.down_proj.weight", "é/ünïcode"]
    code = (
        "import json, sys\n"
        "from seat.masks import param_seed\n"
        "print(json.dumps([param_seed(7, n) for n in json.loads(sys.argv[1])]))\n"
    )
    here = [param_seed(7, n) for n in names]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # hash() differs from this process's
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], check=True, capture_output=True,
                         text=True, env=env)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_build_masks_random_uses_param_seed_and_ignores_order():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    out = build_masks(model.named_parameters(), 0.1, seed=4)
    assert list(out) == [n for n, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        assert_compact(out[name], p.numel(), nnz_for(p.numel(), 0.1))
        assert torch.equal(out[name], random_mask(p.numel(), 0.1, seed=param_seed(4, name)))
    reordered = build_masks(dict(reversed(list(model.named_parameters()))), 0.1, seed=4)
    assert all(torch.equal(out[n], reordered[n]) for n in out)
    other = build_masks(model.named_parameters(), 0.1, seed=5)
    assert not torch.equal(out["0.weight"], other["0.weight"])
    # same shape, different names -> different masks
    twins = build_masks({"a": torch.zeros(64, 64), "b": torch.zeros(64, 64)}, 0.1)
    assert not torch.equal(twins["a"], twins["b"])


def test_build_masks_magnitude_and_device():
    ws = {"x": torch.randn(10, 10), "y": torch.randn(7, dtype=torch.float64)}
    out = build_masks(ws, 0.3, kind="magnitude")
    for name, w in ws.items():
        assert torch.equal(out[name], magnitude_mask(w, 0.3))
    on_cpu = build_masks(list(ws.items()), 0.3, kind="magnitude", device="cpu")
    assert all(v.device.type == "cpu" for v in on_cpu.values())


@pytest.mark.cuda
def test_build_masks_default_to_the_parameter_device():
    out = build_masks({"w": torch.randn(40, 40, device="cuda")}, 0.1)
    assert out["w"].device.type == "cuda"
    assert torch.equal(out["w"].cpu(), random_mask(1600, 0.1, seed=param_seed(0, "w")))


# ----------------------------------------------------------------------------- conversions


def test_dense_indices_round_trip():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(7, 13, generator=g) < 0.3
    idx = dense_to_indices(dense)
    assert_compact(idx, dense.numel(), int(dense.sum()))
    assert torch.equal(indices_to_dense(idx, dense.shape), dense)
    assert torch.equal(indices_to_dense(idx, (7, 13)), dense)
    assert torch.equal(indices_to_dense(idx, dense.numel()), dense.view(-1))
    assert torch.equal(indices_to_dense(idx.long(), [7, 13], device="cpu"), dense)

    idx = random_mask(1000, 0.05, seed=0)
    assert torch.equal(dense_to_indices(indices_to_dense(idx, (40, 25))), idx)
    assert torch.equal(dense_to_indices(indices_to_dense(idx, 1000)), idx)


def test_dense_to_indices_of_a_view_uses_the_logical_order():
    dense = torch.rand(6, 9) < 0.5
    assert torch.equal(dense_to_indices(dense.t()), dense_to_indices(dense.t().contiguous()))


def test_conversions_empty_and_full():
    assert dense_to_indices(torch.zeros(3, 3, dtype=torch.bool)).numel() == 0
    assert dense_to_indices(torch.ones(3, 3, dtype=torch.bool)).tolist() == list(range(9))
    assert not indices_to_dense(torch.empty(0, dtype=torch.int32), (2, 2)).any()
    assert indices_to_dense(torch.empty(0, dtype=torch.int32), 0).shape == (0,)


@pytest.mark.cuda
def test_conversions_on_cuda():
    idx = random_mask(500, 0.1, seed=1, device="cuda")
    dense = indices_to_dense(idx, (20, 25))
    assert dense.device.type == "cuda"
    assert torch.equal(dense_to_indices(dense), idx)
    assert indices_to_dense(idx, 500, device="cpu").device.type == "cpu"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: nnz_for(10, -0.1), ValueError, r"density must be in \[0, 1\]"),
        (lambda: nnz_for(10, 1.5), ValueError, r"density must be in \[0, 1\]"),
        (lambda: nnz_for(10, float("nan")), ValueError, r"density must be in \[0, 1\]"),
        (lambda: nnz_for(10, "0.5"), TypeError, "density must be a real number"),
        (lambda: nnz_for(10, True), TypeError, "density must be a real number"),
        (lambda: nnz_for(-1, 0.5), ValueError, "numel must be >= 0"),
        (lambda: nnz_for(10.0, 0.5), TypeError, "numel must be an int"),
        (lambda: random_mask(-5, 0.1, seed=0), ValueError, "numel_or_tensor must be >= 0"),
        (lambda: random_mask(2**31, 0.1, seed=0), ValueError, "int32 mask indices"),
        (lambda: random_mask("10", 0.1, seed=0), TypeError, "numel_or_tensor must be an int"),
        (lambda: random_mask(10, 2.0, seed=0), ValueError, "density must be in"),
        (lambda: random_mask(10, 0.1, seed=1.5), TypeError, "seed must be an int"),
        (lambda: random_mask(10, 0.1, seed=2**64), ValueError, "seed must be in"),
        (lambda: random_mask(10, 0.1), TypeError, "seed"),  # seed is required
        (lambda: magnitude_mask(torch.arange(10), 0.5), TypeError, "weight must be a floating-point tensor"),
        (lambda: magnitude_mask([1.0, 2.0], 0.5), TypeError, "weight must be a torch.Tensor"),
        (lambda: magnitude_mask(torch.ones(4), -1), ValueError, "density must be in"),
        (lambda: build_masks({"a": torch.ones(4)}, 0.5, kind="topk"), ValueError, "kind must be one of 'random'"),
        (lambda: build_masks({"a": torch.ones(4)}, 0.5, kind="importance"), ValueError, "ImportanceScores"),
        (lambda: build_masks({"a": torch.ones(4, dtype=torch.int64)}, 0.5), TypeError,
         r"named_params\['a'\] must be a floating-point tensor"),
        (lambda: build_masks([("a", torch.ones(2)), ("a", torch.ones(3))], 0.5), ValueError, "names 'a' twice"),
        (lambda: build_masks(5, 0.5), TypeError, "named_params must be a dict"),
        (lambda: build_masks({"a": torch.ones(4)}, 0.5, seed="0"), TypeError, "seed must be an int"),
        (lambda: ImportanceScores({"a": torch.ones(2)}, "hessian"), ValueError, "kind must be one of 'grad'"),
        (lambda: ImportanceScores({}, "grad"), ValueError, "params is empty"),
        (lambda: ImportanceScores({"a": torch.ones(2)}, "grad").masks(1.5), ValueError, "density must be in"),
        (lambda: param_seed(0, 3), TypeError, "name must be a str"),
        (lambda: param_seed("0", "a"), TypeError, "seed must be an int"),
        (lambda: dense_to_indices(torch.ones(3)), TypeError, "bool_mask must have dtype bool"),
        (lambda: dense_to_indices([True]), TypeError, "bool_mask must be a torch.Tensor"),
        (lambda: indices_to_dense(torch.tensor([0.0]), 3), TypeError, "idx must have dtype int32 or int64"),
        (lambda: indices_to_dense(torch.zeros(1, 1, dtype=torch.int32), 3), ValueError, "idx must be 1-D"),
        (lambda: indices_to_dense(torch.tensor([0, 3], dtype=torch.int32), 3), ValueError,
         r"idx holds values in \[0, 3\], outside \[0, 3\)"),
        (lambda: indices_to_dense(torch.tensor([-1], dtype=torch.int32), (2, 2)), ValueError, "outside"),
        (lambda: indices_to_dense(torch.tensor([0], dtype=torch.int32), (2, -2)), ValueError,
         "shape_or_numel .each size. must be >= 0"),
        (lambda: indices_to_dense(torch.tensor([0], dtype=torch.int32), 2.5), TypeError,
         "shape_or_numel must be an int"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------------- position ranges


@pytest.mark.parametrize("encoding", ["int32", "block16", "implicit", "full"])
def test_slots_in_and_positions_in_give_the_entries_of_a_position_range(encoding):
    """For ranges on and off every encoding's block boundaries (block16's 65536, an
    implicit mask's 256, none): the slots and the positions relative to lo of the entries
    in [lo, hi), against the mask's indices."""
    from seat.masks import Block16Mask, FullMask, ImplicitMask, IndexMask

    numel = 3 * 65536 + 1000
    hashed = ImplicitMask(numel, 0.05, seed=2, param_id=3, block=256)
    idx = hashed.indices()
    mask = {"int32": IndexMask(idx, numel), "block16": Block16Mask(idx, numel), "implicit": hashed,
            "full": FullMask(numel)}[encoding]
    if encoding == "full":
        idx = torch.arange(numel, dtype=torch.int32)
    for lo, hi in [(0, numel), (0, 0), (numel, numel), (256, 512), (1, 65537), (65536, 2 * 65536 + 5),
                   (100, 101), (70000, numel), (5, 190000)]:
        s0, s1 = mask.slots_in(lo, hi)
        inside = ((idx >= lo) & (idx < hi)).nonzero().squeeze(1)
        expect = (int(inside[0]), int(inside[-1]) + 1) if inside.numel() else (s0, s0)
        assert (s0, s1) == expect, (lo, hi)
        assert s0 == int((idx < lo).sum())
        positions = mask.positions_in(lo, hi)
        assert positions.dtype == torch.int32
        assert torch.equal(positions.long(), idx[s0:s1].long() - lo), (lo, hi)
    for bad in [(-1, 5), (5, 4), (0, numel + 1), (0.0, 5)]:
        with pytest.raises(ValueError, match="slots_in.lo, hi. needs ints"):
            mask.slots_in(*bad)
