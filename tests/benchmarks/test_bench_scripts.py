"""The benchmark scripts run end to end and write their results (tiny shapes; the
numbers themselves are not asserted: speed is measured in benchmarks, not tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bench_sparse_adamw_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sparse_adamw.py"), "--scale", "64",
                           "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "sparse_adamw_scale64.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"adamw-foreach", "naive-seat d=0.05", "seat d=0.05", "seat-reference d=0.05"} <= methods
    seat = next(r for r in data["rows"] if r["method"] == "seat d=0.05")
    assert abs(seat["bytes_per_param"] - 0.05 * 16) < 0.01  # idx, exp_avg, exp_avg_sq, grad: 4 B each
    assert (tmp_path / "sparse_adamw_scale64.md").read_text().startswith("# Optimizer update")
    assert data["environment"]["device_name"]
    probe = data["environment"]["bandwidth"]  # the bandwidth probe beside every result
    assert probe["copy_gbs"] > 0 and probe["triad_gbs"] > 0
    # one probe before the seat rows and one after each: "of probe" divides by their median
    seat_rows = [r for r in data["rows"] if r["method"].startswith(("seat d=", "seat-reference"))]
    assert probe["probes"] == len(seat_rows) + 1 and all(r["probes_gbs"] for r in seat_rows)
    assert probe["triad_min_gbs"] <= probe["triad_gbs"] <= probe["triad_max_gbs"]
    for encoding in ("block16", "implicit"):
        row = next(r for r in data["rows"] if r["method"] == f"seat d=0.05 {encoding}")
        assert row["time_vs_int32"] > 0 and 0 < row["of_probe"]
    # lines of 16 fp32 entries, 3 x 64 B per line touched, 28 B per entry: between all
    # entries in distinct lines and all in as few lines as possible
    nnz = seat["state_bytes"] / 16
    assert nnz * 28 + nnz / 16 * 192 <= seat["moved_bytes"] <= nnz * (28 + 192)
    lean = {r["method"]: r for r in data["rows"] if r["method"].startswith("lean: ")}
    assert len(lean) == 5
    # per trained entry: idx 4 + bf16 grad 2 + moments 8 / no grad / 8-bit moments ~2.03
    default = lean["lean: default d=0.05"]["state_bytes"]
    assert lean["lean: bf16 grad d=0.05"]["state_bytes"] == default * 14 // 16
    assert lean["lean: update in backward d=0.05"]["state_bytes"] == default * 12 // 16
    assert lean["lean: all three d=0.05"]["state_bytes"] < default * 6.1 / 16
    assert all(r["peak_bytes"] >= r["state_bytes"] for r in lean.values())


def test_bench_dequant4_delta_writes_results(tmp_path):
    import pytest

    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_dequant4_delta.py"), "--quick",
                           "--repeats", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "dequant4_delta_quick.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"bnb dequantize_4bit", "reference", "seat int32",
                                                   "seat implicit"}
    assert {r["shape"] for r in data["rows"]} == {"512x512", "512x1792"}
    assert all(r["ms"] > 0 and r["vs_reference"] > 0 for r in data["rows"])


def test_bench_data_parallel_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data_parallel.py"), "--quick",
                           "--steps", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "data_parallel_quick.json").read_text())
    rows = {(r["method"], r["ranks"]): r for r in data["rows"]}
    assert set(rows) == {("seat dp", 1), ("ddp dense", 1), ("seat dp", 2), ("ddp dense", 2), ("seat fsdp", 2),
                         ("fsdp dense", 2)}
    assert rows[("seat dp", 1)]["mb_per_step"] == 0 and rows[("ddp dense", 1)]["mb_per_step"] == 0
    seat, ddp = rows[("seat dp", 2)], rows[("ddp dense", 2)]
    # the compact fp32 gradients: 4 bytes per trained entry; DDP: 4 bytes per trained weight entry
    assert seat["mb_per_step"] * 1e6 == 4 * seat["trained"] and ddp["mb_per_step"] * 1e6 == 4 * ddp["trained"]
    assert 0.04 < seat["bytes_vs_ddp"] < 0.06  # density 0.05
    assert seat["wait_ms"] >= 0 and all(r["ms"] > 0 for r in rows.values())
    # FSDP2: the layers gathered for the forward and the backward, the root once, the trained
    # (linear) weights' fp32 gradients reduce-scattered; seat gathers the layers once more
    # (the reference forward)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_data_parallel

    model = bench_data_parallel._model("quick")
    layers = 4 * sum(p.numel() for p in model.model.layers.parameters())
    linears = 4 * sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    root = 4 * sum(p.numel() for p in model.parameters()) - layers
    sharded, dense = rows[("seat fsdp", 2)], rows[("fsdp dense", 2)]
    assert round(dense["mb_per_step"] * 1e6) == 2 * layers + root + linears
    assert round(sharded["mb_per_step"] * 1e6) == 3 * layers + root + linears
