"""Mask selection: which entries of a weight SEAT trains, as int32 flat indices.

A mask's selection is a 1-D ``torch.int32`` tensor of flat indices into ``W.view(-1)``,
sorted ascending and unique (the INDEX encoding; seat.masks.encodings turns it into
the others). Masks are chosen once, before training:

  random_mask       a uniformly random subset, seeded (memory O(nnz))
  magnitude_mask    the entries of largest |w|
  ImportanceScores  the entries of largest accumulated |grad| or |w * grad| over
                    calibration batches
  nnz_for           the exact number of entries for a density, so every kind of mask of
                    a tensor has the same size
  param_seed        a stable per-parameter seed
  dense_to_indices / indices_to_dense   to and from a dense ``torch.bool`` mask

Errors name the argument and say what to do: TypeError for a wrong type or dtype,
ValueError for a wrong value.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import operator
from typing import Iterable, Mapping, Sequence, Union

import torch

from .._constants import INT32_MAX, MASK_KINDS

IMPORTANCE_KINDS = ("grad", "wgrad")

INDEX_DTYPE = torch.int32

# Below this many elements random_mask (and its internal recursion) uses a randperm:
# cheap at that size and trivially uniform. Above it the candidate/hit samplers run.
_RANDPERM_BELOW = 64
# Random draws per torch.randint call in the dense sampler (bounds its int64 scratch).
_DRAW_CHUNK = 1 << 22

NamedParams = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


# ----------------------------------------------------------------------------- checks


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a real number in [0, 1] (the fraction of entries trained); "
                        f"got {type(density).__name__}")
    d = float(density)
    if not (0.0 <= d <= 1.0):  # also rejects nan
        raise ValueError(f"density must be in [0, 1] (the fraction of entries trained, e.g. 0.05); got {density}")
    return d


def _check_numel(name: str, numel) -> int:
    if isinstance(numel, bool):
        raise TypeError(f"{name} must be an int (a number of elements) or a tensor; got bool")
    try:
        n = operator.index(numel)
    except TypeError:
        raise TypeError(f"{name} must be an int (a number of elements) or a tensor; "
                        f"got {type(numel).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0 (a number of elements); got {n}")
    if n > INT32_MAX:
        raise ValueError(f"{name} is {n}: int32 mask indices reach at most 2**31-1 elements; "
                         f"split the tensor into smaller ones")
    return n


def _numel_of(name: str, numel_or_tensor) -> int:
    if isinstance(numel_or_tensor, torch.Tensor):
        return _check_numel(name, numel_or_tensor.numel())
    return _check_numel(name, numel_or_tensor)


def _check_seed(name: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(seed).__name__}")
    s = int(seed)
    if not (-(2**63) <= s < 2**64):
        raise ValueError(f"{name} must be in [-2**63, 2**64) (what torch.Generator.manual_seed takes); got {s}")
    return s


def _check_float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64); "
                        f"got {str(t.dtype).replace('torch.', '')}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {t.layout}")
    _check_numel(f"{name}.numel()", t.numel())
    return t


def _named_list(name: str, named_params: NamedParams) -> list[tuple[str, torch.Tensor]]:
    """dict or iterable of (name, tensor) -> list of pairs, names unique, floating tensors."""
    if isinstance(named_params, Mapping):
        items = list(named_params.items())
    else:
        try:
            items = [tuple(item) for item in named_params]
        except TypeError:
            raise TypeError(f"{name} must be a dict of name -> tensor or an iterable of (name, tensor) pairs "
                            f"(e.g. model.named_parameters()); got {type(named_params).__name__}") from None
    seen = set()
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise TypeError(f"{name} must hold (name: str, tensor) pairs; got {item!r:.80}")
        pname, tensor = item
        if pname in seen:
            raise ValueError(f"{name} names {pname!r} twice; parameter names must be unique")
        seen.add(pname)
        _check_float_tensor(f"{name}[{pname!r}]", tensor)
    return items


# ----------------------------------------------------------------------------- counts


def nnz_for(numel: int, density: float) -> int:
    """The exact number of mask entries of a tensor of ``numel`` elements at ``density``.

    0 if density == 0, numel if density == 1, else ``max(1, round(density * numel))``
    (Python's round: half to even), capped at numel (so 0 for an empty tensor). Every mask
    kind of a tensor has this size.
    """
    n = _check_numel("numel", numel)
    d = _check_density(density)
    if d == 0.0:
        return 0
    if d == 1.0:
        return n
    return min(n, max(1, round(d * n)))


# ----------------------------------------------------------------------------- random


def _draw_count(n: int, k: int, have: int = 0) -> int:
    """How many i.i.d. uniform draws from range(n) to go from ``have`` to ``k`` distinct
    values (k < n): a little above the expectation n * ln((n - have) / (n - k)), so a
    top-up is rarely needed; the overshoot is dropped again at random, which costs a
    sampler call of about 1% of k."""
    e = n * (math.log(n - have) - math.log(n - k))
    return int(math.ceil(e * 1.01 + 3.0 * math.sqrt(e))) + 1


def _sample_sorted(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random k-subset of range(n), as sorted unique int64 on the CPU.

    Every path is uniform by symmetry: the distinct values of i.i.d. uniform draws,
    given how many there are, are a uniformly random set of that size (relabeling
    range(n) maps draw sequences one-to-one and preserves their probability; top-ups
    depend on counts only), and dropping a uniformly random subset of it keeps that.
    """
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if k == n:
        return torch.arange(n, dtype=torch.int64)
    if n < _RANDPERM_BELOW:
        return torch.randperm(n, generator=gen)[:k].sort().values
    if 4 * k <= n:
        return _sample_sparse(n, k, gen)
    # Dense: mark hits in a bool tensor of n (the result is >= n/4 indices anyway). For
    # k > n/2 draw the complement, so the hit sampler never targets more than half.
    complement = 2 * k > n
    hits = _sample_hits(n, n - k if complement else k, gen)
    if complement:
        hits.logical_not_()
    return hits.nonzero().squeeze(1)


def _sample_sparse(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k <= n/4: candidates by randint + unique, topped up, overshoot dropped. O(k) memory."""
    cand = torch.randint(n, (_draw_count(n, k),), generator=gen, dtype=torch.int64).unique(sorted=True)
    while cand.numel() < k:
        m = cand.numel()
        more = torch.randint(n, (_draw_count(n, k, m),), generator=gen, dtype=torch.int64)
        cand = torch.cat([cand, more]).unique(sorted=True)
    m = cand.numel()
    if m > k:
        keep = torch.ones(m, dtype=torch.bool)
        keep[_sample_sorted(m, m - k, gen)] = False
        cand = cand[keep]
    return cand


def _sample_hits(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k <= n/2: a bool tensor of n with exactly k uniformly random True entries."""
    hits = torch.zeros(n, dtype=torch.bool)
    draws = _draw_count(n, k)
    m = 0
    while True:
        while draws > 0:
            chunk = min(draws, _DRAW_CHUNK)
            hits.index_fill_(0, torch.randint(n, (chunk,), generator=gen, dtype=torch.int64), True)
            draws -= chunk
        m = int(hits.count_nonzero())
        if m >= k:
            break
        draws = _draw_count(n, k, m)
    if m > k:
        pos = hits.nonzero().squeeze(1)
        hits[pos[_sample_sorted(m, m - k, gen)]] = False
    return hits


def random_mask(numel_or_tensor, density: float, *, seed: int, device=None) -> torch.Tensor:
    """A uniformly random mask of exactly ``nnz_for(numel, density)`` entries.

    Args:
        numel_or_tensor: the number of elements of the weight, or the weight itself
            (only its ``numel()`` is used; any dtype, any device).
        density: fraction of entries in the mask, in [0, 1].
        seed: seeds a CPU ``torch.Generator``; the same (numel, density, seed) gives the
            same mask on every device (for per-parameter seeds use ``param_seed``).
        device: where to put the result (default: CPU).

    Returns:
        1-D ``torch.int32`` tensor of shape ``(nnz,)``: sorted, unique flat indices in
        ``[0, numel)``. Every nnz-subset is equally likely.

    Cost: for density <= 1/4 memory and time are O(nnz) (random candidates, deduplicated,
    topped up, the surplus dropped at random), independent of numel; above that a
    bool tensor of numel marks the hits (the result is >= numel/4 entries anyway).
    """
    n = _numel_of("numel_or_tensor", numel_or_tensor)
    k = nnz_for(n, density)
    s = _check_seed("seed", seed)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(s)
    idx = _sample_sorted(n, k, gen).to(INDEX_DTYPE)
    return idx if device is None else idx.to(device)


# ----------------------------------------------------------------------------- top-k


def _top_indices(name: str, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries of 1-D float32 ``scores`` (ties: lower index
    first, i.e. the first k of a stable sort on -scores), sorted ascending, int32, on
    the scores' device. O(numel): a k-th value selection, no full sort."""
    n = scores.numel()
    if k == 0:
        return torch.empty(0, dtype=INDEX_DTYPE, device=scores.device)
    if k == n:
        return torch.arange(n, dtype=INDEX_DTYPE, device=scores.device)
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{name} contains NaN; masks rank entries by magnitude, so fix or drop the NaNs first")
    threshold = torch.kthvalue(scores, n - k + 1).values  # the k-th largest
    chosen = scores > threshold
    n_above = int(chosen.sum())
    tied = (scores == threshold).nonzero().squeeze(1)[: k - n_above]  # lower index first
    chosen[tied] = True
    return chosen.nonzero().squeeze(1).to(INDEX_DTYPE)


def magnitude_mask(weight: torch.Tensor, density: float) -> torch.Tensor:
    """The ``nnz_for(weight.numel(), density)`` entries of largest ``|weight|``.

    Args:
        weight: floating-point tensor of any shape (float16, bfloat16, float32, float64),
            dense; ranked in float32 on its own device. No NaNs.
        density: fraction of entries in the mask, in [0, 1].

    Returns:
        1-D ``torch.int32`` tensor of shape ``(nnz,)`` on ``weight.device``: sorted,
        unique flat indices into ``weight.reshape(-1)`` (== ``weight.view(-1)`` for a
        contiguous weight). Ties in |w| go to the lower index (deterministic).
    """
    _check_float_tensor("weight", weight)
    k = nnz_for(weight.numel(), density)
    with torch.no_grad():
        scores = weight.detach().reshape(-1).to(torch.float32).abs()
    return _top_indices("weight", scores, k)


class ImportanceScores:
    """Accumulates per-entry importance over calibration batches, then ranks it.

    Args:
        params: dict of name -> parameter, or an iterable of (name, parameter) pairs
            (e.g. ``model.named_parameters()``); floating-point tensors.
        kind: ``"grad"`` accumulates ``|grad|``, ``"wgrad"`` accumulates
            ``|w * grad|`` (a first-order estimate of the loss change from zeroing w).

    Usage::

        scores = ImportanceScores(model.named_parameters(), kind="wgrad")
        for batch in calibration_batches:
            model(**batch).loss.backward()
            scores.update()
            model.zero_grad()
        masks = scores.masks(density=0.05)   # name -> int32 indices

    Memory: one float32 buffer shaped like each parameter (allocated at its first
    gradient), so 4 bytes per parameter entry while the scores are alive. Weights are
    read at each ``update()``; they are expected not to change during calibration.
    """

    def __init__(self, params: NamedParams, kind: str = "grad"):
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, IMPORTANCE_KINDS))}; got {kind!r}")
        self.kind = kind
        self._params = _named_list("params", params)
        if not self._params:
            raise ValueError("params is empty; pass the parameters to score, e.g. model.named_parameters()")
        self._scores: dict[str, torch.Tensor] = {}
        self.num_updates = 0

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._params]

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """name -> float32 accumulated score, shaped like the parameter (only parameters
        that have had a gradient so far)."""
        return dict(self._scores)

    @torch.no_grad()
    def update(self) -> None:
        """Add this batch's importance: reads each parameter's current ``.grad``
        (parameters whose grad is None are skipped). Call after ``loss.backward()``
        and before ``zero_grad()``."""
        seen = 0
        for name, p in self._params:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                raise TypeError(f"the grad of {name!r} has layout {g.layout}; ImportanceScores needs dense grads")
            if g.shape != p.shape:
                raise ValueError(f"the grad of {name!r} has shape {tuple(g.shape)}, not the parameter's "
                                 f"{tuple(p.shape)}")
            buf = self._scores.get(name)
            if buf is None:
                buf = self._scores[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            if self.kind == "grad":
                buf.add_(g.detach().to(torch.float32).abs_())
            else:
                buf.add_((p.detach().to(torch.float32) * g.detach().to(torch.float32)).abs_())
            seen += 1
        if seen == 0:
            raise ValueError("no parameter has a .grad; call update() after loss.backward() on a calibration "
                             "batch and before zero_grad() (and check that the parameters require grad)")
        self.num_updates += 1

    def masks(self, density: float, encoding: str = "int32") -> dict[str, torch.Tensor]:
        """name -> the ``nnz_for(numel, density)`` entries of largest accumulated score,
        as sorted unique ``torch.int32`` flat indices on the parameter's device (ties:
        lower index first); another explicit encoding (e.g. "block16", 2 bytes per
        entry) returns seat.masks masks of it."""
        from .registry import check_chosen_encoding, encode

        check_chosen_encoding(encoding)
        d = _check_density(density)
        if self.num_updates == 0:
            raise ValueError("no importance has been accumulated yet; call update() after loss.backward() on "
                             "each calibration batch, then masks()")
        missing = [name for name, _ in self._params if name not in self._scores]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) never had a gradient in {self.num_updates} update(s), "
                             f"so they have no importance: {', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}; check that they require grad and take part "
                             f"in the loss, or leave them out of params")
        return {
            name: encode(_top_indices(f"the importance scores of {name!r}", self._scores[name].view(-1),
                                      nnz_for(p.numel(), d)), p.numel(), encoding)
            for name, p in self._params
        }


