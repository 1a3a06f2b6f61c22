"""nvcc compiles every csrc/cuda/*.cu for sm_80/86/89/90; ptxas' register and spill
counts are printed per kernel and arch."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("80", "86", "89", "90")
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _demangle(names: list[str]) -> dict[str, str]:
    """Readable kernel names (c++filt where present), namespaces dropped."""
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {n: re.sub(r"seat::cuda::\(anonymous namespace\)::", "", d) for n, d in zip(names, out)}


def _ptxas_table(log: str) -> list[tuple[str, str, int, int, int]]:
    """(function, arch, registers, spill store bytes, spill load bytes) from ptxas -v."""
    rows, function, arch = [], None, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            function, arch = m.group(1), m.group(2)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and function:
            rows.append((function, arch, int(m.group(1)), *spills))
            function = None
    return rows


def test_there_is_cuda_source():
    assert CU_FILES, "csrc/cuda has no .cu files"


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_for_shipped_archs(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-std=c++17", "-O3", "-c", str(source), "-o", str(tmp_path / "k.o"),
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{source.parent}", "-Xptxas", "-v", *gencode]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = _ptxas_table(proc.stderr)
    names = _demangle(sorted({r[0] for r in rows}))
    print(f"\n{source.name}:\n  {'kernel':70s} arch   regs spill-st spill-ld")
    for function, arch, regs, st, ld in rows:
        short = names[function].split("(")[0][:70]
        print(f"  {short:70s} {arch:6s} {regs:4d} {st:8d} {ld:8d}")
    assert {arch for _, arch, *_ in rows} == {f"sm_{a}" for a in ARCHS}
    assert all(st == 0 and ld == 0 for *_, st, ld in rows), "a CUDA kernel spills registers"
