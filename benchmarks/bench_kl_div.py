"""CPU benchmark: seat.ops.kl_div / paired_loss (cpu backend, fused C++ kernel) vs the
eager torch naive version (log_softmax of both inputs, then the KL / CE terms), forward +
backward, time and peak memory, each ratio measured in the same run on the same machine.

    python benchmarks/bench_kl_div.py [--quick] [--out DIR (default: benchmarks/results/<device>)]

Time: median wall time of `reps` calls of loss.backward() on fresh leaves after one
warm-up, in this process (torch's default thread count).
Memory: each (case, implementation) runs once more in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=65536 (so glibc serves every tensor of 64 KiB or more with mmap
and returns it on free: resident memory follows live tensor bytes); the number reported
is the peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the
call) minus the resident size just before the measured call, i.e. the peak of what the call allocated beyond its inputs, the
gradient included. The loss values of both implementations are compared as a check.
fused_linear: fused_linear_paired_loss from hidden states (H=512) and the lm_head vs eager
torch computing both models' N x V logits. Writes bench_kl_div.csv, .json and .md to
--out. CPU numbers only: no GPU figures.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_name, slug  # noqa: E402


FUSED_HIDDEN = 512  # hidden size of the fused_linear cases (kept small: CPU matmul time)


def make_inputs(op: str, n: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if op == "fused_linear":  # hidden states (x rows, then x~ rows) and a frozen lm_head
        hidden = torch.randn(n, FUSED_HIDDEN, generator=g).to(dtype)
        weight = (torch.randn(vocab, FUSED_HIDDEN, generator=g) * FUSED_HIDDEN**-0.5 * 2.5).to(dtype)
        n_ce = n // 2
        ref = (hidden[n_ce:].float() + 0.3 * torch.randn(n - n_ce, FUSED_HIDDEN, generator=g)).to(dtype)
        labels = torch.randint(0, vocab, (n_ce,), generator=g)
        return dict(cur=hidden, ref=ref, labels=labels, weight=weight)
    cur = (torch.randn(n, vocab, generator=g) * 2.5).to(dtype)
    if op == "kl_div":
        ref = (cur.float() + torch.randn(n, vocab, generator=g)).to(dtype)
        return dict(cur=cur, ref=ref)
    n_ce = n // 2
    ref = (cur[n_ce:].float() + torch.randn(n - n_ce, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (n_ce,), generator=g)
    return dict(cur=cur, ref=ref, labels=labels)


def naive_kl(cur, ref):
    log_cur = torch.log_softmax(cur.float(), dim=-1)
    log_ref = torch.log_softmax(ref.float(), dim=-1)
    return F.kl_div(log_cur, log_ref, log_target=True, reduction="sum") / cur.shape[0]


def naive_paired(cur, labels, ref):
    n_ce = labels.numel()
    return F.cross_entropy(cur[:n_ce].float(), labels) + naive_kl(cur[n_ce:], ref)


# torch.compile of the same eager code (inductor's fused CPU kernels); compiled once per
# shape on first use, so its warm-up call is excluded from the timing like every other's.
COMPILED = {"kl_div": torch.compile(naive_kl, dynamic=False), "paired_loss": torch.compile(naive_paired, dynamic=False)}


def run_once(op: str, impl: str, inputs: dict) -> torch.Tensor:
    """Forward + backward; returns the loss (detached). impl: seat, naive or compiled."""
    from seat import ops

    leaf = inputs["cur"].detach().requires_grad_()
    if op == "kl_div":
        if impl == "seat":
            with ops.use_backend("cpu"):
                loss = ops.kl_div(leaf, inputs["ref"])
        elif impl == "compiled":
            loss = COMPILED["kl_div"](leaf, inputs["ref"])
        else:
            loss = naive_kl(leaf, inputs["ref"])
    elif op == "fused_linear":
        labels, ref, weight = inputs["labels"], inputs["ref"], inputs["weight"]
        n_ce = labels.numel()
        if impl == "seat":
            with ops.use_backend("cpu"):
                loss, _, _ = ops.fused_linear_paired_loss(leaf, weight, labels, ref)
        else:  # the N x V logits of both models, materialized
            logits, ref_logits = leaf @ weight.T, ref @ weight.T
            loss = F.cross_entropy(logits[:n_ce].float(), labels) + naive_kl(logits[n_ce:], ref_logits)
    else:
        labels, ref = inputs["labels"], inputs["ref"]
        n_ce = labels.numel()
        if impl == "seat":
            with ops.use_backend("cpu"):
                loss, _, _ = ops.paired_loss(leaf, labels, ref)
        elif impl == "compiled":
            loss = COMPILED["paired_loss"](leaf, labels, ref)
        else:
            loss = naive_paired(leaf, labels, ref)
    loss.backward()
    assert leaf.grad is not None
    return loss.detach()


def time_case(op, impl, inputs, reps):
    run_once(op, impl, inputs)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run_once(op, impl, inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_peak(op, impl, n, vocab, dtype_name) -> int:
    """In a fresh process: peak RSS growth of one call beyond its inputs (bytes)."""
    inputs = make_inputs(op, n, vocab, getattr(torch, dtype_name))
    run_once(op, impl, make_inputs(op, 8, 64, getattr(torch, dtype_name)))  # load code paths, small
    # Reset the high-water mark (Linux >= 4.0), so the temporaries of making the inputs
    # do not count; then peak RSS during the call minus RSS before it.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_bytes("VmRSS")
    run_once(op, impl, inputs)
    return max(0, proc_status_bytes("VmHWM") - before)


def measure_peak(op, impl, n, vocab, dtype_name) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_kl_div as b; "
            f"print(b.child_peak({op!r}, {impl!r}, {n}, {vocab}, {dtype_name!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def cases(quick: bool):
    if quick:
        return [("kl_div", 32, 32000, "float32"), ("paired_loss", 32, 32000, "float32")]
    return [
        ("kl_div", 64, 32000, "float32"),
        ("kl_div", 256, 32000, "float32"),
        ("kl_div", 64, 128256, "float32"),
        ("kl_div", 64, 128256, "bfloat16"),
        ("kl_div", 256, 128256, "float32"),
        ("paired_loss", 64, 32000, "float32"),
        ("paired_loss", 128, 128256, "float32"),
        ("fused_linear", 1024, 128256, "float32"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small cases (seconds)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ops", nargs="+", help="run only these ops (kl_div, paired_loss, fused_linear)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--out", type=Path, default=RESULTS / slug(device_name("cpu")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for op, n, vocab, dtype_name in cases(args.quick):
        if args.ops and op not in args.ops:
            continue
        inputs = make_inputs(op, n, vocab, getattr(torch, dtype_name))
        loss_seat = run_once(op, "seat", inputs)
        loss_naive = run_once(op, "naive", inputs)
        t_seat = time_case(op, "seat", inputs, args.reps)
        t_naive = time_case(op, "naive", inputs, args.reps)
        t_compiled = time_case(op, "compiled", inputs, args.reps) if op in COMPILED and not args.no_compile else None
        m_seat = measure_peak(op, "seat", n, vocab, dtype_name)
        m_naive = measure_peak(op, "naive", n, vocab, dtype_name)
        row = dict(op=op, rows=n, vocab=vocab, dtype=dtype_name, seat_ms=round(t_seat * 1e3, 2),
                   naive_ms=round(t_naive * 1e3, 2), speedup=round(t_naive / t_seat, 2),
                   compiled_ms=None if t_compiled is None else round(t_compiled * 1e3, 2),
                   speedup_vs_compiled=None if t_compiled is None else round(t_compiled / t_seat, 2),
                   seat_peak_mib=round(m_seat / 2**20, 1), naive_peak_mib=round(m_naive / 2**20, 1),
                   memory_ratio=round(m_naive / max(m_seat, 1), 2),
                   input_mib=round(sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20, 1),
                   loss_abs_diff=float(abs(loss_seat.double() - loss_naive.double())))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), quick=args.quick, reps=args.reps,
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    stem = args.out / ("bench_kl_div_quick" if args.quick else "bench_kl_div")
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    lines = [
        "# seat.ops kl_div / paired_loss vs eager torch, CPU (forward + backward)",
        "",
        f"{meta['cpu_count']} CPU cores, {meta['torch_threads']} torch threads, torch {meta['torch']}, "
        f"median of {args.reps} after a warm-up; {meta['time']}. Peak = peak RSS growth of one call beyond its "
        "inputs (fresh process each). Ratios: naive / seat (eager torch), compiled / seat (torch.compile of the "
        "same code, time only). No GPU numbers.",
        "",
        "| op | rows | vocab | dtype | seat ms | naive ms | speed-up | compiled ms | vs compiled | seat peak MiB "
        "| naive peak MiB | memory ratio | inputs MiB | loss diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiled = ("| - | - " if r["compiled_ms"] is None
                    else f"| {r['compiled_ms']} | {r['speedup_vs_compiled']}x ")
        lines.append(f"| {r['op']} | {r['rows']} | {r['vocab']} | {r['dtype']} | {r['seat_ms']} | {r['naive_ms']} | "
                     f"{r['speedup']}x {compiled}| {r['seat_peak_mib']} | {r['naive_peak_mib']} | "
                     f"{r['memory_ratio']}x | {r['input_mib']} | {r['loss_abs_diff']:.2e} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
