"""The build: a non-editable wheel installs and runs, the build flags behave, and the
toolkit is found through a wrapper nvcc."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _setup_module():
    spec = importlib.util.spec_from_file_location("seat_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_source(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_max_jobs_default_is_bounded_by_cores():
    jobs = _setup_module().default_max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_home_found_through_nvcc_wrapper(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = _setup_module().find_cuda_home()
    assert home is not None and (Path(home) / "bin" / "nvcc").exists()
    assert (Path(home) / "include" / "cuda_runtime_api.h").exists()


def test_force_cuda_with_skip_fails_clearly(tmp_path):
    src = _copy_source(tmp_path / "src")
    env = {**os.environ, "SEAT_FORCE_CUDA": "1", "SEAT_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=src, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "SEAT_FORCE_CUDA=1 but the CUDA kernels cannot be built: SEAT_SKIP_CUDA_BUILD is set" in proc.stderr


@pytest.mark.slow
def test_non_editable_wheel_installs_and_runs(tmp_path):
    """`pip install .` path: build a wheel (CPU kernels only, to keep it quick), install
    it into a separate directory and use it from there."""
    src = _copy_source(tmp_path / "src")
    env = {**os.environ, "SEAT_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=env)
    wheel = next((tmp_path / "dist").glob("seat-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = (
        "import json, seat, seat_kernels, torch\n"
        "from seat import ops\n"
        "from seat.ops import _native\n"
        "out = ops.masked_gather_(torch.zeros(2), torch.arange(6.0), torch.tensor([1, 4], dtype=torch.int32))\n"
        "m = _native.load()\n"
        "print(json.dumps({'seat': seat.__file__, 'kernels': seat_kernels.__file__, 'native': m.__file__,"
        " 'with_cuda': m.with_cuda, 'out': out.tolist(), 'stale': _native.stale_reasons(m)}))"
    )
    run_env = {k: v for k, v in os.environ.items() if k not in ("SEAT_BACKEND", "TRITON_INTERPRET")}
    run_env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("seat", "kernels", "native"):
        assert result[key].startswith(str(site)), result
    assert result["with_cuda"] == 0 and result["out"] == [1.0, 4.0] and result["stale"] == []
