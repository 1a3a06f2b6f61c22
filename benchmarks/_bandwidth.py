"""The memory bandwidth this machine achieves, the yardstick of every memory-bound kernel.

Two probes on buffers far larger than any cache, at each torch thread count the results
use, each the median of a few timed calls after a warm-up:

  copy   dst.copy_(src)                 reads n, writes n bytes    -> 2n / time
  triad  torch.add(b, c, alpha=s, out=a) reads 2n, writes n bytes  -> 3n / time

(the STREAM kernels' byte counts: a write-allocate that also reads the destination is not
counted, as STREAM does not). A kernel row then reports the bytes it must move at least
and the fraction of the triad figure it reaches (`fraction`, the "of probe" columns);
`probe_summary` turns several probes of a run into one (their median).

    python benchmarks/_bandwidth.py [--mib 256] [--threads 1 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, when run as a script

DEFAULT_MIB = 256


def probe(threads: int | None = None, *, device: str = "cpu", mib: int = DEFAULT_MIB, repeats: int = 5) -> dict:
    """{"device", "threads", "mib", "copy_gbs", "triad_gbs"} at `threads` torch threads
    (default: the current count; CPU only), GB/s = 1e9 bytes per second. The thread count
    is restored after."""
    before = torch.get_num_threads()
    threads = threads or before
    n = mib * 2**20 // 4
    a, b, c = (torch.ones(n, device=device) for _ in range(3))
    from _common import measure  # (_common imports this module at its top)

    def seconds(fn):
        return measure(fn, device=device, warmup=1, repeats=repeats, do_bench=False)["ms"] / 1e3

    try:
        torch.set_num_threads(threads)
        copy_s = seconds(lambda: a.copy_(b))
        triad_s = seconds(lambda: torch.add(b, c, alpha=3.0, out=a))
    finally:
        torch.set_num_threads(before)
    nbytes = n * 4
    return {"device": device, "threads": threads, "mib": mib, "copy_gbs": round(2 * nbytes / copy_s / 1e9, 2),
            "triad_gbs": round(3 * nbytes / triad_s / 1e9, 2)}


def probe_summary(results: list[dict]) -> dict:
    """Several probes of one run as one probe result: the median copy and triad figures
    (what `fraction` then divides by), with the triad's range and the probe count. On a
    shared host the figure swings from probe to probe; the median neither flatters a
    kernel (the lowest) nor punishes it (the highest)."""
    triads = sorted(r["triad_gbs"] for r in results)
    copies = sorted(r["copy_gbs"] for r in results)
    return {**results[0], "copy_gbs": statistics.median(copies), "triad_gbs": statistics.median(triads),
            "triad_min_gbs": triads[0], "triad_max_gbs": triads[-1], "probes": len(results)}


def fraction(nbytes: float, ms: float, probe_result: dict) -> float:
    """The share of the probe's triad bandwidth a call moving `nbytes` in `ms` reaches."""
    return nbytes / (ms * 1e-3) / (probe_result["triad_gbs"] * 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--mib", type=int, default=DEFAULT_MIB, help="size of each buffer")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: 1 up to torch's current count)")
    args = parser.parse_args()
    counts = [None] if args.device == "cuda" else args.threads or range(1, torch.get_num_threads() + 1)
    for t in counts:
        print(json.dumps(probe(t, device=args.device, mib=args.mib)))


if __name__ == "__main__":
    main()
