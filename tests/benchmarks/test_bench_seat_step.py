"""benchmarks/_memory.py counts exactly what it says, and benchmarks/bench_seat_step.py
runs end to end on a tiny model (the timings themselves are not asserted)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _memory  # noqa: E402
from _memory import PeakMemory, storage_bytes, transient_peak  # noqa: E402


def test_a_known_tensor_shows_up_with_its_exact_size():
    with PeakMemory("cpu") as pm:
        x = torch.empty(1_000_003, dtype=torch.uint8)
        del x
    report = pm.report
    assert report.transient_peak_bytes == 1_000_003
    assert report.end_bytes == 0
    assert report.start_bytes == 0 and report.peak_bytes == 1_000_003


def test_the_peak_follows_the_timeline_of_allocations_and_frees():
    with PeakMemory("cpu") as pm:
        kept = torch.empty(4000, dtype=torch.uint8)
        tmp = torch.empty(250_000, dtype=torch.float32)  # 1,000,000 bytes
        del tmp
        tmp = torch.empty(100_000, dtype=torch.float64)  # 800,000 bytes: less than the first
        del tmp
    assert pm.report.transient_peak_bytes == 4000 + 1_000_000
    assert pm.report.end_bytes == 4000
    assert kept.numel() == 4000


def test_an_op_output_is_counted():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    with PeakMemory("cpu") as pm:
        c = a @ b
    assert pm.report.transient_peak_bytes >= 64 * 16 * 4  # at least the (64, 16) fp32 output
    assert pm.report.end_bytes == 64 * 16 * 4  # and only it stays
    assert c.shape == (64, 16)


def test_phases_and_the_phase_of_the_peak():
    with PeakMemory("cpu") as pm:
        with pm.phase("small"):
            kept = torch.empty(1000, dtype=torch.uint8)
        with pm.phase("large"):
            tmp = torch.empty(5000, dtype=torch.uint8)
            del tmp
        with pm.phase("after"):
            pass
    report = pm.report
    assert report.phases["small"] == 1000
    assert report.phases["large"] == 6000  # the running total: what "small" left + the temporary
    assert report.phases["after"] == 1000
    assert report.peak_phase == "large" and report.transient_peak_bytes == 6000
    assert kept.numel() == 1000


def test_tensors_alive_at_the_start_count_once_per_storage():
    t = torch.zeros(100)  # 400 bytes
    other = torch.zeros(2, dtype=torch.float64)  # 16 bytes
    assert storage_bytes(t) == 400
    assert storage_bytes(t, t[10:], t.view(10, 10), {"a": [t, (t[::2],)]}) == 400  # views: the storage once
    assert storage_bytes([t, other], None, iter([other])) == 416
    assert storage_bytes(t[:5]) == 400  # a view costs its whole storage
    with torch.device("meta"):
        assert storage_bytes(torch.empty(10**9)) == 0
    # torch.compile leaves fake tensors alive, where gc finds them; reading their data
    # pointer raises (this flag is how torch marks them)
    fake = torch.zeros(10**6)
    torch._C._set_throw_on_mutable_data_ptr(fake)
    assert storage_bytes(fake, t) == 400
    lin = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert storage_bytes(_memory.module_tensors(lin)) == (32 + 4) * 4
    state = storage_bytes(_memory.optimizer_tensors(opt))
    assert state == 2 * (32 + 4) * 4 + 2 * 4  # exp_avg, exp_avg_sq, and a float32 step per param
    with PeakMemory("cpu", alive=[_memory.module_tensors(lin), _memory.optimizer_tensors(opt)]) as pm:
        pass
    assert pm.report.start_bytes == (32 + 4) * 4 + state
    assert pm.report.peak_bytes == pm.report.start_bytes


def test_running_sum():
    assert transient_peak([]) == (0, -1, 0)
    assert transient_peak([-5, 3]) == (0, -1, -2)  # frees of older tensors never go below the start
    assert transient_peak([10, -4, 7, -13]) == (13, 2, 0)


@pytest.mark.cuda
def test_a_known_tensor_on_cuda():
    torch.cuda.synchronize()
    with PeakMemory("cuda") as pm:
        x = torch.empty(2**20, dtype=torch.uint8, device="cuda")
        del x
    assert pm.report.transient_peak_bytes == 2**20
    assert pm.report.end_bytes == 0


def test_bench_seat_step_writes_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny shapes: threads only add synchronization
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_seat_step.py"), "--size", "tiny",
                           "--seq", "16", "--steps", "1", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "seat_step_tiny.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert {"naive-seat", "seat", "full-ft", "qseat-nf4"} <= set(rows)
    naive, patched = rows["naive-seat"], rows["seat"]
    assert naive["memory_vs_naive"] == 1.0
    # resident at the start: naive holds two models, dense AdamW state and bool masks
    assert patched["start_bytes"] < naive["start_bytes"]
    for name, r in rows.items():
        assert r["peak_bytes"] == r["start_bytes"] + r["transient_bytes"] > r["start_bytes"]
        assert r["tokens_per_s"] > 0 and r["ms"] > 0
        # before any update every method computes the same CE (and a zero KL); the 4-bit
        # base's CE differs by its quantization error only
        assert r["first_loss"] == pytest.approx(naive["first_loss"], rel=5e-2 if name == "qseat-nf4" else 1e-4)
    # the 4-bit base holds its block linears in about a quarter of a byte per weight
    assert rows["qseat-nf4"]["start_bytes"] < patched["start_bytes"]
    assert rows["qseat-nf4"]["trainable_params"] == patched["trainable_params"]
    assert patched["tokens_per_step"] == 2 * rows["full-ft"]["tokens_per_step"]
    assert patched["trainable_params"] == pytest.approx(0.05 * naive["trainable_params"], rel=0.01)
    md = (tmp_path / "seat_step_tiny.md").read_text()
    assert md.startswith("# One SEAT training step") and data["environment"]["device_name"] in md
    assert "seat / naive SEAT peak memory" in md
    assert data["environment"]["batch_pairs"] == 2 and data["environment"]["seq"] == 16


def test_a_method_out_of_memory_is_a_row_and_the_budget_verdict_follows_the_peak(tmp_path, monkeypatch):
    """What the Llama-3-8B run on a 24 GiB budget relies on: a method that runs out of
    memory gives a row saying so (no numbers, no ratio), the others still run, and each
    row's verdict is its measured peak against the budget."""
    import bench_seat_step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.00 GiB")

    monkeypatch.setitem(bench_seat_step.BUILDERS, "full-ft", out_of_memory)
    budget_gib = 0.002
    threads = torch.get_num_threads()
    try:  # tiny shapes: threads only add synchronization
        rc = bench_seat_step.main(["--size", "tiny", "--seq", "16", "--steps", "1", "--device", "cpu", "--threads", "1",
                                   "--methods", "naive-seat,seat,full-ft", "--budget-gib", str(budget_gib),
                                   "--gradient-checkpointing", "--tag", "oom", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((tmp_path / "seat_step_tiny_oom.json").read_text())
    rows = {r["method"]: r for r in data["rows"]}
    full = rows["full-ft"]
    assert full["oom"] and not full["fits_budget"] and "Tried to allocate" in full["error"]
    assert full["memory_vs_naive"] is None and full.get("ms") is None
    for name in ("naive-seat", "seat"):
        r = rows[name]
        assert not r["oom"] and r["fits_budget"] == (r["peak_bytes"] <= budget_gib * 2**30)
        assert r["step_time_vs_full_ft"] is None  # full FT has no time to compare with
    assert data["environment"]["gradient_checkpointing"] and data["environment"]["budget_gib"] == budget_gib
    md = (tmp_path / "seat_step_tiny_oom.md").read_text()
    assert "full-ft: out of memory" in md and f"fits {budget_gib:g} GiB" in md
    assert "gradient checkpointing" in md.splitlines()[0]
    header = (tmp_path / "seat_step_tiny_oom.csv").read_text().splitlines()[0].split(",")
    assert {"oom", "error", "peak_bytes", "fits_budget"} <= set(header)  # every row's keys
    assert (tmp_path / "seat_step_tiny_oom.png").stat().st_size > 0
