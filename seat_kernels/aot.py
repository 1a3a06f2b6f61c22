"""Compile every Triton kernel of seat_kernels for NVIDIA archs without a GPU.

    python -m seat_kernels.aot [--arch 80 86 89 90] [--json FILE]

Uses triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32)) and reads the
register count and local-memory (spill) bytes of each cubin with cuobjdump (shipped with
Triton). Exits non-zero if any kernel fails to compile. TRITON_INTERPRET must be unset:
under the interpreter kernels are not compilable objects.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_ARCHS = (80, 86, 89, 90)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)],
                              check=True, capture_output=True, text=True).stdout
    usage = {}
    for key, field in (("registers", "REG"), ("stack_bytes", "STACK"), ("local_bytes", "LOCAL"),
                       ("shared_bytes", "SHARED")):
        match = re.search(rf"\b{field}:(\d+)", text)
        usage[key] = int(match.group(1)) if match else -1
    return usage


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, **spec.options})
    result = {"kernel": spec.name, "arch": f"sm_{arch}", "num_warps": spec.num_warps,
              "compile_s": round(time.perf_counter() - start, 3)}
    result.update(_resource_usage(compiled.asm["cubin"]))
    return result


def compile_all(archs=DEFAULT_ARCHS) -> list[dict]:
    from seat_kernels import aot_specs

    results = []
    for spec in aot_specs():
        for arch in archs:
            try:
                results.append(compile_spec(spec, arch))
            except Exception as exc:  # report every failure, not just the first
                results.append({"kernel": spec.name, "arch": f"sm_{arch}", "error": f"{type(exc).__name__}: {exc}"})
    return results


def format_table(results: list[dict]) -> str:
    lines = [f"{'kernel':52s} {'arch':6s} {'regs':>5s} {'spill/local B':>13s} {'stack B':>7s} {'compile s':>9s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['kernel']:52s} {r['arch']:6s} FAILED {r['error']}")
        else:
            lines.append(f"{r['kernel']:52s} {r['arch']:6s} {r['registers']:5d} {r['local_bytes']:13d} "
                         f"{r['stack_bytes']:7d} {r['compile_s']:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    from triton import knobs

    if knobs.runtime.interpret:
        parser.error("TRITON_INTERPRET is set: unset it to compile kernels ahead of time")
    results = compile_all(args.arch)
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
