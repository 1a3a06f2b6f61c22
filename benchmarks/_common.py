"""Shared by the benchmark scripts: timing, machine facts, and writing results
(CSV + JSON + markdown + PNG) under benchmarks/results/<device-name>/.

Every comparison is a ratio measured in the same run: each method is timed with warm-up
and several repeats, and the median is reported (with the 25th/75th percentiles).
"""
from __future__ import annotations

import csv
import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """A human name of the device: the GPU's name, or the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device, "device_name": device_name(device), "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(), "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def measure(fn: Callable[[], None], *, device: str, warmup: int = 2, repeats: int = 7) -> dict:
    """Median and quartiles of fn's wall time in ms (CUDA: triton.testing.do_bench)."""
    if device == "cuda":
        from triton.testing import do_bench

        q25, median, q75 = do_bench(fn, warmup=25 * warmup, rep=100 * repeats, quantiles=[0.25, 0.5, 0.75])
        return {"ms": median, "ms_p25": q25, "ms_p75": q75}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"ms": statistics.median(times), "ms_p25": q[0], "ms_p75": q[2]}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    return plt


def write_results(name: str, rows: list[dict], env: dict, *, title: str, columns: list[tuple[str, str]],
                  notes: list[str], out_dir: Path | None = None) -> Path:
    """rows -> <out>/<name>.csv, .json and .md; returns the markdown path. columns:
    (key, header) pairs for the markdown table, values formatted by type."""
    out = out_dir or RESULTS / slug(env["device_name"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = [f"# {title}", "", f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}; "
             f"commit {env['git_commit']}; {env['date']}", "",
             "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