# ----------------------------------------------------------------------------- per-parameter


def param_seed(seed: int, name: str) -> int:
    """A stable seed for parameter ``name`` under the global ``seed``, in [0, 2**63).

    Derived with SHA-256 of the seed and the name, so it is the same in every process,
    machine and Python version (unlike ``hash()``, which is salted per process), and
    distinct parameters get independent masks.
    """
    s = _check_seed("seed", seed)
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (the parameter name); got {type(name).__name__}")
    digest = hashlib.sha256(f"seat.masks.param_seed:{s}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ----------------------------------------------------------------------------- conversions


def dense_to_indices(bool_mask: torch.Tensor) -> torch.Tensor:
    """Dense bool mask (any shape) -> compact mask.

    Returns the flat row-major positions of the True entries (indices into
    ``W.view(-1)`` for a contiguous W of the mask's shape) as a 1-D sorted unique
    ``torch.int32`` tensor on the mask's device.
    """
    if not isinstance(bool_mask, torch.Tensor):
        raise TypeError(f"bool_mask must be a torch.Tensor, got {type(bool_mask).__name__}")
    if bool_mask.dtype != torch.bool:
        raise TypeError(f"bool_mask must have dtype bool; got {str(bool_mask.dtype).replace('torch.', '')} "
                        f"(use mask != 0)")
    _check_numel("bool_mask.numel()", bool_mask.numel())
    return bool_mask.reshape(-1).nonzero().squeeze(1).to(INDEX_DTYPE)


def indices_to_dense(idx: torch.Tensor, shape_or_numel: int | Sequence[int], device=None) -> torch.Tensor:
    """Compact mask -> dense bool mask.

    Args:
        idx: 1-D int32 or int64 flat indices in ``[0, numel)`` (any order; duplicates
            collapse).
        shape_or_numel: the shape of the dense mask (a sequence of ints or torch.Size),
            or its number of elements for a 1-D mask.
        device: where to put the result (default: idx's device).

    Returns:
        ``torch.bool`` tensor of that shape, True exactly at the indexed (row-major) positions.
    """
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must have dtype int32 or int64; got {str(idx.dtype).replace('torch.', '')}")
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D; got shape {tuple(idx.shape)}")
    if isinstance(shape_or_numel, (torch.Size, Sequence)) and not isinstance(shape_or_numel, (str, bytes)):
        shape = tuple(_check_numel("shape_or_numel (each size)", s) for s in shape_or_numel)
    else:
        shape = (_check_numel("shape_or_numel", shape_or_numel),)
    numel = math.prod(shape)
    _check_numel("shape_or_numel (its number of elements)", numel)
    device = idx.device if device is None else torch.device(device)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= numel:
            raise ValueError(f"idx holds values in [{lo}, {hi}], outside [0, {numel}) for shape {shape}; "
                             f"pass the shape of the tensor the mask was built for")
    dense = torch.zeros(numel, dtype=torch.bool, device=device)
    dense[idx.to(device=device, dtype=torch.int64)] = True
    return dense.view(shape)
