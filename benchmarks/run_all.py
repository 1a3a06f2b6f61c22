"""Run every benchmark and collect the results in one folder, with a combined summary.

    python benchmarks/run_all.py [--quick | --size tiny|quick|full] [--device cpu|cuda]
                                 [--only NAME ...] [--out DIR] [--verbose] [--note TEXT]

Each benchmark is a script in this folder with a `main(argv, progress)`; this imports
it and calls it with the arguments of the chosen size (BENCHMARKS below), one after the
other in this process. Each writes its CSV, JSON (rows + environment: device, torch /
triton / transformers versions, git commit, threads, load average), markdown table and
PNG into the results folder, default benchmarks/results/<device name>/ for the full size
and benchmarks/results/<device name>/<size>/ otherwise (so a quick run never overwrites
full results). Every ratio in a table is against that table's baseline, measured in the
same run (warm-up, repeats, median: _common.measure).

This adds summary.md (every table, which run failed and why), summary.json and
summary.csv, one <name>.log per benchmark (its output), and prints the summary. A
progress bar counts the cases of all benchmarks (plain lines when stdout is not a
terminal). A benchmark that fails is reported and the others still run; the exit status
is then 1.

Sizes: tiny (the pipeline on the smallest shapes, seconds: numbers mean nothing), quick
(small shapes: a few minutes on a 2-core CPU), full (the shapes the README reports; on a
GPU also the Llama-3-8B-shaped step).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import importlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from _common import RESULTS, Progress, device_name, environment, environment_line, load_average, slug  # noqa: E402

SIZES = ("tiny", "quick", "full")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """name: what --only selects; module: the script (benchmarks/<module>.py); args: its
    arguments per size (a size it lacks is not run); devices: where it can run."""

    name: str
    module: str
    args: dict[str, tuple[str, ...]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    about: str = ""

    def argv(self, size: str, device: str, out: Path) -> list[str]:
        return [*self.args[size], "--device", device, "--out", str(out)]


# Llama-3-8B shapes, random weights, bf16, gradient checkpointing: one pair of sequences.
_LLAMA3_8B = ("--size", "llama3-8b", "--dtype", "bfloat16", "--batch", "1", "--gradient-checkpointing", "--steps", "3")

BENCHMARKS = [
    Benchmark("sparse_adamw", "bench_sparse_adamw",
              {"tiny": ("--scale", "64", "--repeats", "1"), "quick": ("--quick",), "full": ()},
              about="optimizer update on a Llama-3-8B block's linear layers: SparseAdamW vs dense / naive SEAT"),
    Benchmark("kl_div", "bench_kl_div",
              {"tiny": ("--size", "tiny", "--reps", "1", "--no-compile", "--no-memory"), "quick": ("--quick",),
               "full": ()},
              about="fused loss ops (kl_div, paired_loss, fused_linear_paired_loss) vs eager torch / torch.compile"),
    Benchmark("dequant4_delta", "bench_dequant4_delta",
              {"tiny": ("--quick", "--repeats", "1"), "quick": ("--quick",), "full": ()},
              about="QSEAT's effective weight: 4-bit dequantize + sparse delta vs bitsandbytes (+ index_add)"),
    Benchmark("data_parallel", "bench_data_parallel",
              {"tiny": ("--quick", "--steps", "1"), "quick": ("--quick",), "full": ()}, devices=("cpu",),
              about="SEAT on 1, 2, 4 processes (gloo): compact-gradient data parallelism vs DDP, time and bytes"),
    Benchmark("seat_step", "bench_seat_step",
              {"tiny": ("--size", "tiny", "--seq", "16", "--steps", "1"), "quick": ("--quick",), "full": ()},
              about="one training step: seat.patch vs naive SEAT, full fine-tuning, LoRA (time, peak memory)"),
    # On a GPU only. Does it fit a 24 GB-class card: the budget is enforced on the
    # allocator, so naive SEAT (two models) and full fine-tuning run out of memory.
    Benchmark("seat_step_llama3_8b_24gib", "bench_seat_step",
              {"full": (*_LLAMA3_8B, "--seq", "1024", "--budget-gib", "24",
                        "--methods", "naive-seat,seat,full-ft,lora-r8", "--tag", "seq1024_24gib")},
              devices=("cuda",), about="Llama-3-8B shapes, seq 1024, within 24 GiB: which methods fit"),
    # The whole GPU: seat's step time against full fine-tuning where that fits.
    Benchmark("seat_step_llama3_8b_seq512", "bench_seat_step",
              {"full": (*_LLAMA3_8B, "--seq", "512", "--methods", "seat,full-ft,lora-r8", "--tag", "seq512")},
              devices=("cuda",), about="Llama-3-8B shapes, seq 512, the whole GPU: seat vs full fine-tuning"),
]


# ---------------------------------------------------------------------- progress
class Bar(Progress):
    """Counts the cases of every benchmark: a tqdm bar when `stream` is a terminal (and
    tqdm is installed), else one plain line per case."""

    def __init__(self, stream, n_benchmarks: int, plain: bool = False):
        self.stream, self.n = stream, n_benchmarks
        self.index, self.name, self.count, self.total = 0, "", 0, 0
        self.start = time.perf_counter()
        self.bar = None
        if not plain and getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=0, file=stream, unit="case", dynamic_ncols=True)
            except ImportError:
                pass

    def benchmark(self, index: int, name: str) -> None:
        self.index, self.name = index, name
        if self.bar is not None:
            self.bar.set_description(f"[{index}/{self.n}] {name}")
        else:
            self.line(f"[{index}/{self.n}] {name}: started")

    def expect(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def done(self, label: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:40])
            self.bar.update(1)
        else:
            self.line(f"[{self.index}/{self.n}] {self.name}: {label} ({self.count}/{self.total} cases)")

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(f"{time.perf_counter() - self.start:7.1f} s  {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Tee(io.TextIOBase):
    """Writes to several streams (--verbose: a benchmark's output to its log and stdout)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


# ---------------------------------------------------------------------- running
def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def run_one(bench: Benchmark, size: str, device: str, out: Path, bar: Bar, echo=None) -> dict:
    """Import and run one benchmark with its output in <out>/<name>.log; never raises
    (but KeyboardInterrupt): a failure is a result with its error."""
    argv = bench.argv(size, device, out)
    log_path = out / f"{bench.name}.log"
    before = _files(out)
    start = time.perf_counter()
    status, error = "ok", None
    with open(log_path, "w") as log:
        stream = _Tee(log, echo) if echo is not None else log
        print(f"$ {bench.module}.py {' '.join(argv)}", file=log, flush=True)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                module = importlib.import_module(bench.module)
                rc = module.main(argv, progress=bar)
            if rc not in (0, None):
                status, error = "failed", f"main returned {rc}"
        except SystemExit as exc:  # argparse errors, sys.exit in the script
            if exc.code not in (0, None):
                status, error = "failed", f"exited with status {exc.code}"
        except Exception as exc:  # noqa: BLE001 - one benchmark's failure must not hide the others
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            print(traceback.format_exc(), file=log)
    seconds = time.perf_counter() - start
    written = sorted(p.name for p, t in _files(out).items() if before.get(p) != t and p != log_path)
    if status == "failed":
        tail = log_path.read_text().splitlines()[-15:]
        error = error + "\n" + "\n".join(tail)
    gc.collect()  # what the benchmark built, before the next one's memory is measured
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"name": bench.name, "status": status, "seconds": round(seconds, 1), "argv": argv, "files": written,
            "log": log_path.name, "error": error, "load_avg_after": load_average()}


