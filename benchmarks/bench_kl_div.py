"""seat.ops kl_div / paired_loss / fused_linear_paired_loss vs the eager torch naive
version (log_softmax of both inputs, then the KL / CE terms) and torch.compile of it,
forward + backward, time and peak memory, each ratio measured in the same run.

    python benchmarks/bench_kl_div.py [--quick | --size tiny|quick|full] [--device cpu|cuda]
                                      [--reps N] [--ops kl_div paired_loss fused_linear] [--no-compile]
                                      [--out DIR (default: benchmarks/results/<device>)]

seat runs its CPU kernel (fused C++) on CPU and its default backend (Triton) on CUDA.
Time: median of `reps` calls of loss.backward() on fresh leaves after 3 warm-up rounds, the
implementations timed in turn within each round (_common.measure per call).
Memory, CPU: each (case, implementation) runs once more in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=65536 (so glibc serves every tensor of 64 KiB or more with mmap
and returns it on free: resident memory follows live tensor bytes); the number reported
is the peak resident set size (VmHWM, reset through /proc/self/clear_refs just before the
call) minus the resident size just before the measured call, i.e. the peak of what the
call allocated beyond its inputs, the gradient included. CUDA: max_memory_allocated
during the call minus memory_allocated before it, in this process. The loss values of
both implementations are compared as a check.
fused_linear: fused_linear_paired_loss from hidden states (H=512) and the lm_head vs eager
torch computing both models' N x V logits. Writes bench_kl_div[_<size>].csv, .json, .md
and .png to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bandwidth import fraction  # noqa: E402
from _common import Progress, environment, measure, pyplot, write_results  # noqa: E402


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


def seat_backend(device) -> str | None:
    """The CPU kernel on CPU tensors (not the reference: that is what is measured); on
    CUDA seat's default (Triton)."""
    return "cpu" if torch.device(device).type == "cpu" else None


def run_once(op: str, impl: str, inputs: dict) -> torch.Tensor:
    """Forward + backward; returns the loss (detached). impl: seat, naive or compiled."""
    from seat import ops

    leaf = inputs["cur"].detach().requires_grad_()
    backend = seat_backend(leaf.device)
    if op == "kl_div":
        if impl == "seat":
            with ops.use_backend(backend):
                loss = ops.kl_div(leaf, inputs["ref"])
        elif impl == "compiled":
            loss = COMPILED["kl_div"](leaf, inputs["ref"])
        else:
            loss = naive_kl(leaf, inputs["ref"])
    elif op == "fused_linear":
        labels, ref, weight = inputs["labels"], inputs["ref"], inputs["weight"]
        n_ce = labels.numel()
        if impl == "seat":
            with ops.use_backend(backend):
                loss, _, _ = ops.fused_linear_paired_loss(leaf, weight, labels, ref)
        else:  # the N x V logits of both models, materialized
            logits, ref_logits = leaf @ weight.T, ref @ weight.T
            loss = F.cross_entropy(logits[:n_ce].float(), labels) + naive_kl(logits[n_ce:], ref_logits)
    else:
        labels, ref = inputs["labels"], inputs["ref"]
        n_ce = labels.numel()
        if impl == "seat":
            with ops.use_backend(backend):
                loss, _, _ = ops.paired_loss(leaf, labels, ref)
        elif impl == "compiled":
            loss = COMPILED["paired_loss"](leaf, labels, ref)
        else:
            loss = naive_paired(leaf, labels, ref)
    loss.backward()
    assert leaf.grad is not None
    return loss.detach()


# Untimed rounds before the timed ones: the first case of a run measured its seat calls
# 2-3x slower than the same case later in the run with a single warm-up call.
WARMUP_ROUNDS = 3


def time_cases(op, impls, inputs, reps, device) -> dict:
    """{impl: median seconds of one forward + backward}: after WARMUP_ROUNDS untimed rounds,
    `reps` rounds each timing one call of every impl in turn, so a burst of other work on a
    shared machine slows every impl's sample of that round alike, not one impl's whole
    series."""
    times = {impl: [] for impl in impls}
    for _ in range(WARMUP_ROUNDS):
        for impl in impls:
            run_once(op, impl, inputs)
    for _ in range(reps):
        for impl in impls:
            times[impl].append(measure(lambda: run_once(op, impl, inputs), device=device, warmup=0,
                                       repeats=1)["ms"] / 1e3)
    return {impl: statistics.median(t) for impl, t in times.items()}


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


