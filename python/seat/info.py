"""`python -m seat.info`: versions, native build, devices, and which backend runs each op.

Prints what is built and usable, and for anything unusable, why. `--json` prints the
same as JSON (used by the tests and bug reports).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import torch

    from . import ops
    from ._version import __version__
    from .ops import _backend, _native

    native_ok, native_detail = _native.status()
    module, _ = _native._load_cached()
    info = {
        "seat": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "native": {
            "usable": native_ok,
            "detail": native_detail,
            "with_cuda": bool(module.with_cuda) if module else False,
            "cuda_archs": module.cuda_archs if module else "",
            "openmp": int(module.openmp) if module else 0,
        },
        "env": {k: os.environ[k] for k in ("SEAT_BACKEND", "TRITON_INTERPRET") if k in os.environ},
        "devices": [{"device": "cpu", "name": platform.processor() or platform.machine(),
                     "threads": torch.get_num_threads()}],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            info["devices"].append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i),
                                    "capability": f"sm_{major}{minor}"})
        info["cuda_unavailable"] = None
    else:
        info["cuda_unavailable"] = ("torch is a CPU build" if torch.version.cuda is None
                                    else "no CUDA device visible (driver or GPU absent)")

    backends = {}
    for device in ("cpu", "cuda"):
        for backend in _backend.BACKENDS:
            why = _backend.unusable_reason(backend, torch.device(device))
            if why is None and backend in _backend.NATIVE_BACKENDS and not native_ok:
                why = native_detail
            if why is None and device == "cuda" and info["cuda_unavailable"]:
                why = info["cuda_unavailable"]
            backends[f"{backend}@{device}"] = {"usable": why is None, "why": why}
    info["backends"] = backends

    table = {}
    for name, entry in ops.OPS.items():
        row = {"implemented": list(entry.backends())}
        for device in ("cpu", "cuda"):
            try:
                row[f"default@{device}"] = _backend.select(name, entry.kernels, torch.device(device))[0]
            except Exception as exc:  # noqa: BLE001 - report, don't fail
                row[f"default@{device}"] = f"error: {exc}"
        table[name] = row
    info["ops"] = table
    return info


def format_report(info: dict) -> str:
    lines = [
        f"seat {info['seat']}  python {info['python']}  torch {info['torch']} "
        f"(CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}  "
        f"transformers {info['transformers'] or 'not installed'}",
        f"platform: {info['platform']}",
        f"native:   {'ok' if info['native']['usable'] else 'UNUSABLE'}: {info['native']['detail']}",
    ]
    if info["native"]["usable"]:
        lines.append(f"          OpenMP {info['native']['openmp'] or 'off'}; "
                     f"CUDA kernels {'archs ' + info['native']['cuda_archs'] if info['native']['with_cuda'] else 'not built'}")
    if info["env"]:
        lines.append("env:      " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    lines.append("devices:")
    for d in info["devices"]:
        extra = f"{d['threads']} threads" if d["device"] == "cpu" else d["capability"]
        lines.append(f"  {d['device']:8s} {d['name']} ({extra})")
    if info["cuda_unavailable"]:
        lines.append(f"  cuda     unavailable: {info['cuda_unavailable']}")
    lines.append("backends:")
    for key, b in info["backends"].items():
        lines.append(f"  {key:16s} {'usable' if b['usable'] else 'unusable: ' + b['why']}")
    lines.append("ops (implemented backends; default on cpu / cuda):")
    for name, row in info["ops"].items():
        lines.append(f"  {name:26s} {', '.join(row['implemented']):32s} {row['default@cpu']} / {row['default@cuda']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seat.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
