"""Byte sizes in and out: "24GB", "24 GiB", "16e9" -> bytes; bytes -> "22.41 GB"."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text, *, argument: str = "size") -> int:
    """Bytes in `text`: a number with an optional unit (B, KB, MB, GB, TB: powers of 10;
    KiB, MiB, GiB, TiB: powers of 2), e.g. "24GB", "24 GiB", "8e9". ValueError naming
    `argument` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{argument} must be a size like 24GB, 24GiB or 24e9; got {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ValueError(f"{argument} must be > 0; got {text!r}")
    return int(value * _UNITS[unit])


def format_bytes(n: int, unit: str = "GB") -> str:
    """n bytes in `unit` (GB = 1e9 by default, as GPU memory is sold; GiB, MiB too)."""
    scale = _UNITS[unit.lower()]
    return f"{n / scale:,.2f} {unit}"
