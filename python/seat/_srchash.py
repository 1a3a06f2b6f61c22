"""Hash of the native sources under csrc/.

setup.py bakes this hash into seat._C; seat.ops compares it against the source tree
of an editable install to detect a stale build. No imports beyond the stdlib: setup.py
loads this file by path before the package exists.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

NATIVE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def native_source_hash(root: Path) -> str:
    """sha256 (first 16 hex digits) over the relative paths and bytes of csrc/ sources."""
    digest = hashlib.sha256()
    for path in sorted((root / "csrc").rglob("*")):
        if path.is_file() and path.suffix in NATIVE_SUFFIXES:
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
