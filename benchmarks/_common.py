"""Shared by the benchmark scripts: timing, machine facts, and writing results
(CSV + JSON + markdown + PNG) under benchmarks/results/<device-name>/.

Every comparison is a ratio measured in the same run: each method is timed with warm-up
and several repeats, and the median is reported (with the 25th/75th percentiles).
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

import _bandwidth

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


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none): other processes
    on the machine slow CPU timings, so every result records them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str, *, bandwidth: bool = True) -> dict:
    """What a result depends on: device, library versions, the commit (and whether the
    working tree had uncommitted changes to tracked files), threads, machine load and
    (bandwidth=True) the memory bandwidth probe at the current thread count."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "triton": _version("triton"), "transformers": _version("transformers"), "python": platform.python_version(),
           "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
           "git_dirty": None if dirty is None else bool(dirty), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_avg": load_average(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
    if bandwidth:
        env["bandwidth"] = _bandwidth.probe(device=device)
    return env


class Progress:
    """What a benchmark reports while it runs: expect(n) when it knows it will run n more
    cases, done(label) after each. This default does nothing (the scripts print their own
    lines); run_all.py passes one that drives its progress bar."""

    def expect(self, n: int) -> None:
        pass

    def done(self, label: str) -> None:
        pass


def measure(fn: Callable[[], None], *, device: str, warmup: int = 2, repeats: int = 7,
            do_bench: bool = True) -> dict:
    """Median and quartiles of fn's wall time in ms. CUDA: triton.testing.do_bench (it
    flushes the L2 cache between calls and picks its repeat count from a time budget), or,
    with do_bench=False, `repeats` calls timed one by one with the device synchronized
    around each: for long calls (a training step), and where do_bench's 256 MiB flush
    buffer would count against a memory budget. CPU: warmup calls, then `repeats` timed
    calls."""
    if device == "cuda" and do_bench:
        from triton.testing import do_bench as bench

        q25, median, q75 = bench(fn, warmup=25 * warmup, rep=100 * repeats, quantiles=[0.25, 0.5, 0.75])
        return {"ms": median, "ms_p25": q25, "ms_p75": q75}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
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


def environment_line(env: dict) -> str:
    """One line naming the machine, versions, commit, date and (CPU) the load."""
    line = (f"{env['device_name']}; torch {env['torch']}, triton {env['triton']}; commit {env['git_commit']}"
            f"{' + uncommitted changes' if env.get('git_dirty') else ''}; {env['date']}")
    if env.get("device") == "cpu" and env.get("load_avg"):
        line += f"; 1-minute load average {env['load_avg'][0]:.1f} on {env.get('cpu_count')} CPUs"
    if env.get("bandwidth"):
        bw = env["bandwidth"]
        line += (f"; bandwidth probe ({bw.get('threads')} threads): copy {bw['copy_gbs']:.1f} GB/s, "
                 f"triad {bw['triad_gbs']:.1f} GB/s")
    return line


def write_results(name: str, rows: list[dict], env: dict, *, title: str, columns: list[tuple[str, str]],
                  notes: list[str], out_dir: Path | None = None) -> Path:
    """rows -> <out>/<name>.csv, .json and .md; returns the markdown path. columns:
    (key, header) pairs for the markdown table, values formatted by type."""
    out = out_dir or RESULTS / slug(env["device_name"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        # every key of every row, in first-seen order: rows may differ (a method that ran
        # out of memory has no timings)
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))

    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = [f"# {title}", "", environment_line(env), "",
             "| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    md = out / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
