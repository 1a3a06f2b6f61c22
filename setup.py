"""Build script for seat: the `seat` and `seat_kernels` packages and the native `seat._C`.

`seat._C` always holds the C++ CPU kernels (OpenMP). The CUDA kernels in csrc/cuda are
added when nvcc and a CUDA build of torch are both present.

Environment knobs (flash-attention style):
  SEAT_SKIP_CUDA_BUILD=1   build the CPU kernels only, even where CUDA is available.
  SEAT_FORCE_CUDA=1        build the CUDA kernels or fail (no silent CPU-only build).
  TORCH_CUDA_ARCH_LIST     archs to compile for; default "8.0;8.6;8.9;9.0+PTX".
  MAX_JOBS                 parallel compile jobs; default from cores and free memory.
  CUDA_HOME                toolkit root; found from `nvcc` on PATH when unset (also
                           through wrapper scripts, by asking nvcc where it lives).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _version() -> str:
    text = (ROOT / "python" / "seat" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else asked of `nvcc` on PATH.

    torch's extension builder only looks at CUDA_HOME and at the realpath of nvcc; an
    `nvcc` that is a wrapper script defeats the latter, so ask nvcc itself (`--dryrun`
    prints its TOP directory)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match is None:
        return str(Path(nvcc).resolve().parent.parent)
    return str(Path(match.group(1).strip()).resolve())


def default_max_jobs() -> int:
    """One job per core, but at most one per ~3 GiB of available memory (a torch-heavy
    translation unit peaks around 1.5-2.5 GiB in g++)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        avail_gib = int(meminfo["MemAvailable"].split()[0]) / (1024 * 1024)
        return max(1, min(cores, int(avail_gib // 3)))
    except (OSError, KeyError, ValueError):
        return max(1, cores)


def source_hash() -> str:
    """Hash of every native source, baked into seat._C so a stale build is detected.
    The one definition lives in python/seat/_srchash.py (loaded by path: the package
    is not importable before it is built)."""
    spec = importlib.util.spec_from_file_location("_seat_srchash", ROOT / "python" / "seat" / "_srchash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.native_source_hash(ROOT)


def native_extension():
    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = (
        not _flag("SEAT_SKIP_CUDA_BUILD")
        and torch.version.cuda is not None
        and cuda_home is not None
        and shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is not None
    )
    if _flag("SEAT_FORCE_CUDA") and not with_cuda:
        why = []
        if _flag("SEAT_SKIP_CUDA_BUILD"):
            why.append("SEAT_SKIP_CUDA_BUILD is set")
        if torch.version.cuda is None:
            why.append(f"torch {torch.__version__} is not a CUDA build")
        if cuda_home is None:
            why.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
        sys.exit("SEAT_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(why))

    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS) if with_cuda else ""
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    sources = ["csrc/seat_ops.cpp"] + cpu_sources
    defines = [
        ("SEAT_VERSION", f'"{_version()}"'),
        ("SEAT_SOURCE_HASH", f'"{source_hash()}"'),
        ("SEAT_TORCH_VERSION", f'"{torch.__version__}"'),
        ("SEAT_CUDA_ARCHS", f'"{archs}"'),
    ]
    cxx_flags = ["-O3", "-fopenmp"]
    include_dirs = [str(ROOT / "csrc" / "include")]
    if not with_cuda:
        return CppExtension(
            "seat._C", sources, include_dirs=include_dirs, define_macros=defines,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*"))
    cuda_sources = [s for s in cuda_sources if s.endswith((".cu", ".cpp"))]
    defines.append(("SEAT_WITH_CUDA", "1"))
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "seat._C", sources + cuda_sources, include_dirs=include_dirs, define_macros=defines,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=["-fopenmp"],
    )


def main():
    extension = native_extension()  # sets CUDA_HOME before torch's builder is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        version=_version(),
        packages=[*find_packages("python", include=["seat", "seat.*"]), "seat_kernels"],
        package_dir={"": "python", "seat_kernels": "seat_kernels"},
        package_data={"seat.memory": ["known-configs/*.json"]},  # seat.memory's known model configs
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
