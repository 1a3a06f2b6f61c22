"""A delta directory on disk: the write sequence with one commit point, and reading back
the committed files.

The write sequence (save_files), in a directory that is new, empty, or holds a delta:
  1. recover(): finish or discard what an interrupted save left (see below)
  2. the weights -> ".seat-tmp-<random>", fsync, rename to "delta.safetensors.pending"
  3. the config (naming the weights' sha256) -> ".seat-tmp-<random>", fsync, rename to
     "seat_config.json": the commit point (os.replace is atomic on POSIX)
  4. rename "delta.safetensors.pending" to "delta.safetensors", recover() again
The directory is fsynced after each rename. An interruption (exception, kill, power
loss) leaves one of these states, each of which reads as a whole delta:
  before 3: the old config and old weights (+ leftovers): the old delta
  after 3, before 4: the new config, the old weights and the new weights pending: the new
    delta, read from the pending file (the config's weights_sha256 says which file it is)
  after 4: the new delta
recover() rolls a committed pending file forward and deletes leftovers (an uncommitted
pending file, temporaries); it runs at the start and end of every save. Reading never
changes the directory (it may be read-only). One process saves to a path at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from ._format import (CONFIG_FILE, FORMAT, MAX_CONFIG_BYTES, WEIGHTS_FILE, DeltaMismatchError, config_sha256,
                      parse_config)

PENDING_FILE = WEIGHTS_FILE + ".pending"
TMP_PREFIX = ".seat-tmp-"
OUR_FILES = (CONFIG_FILE, WEIGHTS_FILE, PENDING_FILE)


def as_path(directory, caller: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{caller}: directory must be a str or os.PathLike; got {type(directory).__name__}")
    return Path(directory)


def member(directory: Path, name: str) -> Path | None:
    """directory/name when it is a file inside the directory (a symlink may point only
    within it), None when it does not exist; DeltaMismatchError otherwise."""
    path = directory / name
    if not path.exists():
        if path.is_symlink():
            raise DeltaMismatchError(f"{path} is a broken symlink")
        return None
    if path.is_symlink() and not path.resolve().is_relative_to(directory.resolve()):
        raise DeltaMismatchError(f"{path} is a symlink to {path.resolve()}, outside the delta directory")
    if not path.is_file():
        raise DeltaMismatchError(f"{path} is not a regular file (a directory?)")
    return path


def read_config_file(directory: Path) -> tuple[Path, dict]:
    """The delta directory's seat_config.json, parsed (schema not yet checked)."""
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist: it is not a seat delta")
    if not directory.is_dir():
        raise DeltaMismatchError(f"{directory} is a file, not a seat delta (a directory holding {CONFIG_FILE} and "
                                 f"{WEIGHTS_FILE})")
    path = member(directory, CONFIG_FILE)
    if path is None:
        raise FileNotFoundError(f"{directory} is not a seat delta: {CONFIG_FILE} is missing")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise DeltaMismatchError(f"{path} is {size} bytes, more than a delta config holds ({MAX_CONFIG_BYTES})")
    return path, parse_config(path.read_bytes(), path)


def read_weights_bytes(directory: Path, meta: dict) -> tuple[Path, bytes]:
    """(path, bytes) of the weights file the config commits to: delta.safetensors, or the
    pending file of a save interrupted after its commit point (format 3, chosen by the
    config's weights_sha256). When neither matches, delta.safetensors (the tensor checks
    then say what is wrong)."""
    weights = member(directory, WEIGHTS_FILE)
    if meta["format_version"] < 3:  # no checksum to choose by: only delta.safetensors
        if weights is None:
            raise FileNotFoundError(f"{directory} is not a seat delta: {WEIGHTS_FILE} is missing")
        return weights, weights.read_bytes()
    found = []
    for path in (weights, member(directory, PENDING_FILE)):
        if path is not None:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == meta["weights_sha256"]:
                return path, data
            found.append((path, data))
    if not found:
        raise FileNotFoundError(f"{directory} is not a seat delta: {WEIGHTS_FILE} is missing")
    return found[0]


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (POSIX; no-op where directories cannot be opened)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _write_file(directory: Path, name: str, write) -> str:
    """write(tmp_path) a temporary, fsync it, rename it to directory/name; its sha256."""
    tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    try:
        write(tmp)
        digest = _sync_and_hash(tmp)
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return digest


def check_target(directory: Path) -> None:
    """save_delta writes only into a new or empty directory or over a seat delta; a file,
    or a directory holding anything else, is refused (FileExistsError) untouched."""
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir():
        raise FileExistsError(f"save_delta: {directory} exists and is not a directory (a delta is a directory): "
                              "choose another path or remove it")
    foreign = sorted(e.name for e in directory.iterdir()
                     if not (e.name in OUR_FILES and e.is_file() and not e.is_symlink())
                     and not (e.name.startswith(TMP_PREFIX) and e.is_file()))
    if foreign:
        raise FileExistsError(f"save_delta: {directory} holds what is not a seat delta's ("
                              f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}): save to a new or "
                              "empty directory, or to an existing delta (which is replaced)")
    config = directory / CONFIG_FILE
    if config.exists():
        try:
            if config.stat().st_size > MAX_CONFIG_BYTES:
                raise DeltaMismatchError("too large")
            parsed = parse_config(config.read_bytes(), config)
            is_delta = isinstance(parsed, dict) and parsed.get("format") == FORMAT
        except DeltaMismatchError:
            is_delta = False
        if not is_delta:
            raise FileExistsError(f"save_delta: {config} is not a seat delta's config (not JSON, or no format "
                                  f"{FORMAT!r}): remove it, or save to another directory")


def _committed_weights_sha256(directory: Path) -> str | None:
    try:
        _, meta = read_config_file(directory)
    except (OSError, DeltaMismatchError):
        return None
    digest = meta.get("weights_sha256") if isinstance(meta, dict) else None
    return digest if isinstance(digest, str) else None


def recover(directory: Path) -> None:
    """Roll a committed pending weights file forward; delete temporaries and an
    uncommitted pending file (see the module docstring)."""
    pending = directory / PENDING_FILE
    if pending.is_file():
        committed = _committed_weights_sha256(directory)
        if committed is not None and committed == _sync_and_hash(pending):
            os.replace(pending, directory / WEIGHTS_FILE)
            fsync_dir(directory)
        else:
            pending.unlink()
    for tmp in directory.glob(TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)


def save_files(directory: Path, meta: dict, tensors: dict) -> None:
    """check_target, then the write sequence of the module docstring. `meta` lacks the
    two checksums this adds: weights_sha256 (of the file written) and config_sha256."""
    from safetensors.torch import save_file

    check_target(directory)
    created = not directory.exists()
    if created:
        directory.mkdir(parents=True)
    try:
        recover(directory)
        weights = _write_file(directory, PENDING_FILE,
                              lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
        meta = {**meta, "weights_sha256": weights}
        meta["config_sha256"] = config_sha256(meta)
        text = json.dumps(meta, indent=1).encode()

        def write_config(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(text)

        _write_file(directory, CONFIG_FILE, write_config)  # the commit point
        os.replace(directory / PENDING_FILE, directory / WEIGHTS_FILE)
        fsync_dir(directory)
    except BaseException:
        try:  # leave no leftovers when the failure allows; the next save clears them otherwise
            recover(directory)
            if created and not any(directory.iterdir()):
                directory.rmdir()
        except OSError:
            pass
        raise
    recover(directory)