# ---------------------------------------------------------------------- summary
def _table(md_text: str) -> list[str]:
    """The first markdown table (its lines) of a results file."""
    lines, started = [], False
    for line in md_text.splitlines():
        if line.startswith("|"):
            lines.append(line)
            started = True
        elif started:
            break
    return lines


def noise_note(env: dict, load_before, load_after) -> str | None:
    """On CPU: whether other processes shared the cores (the 1-minute load average above
    what this run's own threads account for), which slows timings but not memory."""
    if env["device"] != "cpu" or not load_before or not load_after:
        return None
    peak = max(load_before[0], load_after[0])
    shared = load_before[0] > 0.5 or peak > env["torch_threads"] + 0.5
    return (f"CPU timings: 1-minute load average {load_before[0]:.1f} before the run, {load_after[0]:.1f} after, on "
            f"{env['cpu_count']} CPUs with {env['torch_threads']} torch threads"
            + (": other processes shared the CPUs, so the times (and time ratios) are noisy; the memory figures are "
               "not affected." if shared else ": the machine was otherwise idle."))


def write_summary(out: Path, env: dict, results: list[dict], skipped: list[tuple[str, str]],
                  notes: list[str]) -> Path:
    """summary.md (every benchmark's table, failures with their error), .json and .csv."""
    lines = [f"# Benchmarks ({env['size']}), {env['device_name']}", "", environment_line(env), "",
             "Every ratio is against its table's baseline (naive SEAT, or eager torch), measured in the same run: "
             "warm-up, then the median of several repeats.", ""]
    lines += [f"- {n}" for n in notes if n] + ([""] if any(notes) else [])
    lines += ["| benchmark | status | seconds | results |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | "
                     f"{', '.join(f for f in r['files'] if f.endswith(('.md', '.png')))} |")
    lines += [f"| {name} | skipped | | {why} |" for name, why in skipped]
    for r in results:
        lines += ["", f"## {r['name']}", ""]
        if r["status"] != "ok":
            lines += [f"**FAILED**: see {r['log']}", "", "```", r["error"], "```"]
            continue
        for md in (f for f in r["files"] if f.endswith(".md")):
            text = (out / md).read_text()
            title = text.splitlines()[0].lstrip("# ").strip() if text else md
            lines += [f"{title} ({md})", "", *_table(text), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    (out / "summary.json").write_text(json.dumps({"environment": env, "notes": notes, "benchmarks": results,
                                                  "skipped": [dict(name=n, why=w) for n, w in skipped]}, indent=1))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "status", "seconds", "files", "error"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "files": " ".join(r["files"])} for r in results)
    return path


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (same as --size quick)")
    parser.add_argument("--size", choices=SIZES, default=None, help="default: full (quick with --quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these: " + ", ".join(b.name for b in BENCHMARKS))
    parser.add_argument("--out", type=Path, help="results folder (default: results/<device name>[/<size>])")
    parser.add_argument("--verbose", action="store_true", help="also print every benchmark's output (no bar)")
    parser.add_argument("--note", action="append", default=[], help="a line to add to the summary (repeatable)")
    args = parser.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        parser.error(f"--quick and --size {args.size} contradict each other")
    size = args.size or ("quick" if args.quick else "full")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    known = {b.name for b in BENCHMARKS}
    if args.only and (unknown := sorted(set(args.only) - known)):
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen, skipped = [], []
    for b in BENCHMARKS:
        if args.only and b.name not in args.only:
            continue
        why = (f"runs on {' / '.join(b.devices)} only" if args.device not in b.devices else
               f"has no {size} size (sizes: {', '.join(b.args)})" if size not in b.args else None)
        if why and args.only:
            parser.error(f"--only {b.name}: it {why}")
        if why:
            skipped.append((b.name, why))
        else:
            chosen.append(b)

    out = args.out or (RESULTS / slug(device_name(args.device)) / ("" if size == "full" else size))
    out.mkdir(parents=True, exist_ok=True)
    stdout = sys.stdout
    load_before = load_average()
    bar = Bar(stdout, len(chosen), plain=args.verbose)
    results = []
    try:
        for i, bench in enumerate(chosen, 1):
            bar.benchmark(i, bench.name)
            result = run_one(bench, size, args.device, out, bar, echo=stdout if args.verbose else None)
            results.append(result)
            first = (result["error"] or "").splitlines()[:1]
            bar.line(f"[{i}/{len(chosen)}] {bench.name}: {result['status']} in {result['seconds']:.0f} s"
                     + (f": {first[0]}" if first else ""))
    finally:
        bar.close()
    env = environment(args.device)
    env.update(size=size, load_avg_before=load_before, load_avg_after=load_average(),
               seat_backend_env=os.environ.get("SEAT_BACKEND"), triton_interpret=os.environ.get("TRITON_INTERPRET"),
               run_all_argv=sys.argv[1:] if argv is None else list(argv))
    notes = [noise_note(env, load_before, env["load_avg_after"]), *args.note]
    summary = write_summary(out, env, results, skipped, notes)
    print(summary.read_text())
    failed = [r["name"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"FAILED: {', '.join(failed)} (logs in {out})", file=sys.stderr)
        return 1
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
