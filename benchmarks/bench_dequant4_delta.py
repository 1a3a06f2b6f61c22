"""QSEAT's effective weight: seat.ops.dequant4_delta vs bitsandbytes.

    python benchmarks/bench_dequant4_delta.py [--quick] [--device cpu|cuda] [--repeats N]
                                              [--out DIR (default: benchmarks/results/<device>)]

For a bitsandbytes nf4 weight (double-quantized, as Linear4bit stores it) of the Llama-3-8B
shapes 4096x4096 and 4096x14336 (--quick: 512x512 and 512x1792), bf16 output, times:
  bnb dequantize_4bit           bitsandbytes alone (no delta): the floor of any 4-bit forward
  reference                     what the issue defines the op as: bnb's dequantize_4bit, then
                                index_add_ of a d=0.05 delta at the mask's int32 indices
  seat int32 / seat implicit    seat.ops.dequant4_delta (one fused pass) with the same delta
                                in an int32 or implicit (hash) mask of density 0.05
Ratios are measured in the same run: vs bnb = bnb time / time, vs reference = reference
time / time (> 1: faster). Every seat result is checked bit for bit against the reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, environment, measure, write_results  # noqa: E402

from seat import ops  # noqa: E402
from seat.masks import ImplicitMask  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336))
DENSITY = 0.05


def bench_shape(shape, device, repeats, progress):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=g).mul_(0.02).to(torch.bfloat16).to(device)
    packed, qs = F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    del weight
    numel = qs.shape.numel()
    implicit = ImplicitMask(numel, DENSITY, seed=0, param_id=1, device=device)
    idx = implicit.indices()
    delta = torch.randn(idx.numel(), generator=g).mul_(1e-3).to(torch.bfloat16).to(device)
    long_idx = idx.long()

    def reference():
        out = F.dequantize_4bit(packed, qs).to(torch.bfloat16)
        out.view(-1).index_add_(0, long_idx, delta)
        return out

    expected = reference()
    methods = [("bnb dequantize_4bit", lambda: F.dequantize_4bit(packed, qs)), ("reference", reference),
               ("seat int32", lambda: ops.dequant4_delta(packed, qs, idx, delta, dtype=torch.bfloat16)),
               ("seat implicit", lambda: ops.dequant4_delta(packed, qs, implicit, delta, dtype=torch.bfloat16))]
    rows = []
    for name, fn in methods:
        if name.startswith("seat"):
            assert torch.equal(fn(), expected), f"{name} differs from the reference"
        row = {"shape": f"{shape[0]}x{shape[1]}", "method": name, "nnz": idx.numel(), **measure(fn, device=device,
                                                                                              repeats=repeats)}
        # bytes: packed weight read + bf16 weight written (+ the delta and its index where used)
        row["out_gbs"] = numel * 2.5 / (row["ms"] * 1e6)
        rows.append(row)
        progress.done(f"{row['shape']} {name}")
        print(f"{row['shape']:>11s} {name:22s} {row['ms']:9.2f} ms")
    bnb_ms = rows[0]["ms"]
    ref_ms = rows[1]["ms"]
    for row in rows:
        row["vs_bnb"] = bnb_ms / row["ms"]
        row["vs_reference"] = ref_ms / row["ms"]
    return rows


def main(argv=None, progress: Progress | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shapes divided by 8")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>)")
    args = parser.parse_args(argv)
    progress = progress or Progress()
    shapes = [(o // 8, i // 8) for o, i in SHAPES] if args.quick else list(SHAPES)
    progress.expect(4 * len(shapes))
    env = environment(args.device)
    rows = [r for shape in shapes for r in bench_shape(shape, args.device, args.repeats, progress)]
    name = "dequant4_delta_quick" if args.quick else "dequant4_delta"
    md = write_results(
        name, rows, env, title="dequant4_delta: a 4-bit weight + a sparse delta (nf4, nested, bf16, d=0.05)",
        columns=[("shape", "shape"), ("method", "method"), ("ms", "ms"), ("ms_p25", "p25"), ("ms_p75", "p75"),
                 ("vs_bnb", "vs bnb"), ("vs_reference", "vs reference"), ("out_gbs", "GB/s")],
        notes=["vs bnb = bnb dequantize_4bit time / time; vs reference = (bnb dequantize_4bit + index_add_) time "
               "/ time: > 1 is faster. Every seat row equals the reference bit for bit (checked).",
               "GB/s: the packed weight read (0.5 B per element) + the bf16 weight written (2 B), over the time.",
               "CPU timings depend on the machine's load: the load average is in the line above."],
        out_dir=args.out)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
