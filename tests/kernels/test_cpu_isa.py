"""The CPU kernels compile their hot loops once per instruction set (baseline x86-64, AVX2,
AVX-512) and pick one at first use; the rest of the suite runs only the copy this machine
picks. Here every copy the machine can execute runs (SEAT_CPU_ISA, one subprocess each)
against the reference backend: the loss kernel's tiles (kl_div forward and reverse,
paired_loss and its CE rows, float32, bfloat16, float16 and a mix, vocabularies that are and are not whole
tiles, temperature, -inf entries, masked rows) and the hash-mask membership (implicit
masks' block offsets, a gather and dequant4_delta (whose 4-bit expansion has a copy per
instruction set too), bit for bit, at sizes that end mid-word). The AdamW step of the
sparse-update kernels (16 or 8 lanes at a time) must give the same bits in every copy: each
run prints a digest of its results, compared across copies (every encoding; fp32 / bf16
params, amsgrad, maximize, stochastic rounding, masters, dense state; entry counts that are
not whole vectors)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import torch
from seat import ops

torch.manual_seed(0)
worst = 0.0
for vocab in (17, 1024, 4097, 3 * 1024 + 48):
    for dtype, ref_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                             (torch.float16, torch.float16), (torch.bfloat16, torch.float16)):
        cur = (torch.randn(6, vocab) * 3).to(dtype)
        ref = (cur.float() + torch.randn(6, vocab)).to(ref_dtype)
        cur[1, ::5] = float("-inf")
        ref[2, ::7] = float("-inf")
        mask = torch.tensor([True, True, True, False, True, True])
        labels = torch.randint(0, vocab, (3,))
        cases = [
            lambda x: ops.kl_div(x, ref, mask),
            lambda x: ops.kl_div(x, ref, temperature=1.7, reverse=True, reduction="sum"),
            lambda x: sum(ops.paired_loss(x, labels, ref[3:], kl_weight=0.5)),
        ]
        for case in cases:
            out = {}
            for backend in ("reference", "cpu"):
                x = cur.clone().requires_grad_()
                with ops.use_backend(backend):
                    loss = case(x)
                loss.backward()
                out[backend] = (loss.detach().double(), x.grad.double())
            (l_ref, g_ref), (l_cpu, g_cpu) = out["reference"], out["cpu"]
            torch.testing.assert_close(l_cpu, l_ref, rtol=1e-5, atol=1e-6, equal_nan=True)
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(g_cpu, g_ref, rtol=tol, atol=tol, equal_nan=True)
            worst = max(worst, float((g_cpu - g_ref).nan_to_num(0.0, 0.0, 0.0).abs().max()))

from seat.masks import ImplicitMask
for numel, density, block in ((1, 0.5, 1024), (4096 * 3 + 17, 0.05, 4096), (70001, 0.3, 1024), (5000, 1.0, 1024)):
    dense = torch.randn(numel)
    masks = {}
    for backend in ("reference", "cpu"):
        with ops.use_backend(backend):
            mask = ImplicitMask(numel, density, seed=11, param_id=3, block=block)
            out = torch.zeros(mask.nnz)
            ops.masked_gather_(out, dense, mask)
        masks[backend] = (mask.block_offsets.clone(), out)
    assert torch.equal(masks["reference"][0], masks["cpu"][0]), (numel, density)
    assert torch.equal(masks["reference"][1], masks["cpu"][1]), (numel, density)

try:  # dequant4_delta walks implicit masks with the same membership words
    import bitsandbytes.functional as bnb_f
except ImportError:
    bnb_f = None
for numel, dtype in (((4096 * 3 + 17, torch.bfloat16), (70001, torch.bfloat16), (70001, torch.float16),
                      (4097, torch.float32)) if bnb_f is not None else ()):
    weight = torch.randn(numel).to(dtype)
    packed, qs = bnb_f.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    mask = ImplicitMask(numel, 0.3, seed=5, param_id=1, block=1024)
    delta = torch.randn(mask.nnz).to(dtype)
    got = {}
    for backend in ("reference", "cpu"):
        with ops.use_backend(backend):
            got[backend] = ops.dequant4_delta(packed, qs, mask, delta)
    assert torch.equal(got["reference"], got["cpu"]), (numel, dtype)
import hashlib
from seat.masks import encode, random_mask
digest = hashlib.sha256()
g = torch.Generator().manual_seed(2)
for numel, density in ((997, 0.3), (70001 + 65536, 0.05)):
    idx = random_mask(numel, density, seed=4)
    for encoding in ("int32", "block16", "implicit"):
        mask = (ImplicitMask(numel, density, seed=4, param_id=0, block=1024) if encoding == "implicit"
                else encode(idx, numel, encoding))
        nnz = mask.nnz if encoding != "int32" else idx.numel()
        for dtype, amsgrad, maximize, master, stochastic, dense_state in (
                (torch.float32, False, False, False, False, False), (torch.float32, True, True, False, False, False),
                (torch.float32, False, False, False, False, True), (torch.bfloat16, False, False, False, True, False),
                (torch.bfloat16, True, False, True, False, False)):
            n_state = numel if dense_state else nnz
            param = torch.randn(numel, generator=g).to(dtype)
            grad = torch.randn(nnz, generator=g)
            grad[::17] *= 1e4
            m, v = torch.randn(n_state, generator=g), torch.rand(n_state, generator=g)
            vmax = [torch.rand(n_state, generator=g)] if amsgrad else None
            masters = [param.float()[:n_state].clone()] if master else None
            with ops.use_backend("cpu"):
                ops.sparse_adamw_([param], [mask], [grad], [m], [v], masters, vmax, lr=1e-2, weight_decay=0.1,
                                  step=3, maximize=maximize, stochastic_rounding=stochastic, seed=5,
                                  dense_state=dense_state)
            for t in [param, m, v] + (vmax or []) + (masters or []):
                digest.update(t.view(torch.uint8 if t.dtype != torch.bfloat16 else torch.int16).numpy().tobytes())
print("ok", worst, digest.hexdigest())
"""


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def _runnable() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["baseline"]
    flags = _cpu_flags()
    isas = ["baseline"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.append("avx2")
        if {"avx512f", "avx512vl", "avx512dq"} <= flags:
            isas.append("avx512")
    return isas


def _run(isa: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SEAT_CPU_ISA=isa, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_copy_matches_the_reference(isa):
    if isa not in _runnable():
        pytest.skip(f"this CPU cannot run the {isa} copy")
    out = _run(isa, CHECK)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]


def test_every_instruction_set_copy_steps_adamw_to_the_same_bits():
    digests = {}
    for isa in _runnable():
        out = _run(isa, CHECK)
        assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]
        digests[isa] = out.stdout.split()[-1]
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("op", ["kl_div", "hash gather"])
def test_an_unknown_instruction_set_is_refused(op):
    """A RuntimeError naming the variable, raised on the calling thread (an exception
    escaping an OpenMP region would abort the process instead)."""
    call = {"kl_div": "ops.kl_div(torch.randn(2, 8), torch.randn(2, 8))",
            "hash gather": "m = ImplicitMask(50000, 0.1, seed=1, block=1024)"}[op]  # counts its members
    code = ("import torch; from seat import ops; from seat.masks import ImplicitMask\n"
            "try:\n"
             f"    with ops.use_backend('cpu'): {call}\n"
             "except RuntimeError as e:\n"
             "    print('refused:', e)\n")
    out = _run("sse9", code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused:" in out.stdout and "SEAT_CPU_ISA must be baseline, avx2 or avx512" in out.stdout
