"""SparseAdamW vs dense optimizers on the linear layers of a Llama-3-8B block.

    python benchmarks/bench_sparse_adamw.py [--quick | --scale K] [--device cpu|cuda] [--repeats N]

Times one optimizer update (what runs between backward and the next forward) and counts
the optimizer's bytes per parameter, for:
  adamw-foreach / adamw-fused   torch.optim.AdamW on dense fp32 params
  adamw8bit                     bitsandbytes AdamW8bit (dense, 8-bit state), if installed
  naive-seat(-fused)            dense AdamW (foreach / fused) with the gradient multiplied
                                by a bool mask (the straightforward SEAT optimizer)
  seat d=...                    seat.optim.SparseAdamW: compaction of the dense gradient
                                (the backward hook's work) + the compact step, fp32 params
  seat-reference d=0.05         the same with SEAT_BACKEND=reference (torch ops)
  lean: ... d=0.05              SparseAdamW's lean modes against its default, in the
                                same run: bf16 compact gradient, update in backward (the
                                hook's gather + per-param step), 8-bit state, all three;
                                with the peak bytes of the update (optimizer tensors alive
                                at its start + its transient allocations, benchmarks/_memory.py)
Ratios are against naive-seat, measured in the same run. --quick uses a block with every
dimension divided by 4 (--scale K: by K).
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bandwidth import fraction, probe, probe_summary  # noqa: E402
from _common import Progress, environment, measure, pyplot, write_results  # noqa: E402
from _memory import measure_peak, optimizer_tensors  # noqa: E402

from seat import ops  # noqa: E402
from seat.masks import ImplicitMask, encode, random_mask  # noqa: E402
from seat.optim import SparseAdamW  # noqa: E402

# (name, out_features, in_features) of a Llama-3-8B decoder block's linear layers
LLAMA3_8B_BLOCK = [("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
                   ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)]
DENSITIES = (0.5, 0.1, 0.05, 0.01)
ENCODINGS = ("block16", "implicit")  # besides int32, at d=0.05


def make_params(shapes, device):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(o, i, generator=g).mul_(0.02).to(device)) for _, o, i in shapes]
    grads = [torch.randn(p.shape, generator=g).mul_(1e-3).to(device) for p in params]
    return params, grads


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def bench_dense(label, make_opt, params, grads, device, repeats, mask=None):
    for p, g in zip(params, grads):
        p.grad = g
    opt = make_opt(params)

    def update():
        if mask is not None:
            for p, m in zip(params, mask):
                p.grad.mul_(m)
        opt.step()

    timing = measure(update, device=device, repeats=repeats)
    extra = sum(m.numel() * m.element_size() for m in mask) if mask is not None else 0
    row = {"method": label, "density": 1.0, **timing, "state_bytes": state_bytes(opt) + extra}
    del opt
    for p in params:
        p.grad = None
    return row


def seat_masks(params, density, device, encoding="int32"):
    """One mask per param: random int32 indices, as a Block16Mask, or an ImplicitMask."""
    if encoding == "implicit":
        return [ImplicitMask(p, density, seed=0, param_id=i, device=device) for i, p in enumerate(params)]
    masks = [random_mask(p, density, seed=i).to(device) for i, p in enumerate(params)]
    return masks if encoding == "int32" else [encode(m, p.numel(), encoding) for m, p in zip(masks, params)]


def moved_bytes(params, masks) -> int:
    """What a seat update must move at least, counted in 64-byte lines where it touches
    scattered entries: the dense gradient's lines holding a trained entry (read), the
    parameter's same lines (read + write), and per entry the int32 index, the compact
    gradient (write, then read) and both fp32 moments (read + write)."""
    total = 0
    for p, m in zip(params, masks):
        idx = (m if isinstance(m, torch.Tensor) else m.indices()).long().cpu()
        lines = torch.unique(idx // (64 // p.element_size())).numel()
        total += lines * 64 * 3 + idx.numel() * (4 + 8 + 16)
    return total


def bench_seat(label, params, grads, density, device, repeats, backend=None, encoding="int32"):
    masks = seat_masks(params, density, device, encoding)
    opt = SparseAdamW(params, masks, lr=1e-4)

    def update():
        for p, g in zip(params, grads):
            p.grad = g
            opt.compact_(p)
        opt.step()
        opt.zero_grad()

    with ops.use_backend(backend):
        timing = measure(update, device=device, repeats=repeats)
    row = {"method": label, "density": density, **timing, "state_bytes": opt.state_bytes(),
           "moved_bytes": moved_bytes(params, masks)}
    opt.remove_hooks()
    return row


LEAN_MODES = {
    "default": {},
    "bf16 grad": dict(grad_dtype=torch.bfloat16),
    "update in backward": dict(update_in_backward=True),
    "8-bit state": dict(state_bits=8),
    "all three": dict(grad_dtype=torch.bfloat16, update_in_backward=True, state_bits=8),
}


def bench_lean(label, params, grads, density, device, repeats, options):
    """One SparseAdamW mode: the update (compaction or the in-backward hook's work, then
    step) timed, and its peak bytes measured once."""
    masks = [random_mask(p, density, seed=i).to(device) for i, p in enumerate(params)]
    opt = SparseAdamW(params, masks, lr=1e-4, **options)
    in_backward = options.get("update_in_backward", False)

    def update():
        for p, g in zip(params, grads):
            p.grad = g
            if in_backward:
                opt._update_in_backward_(p)  # what its post-accumulate-grad hook runs
            else:
                opt.compact_(p)
        opt.step()
        opt.zero_grad()

    timing = measure(update, device=device, repeats=repeats)
    memory = measure_peak(lambda _: update(), device=device, alive=[optimizer_tensors(opt)])
    row = {"method": label, "density": density, **timing, "state_bytes": opt.state_bytes(),
           "peak_bytes": memory.peak_bytes, "transient_bytes": memory.transient_peak_bytes}
    opt.remove_hooks()
    return row


def main(argv=None, progress: Progress | None = None) -> int:
    """Run the benchmark (argv: the command line's arguments); progress: see _common.Progress."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a block with every dimension / 4")
    parser.add_argument("--scale", type=int, default=None, help="divide every dimension by this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    parser.add_argument("--lean-only", action="store_true",
                        help="only the lean-mode rows (written as sparse_adamw_lean[_scaleK])")
    args = parser.parse_args(argv)
    scale = args.scale or (4 if args.quick else 1)
    shapes = [(n, o // scale, i // scale) for n, o, i in LLAMA3_8B_BLOCK]
    params, grads = make_params(shapes, args.device)
    n_params = sum(p.numel() for p in params)
    print(f"{len(params)} linear layers, {n_params / 1e6:.1f}M parameters (fp32), device {args.device}")

    rows = []
    progress = progress or Progress()

    def run(row):
        row["bytes_per_param"] = row["state_bytes"] / n_params
        rows.append(row)
        print(f"  {row['method']:24s} {row['ms']:10.2f} ms  {row['bytes_per_param']:6.2f} B/param", flush=True)
        progress.done(row["method"])
        gc.collect()

    if args.lean_only:
        progress.expect(len(LEAN_MODES))
        return lean_main(args, params, grads, shapes, n_params, scale, run, rows)

    def adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=1e-4, **kw)

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
        print("  bitsandbytes not installed: AdamW8bit skipped")
    progress.expect(4 + (bnb is not None) + len(DENSITIES) + len(ENCODINGS) + 1 + len(LEAN_MODES))
    run(bench_dense("adamw-foreach", adamw(foreach=True), params, grads, args.device, args.repeats))
    run(bench_dense("adamw-fused", adamw(fused=True), params, grads, args.device, args.repeats))
    if bnb is not None:
        run(bench_dense("adamw8bit (bitsandbytes)", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4), params, grads,
                        args.device, args.repeats))
    bool_masks = [torch.zeros(p.shape, dtype=torch.bool, device=args.device).view(-1)
                  .index_fill_(0, random_mask(p, 0.05, seed=i).to(args.device).long(), True).view(p.shape)
                  for i, p in enumerate(params)]
    run(bench_dense("naive-seat d=0.05", adamw(foreach=True), params, grads, args.device, args.repeats,
                    mask=bool_masks))
    run(bench_dense("naive-seat-fused d=0.05", adamw(fused=True), params, grads, args.device, args.repeats,
                    mask=bool_masks))
    del bool_masks
    # The bandwidth probe right before the first seat row and after each one: a shared
    # host's bandwidth swings between runs (and within one), so every seat row is
    # bracketed by two probes, and "of probe" uses the median of all of them.
    probes = [probe(device=args.device)]

    def seat_row(row):
        probes.append(probe(device=args.device))
        row["probes_gbs"] = f"{probes[-2]['triad_gbs']:.0f} / {probes[-1]['triad_gbs']:.0f}"
        run(row)

    for density in DENSITIES:
        seat_row(bench_seat(f"seat d={density}", params, grads, density, args.device, args.repeats))
    for encoding in ENCODINGS:
        seat_row(bench_seat(f"seat d=0.05 {encoding}", params, grads, 0.05, args.device, args.repeats,
                            encoding=encoding))
    seat_row(bench_seat("seat-reference d=0.05", params, grads, 0.05, args.device, args.repeats,
                        backend="reference"))
    for mode, options in LEAN_MODES.items():
        run(bench_lean(f"lean: {mode} d=0.05", params, grads, 0.05, args.device, args.repeats, options))

    for key in ("peak_bytes", "transient_bytes", "moved_bytes", "probes_gbs"):  # one CSV header for every row
        for r in rows:
            r.setdefault(key, None)
    naive = next(r for r in rows if r["method"].startswith("naive-seat d="))
    fused = next(r for r in rows if r["method"] == "adamw-fused")
    int32 = next(r for r in rows if r["method"] == "seat d=0.05")
    env = environment(args.device, bandwidth=False)
    env["bandwidth"] = probe_summary(probes)
    for r in rows:
        r["speedup_vs_naive"] = naive["ms"] / r["ms"]
        r["memory_vs_naive"] = r["state_bytes"] / naive["state_bytes"]
        r["time_vs_fused"] = r["ms"] / fused["ms"]
        r["time_vs_int32"] = r["ms"] / int32["ms"] if r["method"].startswith("seat d=0.05") else None
        moved = r["moved_bytes"]
        r["moved_MB"] = None if moved is None else moved / 1e6
        r["of_probe"] = None if moved is None else fraction(moved, r["ms"], env["bandwidth"])
    env.update(shapes=shapes, n_params=n_params, scale=scale)
    name = "sparse_adamw" if scale == 1 else f"sparse_adamw_scale{scale}"
    md = write_results(
        name, rows, env, out_dir=args.out,
        title=f"Optimizer update on a Llama-3-8B block's linear layers{f' (dims / {scale})' if scale > 1 else ''}: "
              f"{n_params / 1e6:.0f}M fp32 params",
        columns=[("method", "method"), ("density", "density"), ("ms", "update ms (median)"),
                 ("speedup_vs_naive", "speed vs naive SEAT"), ("bytes_per_param", "optimizer B/param"),
                 ("memory_vs_naive", "memory vs naive SEAT"), ("time_vs_fused", "time / adamw-fused"),
                 ("time_vs_int32", "time / int32 mask"), ("moved_MB", "min MB moved"), ("of_probe", "of probe"),
                 ("probes_gbs", "probes before / after (GB/s)"), ("peak_bytes", "update peak bytes")],
        notes=["update = what runs between backward and the next forward: for seat, compacting each dense "
               "gradient (the backward hook) and the compact AdamW step; for naive SEAT, multiplying each "
               "gradient by its bool mask and a dense AdamW step.",
               "naive SEAT (the ratio columns) uses torch's default AdamW implementation (foreach); "
               "naive-seat-fused is the same with the fused CPU/CUDA AdamW.",
               "optimizer B/param: optimizer-held bytes (state, masks, compact gradients) per parameter of the "
               "block; dense gradients and the params themselves are not counted.",
               f"{args.repeats} timed repeats after 2 warm-up runs; median.",
               "seat d=0.05 block16 / implicit: the same update with the masks as Block16Mask / ImplicitMask "
               "(time / int32 mask: against the int32 row of this run).",
               "min MB moved (seat rows): the dense gradient's and the parameter's 64-byte lines that hold a "
               "trained entry (read; read + write) and per entry the int32 index, the compact gradient (written, "
               "read) and both moments (read + written); of probe = that / the time / the median triad bandwidth "
               f"of the {len(probes)} probes taken right before the first seat row and after each seat row "
               f"(triad {env['bandwidth']['triad_min_gbs']:.1f} to {env['bandwidth']['triad_max_gbs']:.1f} GB/s "
               f"in this run, median {env['bandwidth']['triad_gbs']:.1f}: the line above); the probes around each "
               "row are in its own column.",
               LEAN_NOTE],
    )
    print(md.read_text())
    plot(rows, md.with_suffix(".png"))
    return 0


LEAN_NOTE = ("lean rows: SparseAdamW modes at d=0.05 (grad_dtype=bf16; update_in_backward: the hook's gather "
             "into a transient and the per-param step, step() only closes the step; state_bits=8: bitsandbytes "
             "blockwise 8-bit moments, dequantized per chunk to transient fp32). update peak bytes: optimizer "
             "tensors alive at the update's start + the largest transient allocation during it (CPU: torch "
             "profiler allocator events; CUDA: max_memory_allocated); dense gradients are preallocated and not "
             "counted.")


def lean_main(args, params, grads, shapes, n_params, scale, run, rows) -> int:
    """The lean-mode rows alone, each against the default mode of the same run."""
    for mode, options in LEAN_MODES.items():
        run(bench_lean(mode, params, grads, 0.05, args.device, args.repeats, options))
    default = rows[0]
    for r in rows:
        r["time_vs_default"] = r["ms"] / default["ms"]
        r["state_vs_default"] = r["state_bytes"] / default["state_bytes"]
        r["peak_vs_default"] = r["peak_bytes"] / default["peak_bytes"]
        r["state_MiB"] = r["state_bytes"] / 2**20
        r["peak_MiB"] = r["peak_bytes"] / 2**20
    env = environment(args.device)
    env.update(shapes=shapes, n_params=n_params, scale=scale)
    name = "sparse_adamw_lean" if scale == 1 else f"sparse_adamw_lean_scale{scale}"
    md = write_results(
        name, rows, env, out_dir=args.out,
        title=f"SparseAdamW lean modes, d=0.05, on a Llama-3-8B block's linear layers"
              f"{f' (dims / {scale})' if scale > 1 else ''}: {n_params / 1e6:.0f}M fp32 params",
        columns=[("method", "mode"), ("ms", "update ms (median)"), ("time_vs_default", "time vs default"),
                 ("state_MiB", "optimizer MiB"), ("bytes_per_param", "optimizer B/param"),
                 ("state_vs_default", "state vs default"), ("peak_MiB", "update peak MiB"),
                 ("peak_vs_default", "peak vs default")],
        notes=["update = compacting each dense gradient (the backward hook's work) and the step; with "
               "update_in_backward the hook's gather into a transient compact gradient and the param's step, "
               "then step(), which only closes the step.",
               "optimizer bytes: SparseAdamW.state_bytes(): masks (int32), moments, persistent compact gradients.",
               LEAN_NOTE, f"{args.repeats} timed repeats after 2 warm-up runs; median."],
    )
    print(md.read_text())
    return 0


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["method"] for r in rows]
    a.barh(labels, [r["ms"] for r in rows], color="tab:blue")
    a.set_xscale("log")
    a.set_xlabel("update time, ms (log)")
    a.invert_yaxis()
    b.barh(labels, [r["bytes_per_param"] for r in rows], color="tab:orange")
    b.set_xlabel("optimizer bytes per parameter")
    b.invert_yaxis()
    b.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
