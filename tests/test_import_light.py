"""`import seat` stays light: no torch, triton or transformers import and no native load;
measured in a fresh interpreter."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "triton", "transformers", "seat._C", "seat.ops", "seat_kernels")


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_seat_loads_nothing_heavy():
    result = _fresh(
        "import json, sys, time\n"
        "t = time.perf_counter(); import seat; dt = time.perf_counter() - t\n"
        f"print(json.dumps({{'loaded': [m for m in {HEAVY!r} if m in sys.modules], 'seconds': dt}}))"
    )
    print(f"import seat took {result['seconds'] * 1e3:.1f} ms")
    assert result["loaded"] == []


def test_import_seat_ops_registers_schemas_without_native_code():
    result = _fresh(
        "import json, sys\n"
        "import seat.ops, torch\n"
        "print(json.dumps({'native': 'seat._C' in sys.modules, 'triton': 'seat_kernels.sparse_update' in sys.modules,"
        " 'op': hasattr(torch.ops.seat, 'kl_div')}))"
    )
    assert result == {"native": False, "triton": False, "op": True}


def test_lazy_attributes():
    result = _fresh(
        "import json, seat\n"
        "print(json.dumps({'ops': seat.ops.__name__, 'dir': 'ops' in dir(seat)}))"
    )
    assert result == {"ops": "seat.ops", "dir": True}