def measure_peak(op, impl, n, vocab, dtype_name, device="cpu") -> int:
    """Bytes one call allocates beyond its inputs, at its peak (see the module docstring)."""
    if device == "cuda":
        inputs = {k: v.to(device) for k, v in make_inputs(op, n, vocab, getattr(torch, dtype_name)).items()}
        run_once(op, impl, inputs)  # compile / autotune first: their buffers are not the op's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(op, impl, inputs)
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_kl_div as b; "
            f"print(b.child_peak({op!r}, {impl!r}, {n}, {vocab}, {dtype_name!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess for {op}/{impl} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


SIZES = {
    # the pipeline on the smallest shapes (tests): the numbers mean nothing
    "tiny": [("kl_div", 8, 512, "float32"), ("fused_linear", 16, 512, "float32")],
    "quick": [("kl_div", 32, 32000, "float32"), ("paired_loss", 32, 32000, "float32")],
    "full": [
        ("kl_div", 64, 32000, "float32"),
        ("kl_div", 64, 32000, "bfloat16"),
        ("kl_div", 256, 32000, "float32"),
        ("kl_div", 64, 128256, "float32"),
        ("kl_div", 64, 128256, "bfloat16"),
        ("kl_div", 256, 128256, "float32"),
        ("kl_div", 256, 128256, "bfloat16"),
        ("paired_loss", 64, 32000, "float32"),
        ("paired_loss", 64, 32000, "bfloat16"),
        ("paired_loss", 128, 128256, "float32"),
        ("paired_loss", 128, 128256, "bfloat16"),
        ("fused_linear", 1024, 128256, "float32"),
    ],
}
OPS = ("kl_div", "paired_loss", "fused_linear")


def min_bytes(op: str, inputs: dict) -> int | None:
    """Bytes a forward + backward must move at least: read every logit of both inputs once,
    write the gradient once. None for fused_linear (its matmuls make it compute-bound)."""
    if op == "fused_linear":
        return None
    cur, ref = inputs["cur"], inputs["ref"]
    return 2 * cur.numel() * cur.element_size() + ref.numel() * ref.element_size()


def run_case(op, n, vocab, dtype_name, device, reps, compile_too, memory_too=True) -> dict:
    inputs = {k: v.to(device) for k, v in make_inputs(op, n, vocab, getattr(torch, dtype_name)).items()}
    loss_seat = run_once(op, "seat", inputs)
    loss_naive = run_once(op, "naive", inputs)
    impls = ("seat", "naive") + (("compiled",) if op in COMPILED and compile_too else ())
    times = time_cases(op, impls, inputs, reps, device)
    t_seat, t_naive, t_compiled = times["seat"], times["naive"], times.get("compiled")
    m_seat = measure_peak(op, "seat", n, vocab, dtype_name, device) if memory_too else None
    m_naive = measure_peak(op, "naive", n, vocab, dtype_name, device) if memory_too else None

    def mib(b):
        return None if b is None else round(b / 2**20, 1)

    moved = min_bytes(op, inputs)
    return dict(op=op, rows=n, vocab=vocab, dtype=dtype_name, seat_ms=round(t_seat * 1e3, 2),
                min_mb=None if moved is None else round(moved / 1e6, 1),
                seat_gbs=None if moved is None else round(moved / t_seat / 1e9, 2),
                naive_ms=round(t_naive * 1e3, 2), speedup=round(t_naive / t_seat, 2),
                compiled_ms=None if t_compiled is None else round(t_compiled * 1e3, 2),
                speedup_vs_compiled=None if t_compiled is None else round(t_compiled / t_seat, 2),
                seat_peak_mib=mib(m_seat), naive_peak_mib=mib(m_naive),
                # no ratio where seat's peak is below what the method resolves (RSS: pages)
                memory_ratio=round(m_naive / m_seat, 2) if m_seat else None,
                input_mib=round(sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20, 1),
                loss_abs_diff=float(abs(loss_seat.double().cpu() - loss_naive.double().cpu())))


