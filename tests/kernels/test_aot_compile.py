"""Every Triton kernel in seat_kernels compiles ahead of time for sm_80/86/89/90 without a
GPU; registers and spill (local memory) bytes are printed per kernel and arch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = ("80", "86", "89", "90")

pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to compile")


def test_aot_compile_all_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "seat_kernels.aot", "--arch", *ARCHS, "--json", str(out)],
                          capture_output=True, text=True, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    import seat_kernels

    names = {spec.name for spec in seat_kernels.aot_specs()}
    assert names, "no kernels declared"
    assert {(r["kernel"], r["arch"]) for r in results} == {(n, f"sm_{a}") for n in names for a in ARCHS}
    for r in results:
        assert 0 < r["registers"] <= 255, r
        assert r["local_bytes"] == 0, f"{r['kernel']} spills on {r['arch']}: {r}"