def main(argv=None, progress: Progress | None = None) -> int:
    """Run the benchmark (argv: the command line's arguments); progress: see _common.Progress."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small cases (same as --size quick)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--reps", type=int, default=11, help="timed rounds (one call of each implementation)")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="run only these ops")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the memory columns (on CPU they cost a fresh process per measurement)")
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.reps < 1:
        parser.error(f"--reps must be >= 1; got {args.reps}")
    size = args.size or ("quick" if args.quick else "full")
    todo = [c for c in SIZES[size] if not args.ops or c[0] in args.ops]
    if not todo:
        parser.error(f"--ops {' '.join(args.ops)}: no case of size {size} runs these ops")
    progress = progress or Progress()
    progress.expect(len(todo))
    rows = []
    for op, n, vocab, dtype_name in todo:
        row = run_case(op, n, vocab, dtype_name, args.device, args.reps, not args.no_compile, not args.no_memory)
        rows.append(row)
        progress.done(f"{op} {n}x{vocab} {dtype_name}")
        print(json.dumps(row), flush=True)
    env = environment(args.device)
    for row in rows:  # the share of the machine's bandwidth (triad probe) each row reaches
        row["of_probe"] = None if row["min_mb"] is None else round(
            fraction(row["min_mb"] * 1e6, row["seat_ms"], env["bandwidth"]), 2)
    env.update(size=size, reps=args.reps, fused_hidden=FUSED_HIDDEN,
               seat_backend=seat_backend(args.device) or "default (triton)")
    memory_how = ("peak RSS growth of one call beyond its inputs, in a fresh process each (glibc mmap threshold "
                  "64 KiB)" if args.device == "cpu" else
                  "max_memory_allocated during one call minus memory_allocated before it")
    md = write_results(
        "bench_kl_div" if size == "full" else f"bench_kl_div_{size}", rows, env, out_dir=args.out,
        title=f"seat.ops kl_div / paired_loss / fused_linear_paired_loss vs eager torch, {args.device} "
              "(forward + backward)",
        columns=[("op", "op"), ("rows", "rows"), ("vocab", "vocab"), ("dtype", "dtype"), ("seat_ms", "seat ms"),
                 ("naive_ms", "eager ms"), ("speedup", "speed vs eager"), ("compiled_ms", "compiled ms"),
                 ("speedup_vs_compiled", "speed vs compiled"), ("seat_peak_mib", "seat peak MiB"),
                 ("naive_peak_mib", "eager peak MiB"), ("memory_ratio", "memory: eager / seat"),
                 ("input_mib", "inputs MiB"), ("min_mb", "min MB moved"), ("seat_gbs", "seat GB/s"),
                 ("of_probe", "of probe"), ("loss_abs_diff", "loss diff")],
        notes=[f"Time: median of {args.reps} forward + backward calls after {WARMUP_ROUNDS} warm-up rounds, the "
               "implementations timed "
               f"in turn in each round, {env['torch_threads']} torch threads on {env['cpu_count']} CPUs"
               if args.device == "cpu" else
               f"Time: median over {args.reps} rounds of triton.testing.do_bench (median, 100 ms) of forward + "
               "backward, the implementations in turn.",
               "speed vs eager = eager ms / seat ms; speed vs compiled = compiled ms / seat ms (torch.compile of "
               "the same eager code, time only; fused_linear has no compiled column); above 1: seat is faster.",
               "Memory not measured (--no-memory)." if args.no_memory else
               f"Peak = {memory_how}; memory: eager / seat above 1: seat needs less.",
               f"seat backend: {env['seat_backend']}; fused_linear: hidden size {FUSED_HIDDEN}, eager computes "
               "both models' N x V logits.",
               "min MB moved: both inputs read once and the gradient written once (1 MB = 1e6 bytes); seat GB/s = "
               "that / seat's time; of probe = seat GB/s / the triad bandwidth probe (benchmarks/_bandwidth.py) "
               "in the line above.",
               "loss diff: |seat - eager| of the loss, a check that both compute the same thing."],
    )
    print(md.read_text())
    plot(rows, md.with_suffix(".png"))
    return 0


def plot(rows, path):
    """Speed and memory ratios (eager / seat) per case: above 1, seat is ahead."""
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['op']} {r['rows']}x{r['vocab']} {r['dtype']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 1.8))
    a.barh(labels, [r["speedup"] for r in rows], color="tab:blue", label="vs eager")
    compiled = [r["speedup_vs_compiled"] for r in rows]
    if any(c is not None for c in compiled):
        a.scatter([c if c is not None else float("nan") for c in compiled], labels, color="black", zorder=3,
                  label="vs torch.compile")
    a.axvline(1, color="gray", lw=0.8)
    a.set_xscale("log")
    a.set_xlabel("speed: other / seat time (log; > 1: seat faster)")
    a.invert_yaxis()
    a.legend(loc="lower right", fontsize=8)
    b.barh(labels, [r["memory_ratio"] or 0 for r in rows], color="tab:orange")  # 0: not measured
    b.axvline(1, color="gray", lw=0.8)
    b.set_xlabel("memory: eager / seat peak (> 1: seat needs less)")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
