"""The output folder of `seat train`: what is in it, whether (and from where) a run
resumes, and the record of the arguments that made it.

A `seat train` folder holds
  seat_train_args.json   the resolved arguments and the facts' fingerprint (written when
                         training starts; also copied into every checkpoint, written last:
                         a checkpoint holding it is complete)
  checkpoint-N/          SeatTrainer checkpoints
  delta/                 the trained delta (at the end)
  seat_report.json       the report (at the end)
Nothing else is ever written there, and a folder holding anything else (that is not an
earlier run) is refused, so no file of the user's is overwritten.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ..evaluate import write_json_atomically
from ._options import BY_DEST, TRAJECTORY, UsageError

ARGS_FILE = "seat_train_args.json"
REPORT_FILE = "seat_report.json"
DELTA = "delta"
ARGS_FORMAT = "seat-train-args"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# What a SeatTrainer checkpoint holds (seat.trainer: its delta, run record and the Trainer's files).
CHECKPOINT_FILES = ("seat_delta", "seat_run.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
                    "rng_state.pth")


def checkpoints(directory: Path) -> list[Path]:
    """checkpoint-N folders of `directory`, newest (largest N) first."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def is_complete(checkpoint: Path, ours: bool) -> bool:
    """Every file a resume reads is there (for a `seat train` checkpoint: its args file,
    written after all the others)."""
    needed = CHECKPOINT_FILES + ((ARGS_FILE,) if ours else ())
    return all((checkpoint / name).exists() for name in needed)


def args_record(values: dict, data_sha256: str, n_records: int) -> dict:
    from .. import __version__

    return {"format": ARGS_FORMAT, "format_version": 1, "seat_version": __version__, "arguments": values,
            "data_sha256": data_sha256, "records": n_records}


def write_args(directory: Path, record: dict) -> None:
    write_json_atomically(str(directory / ARGS_FILE), record)


def _read_args(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == ARGS_FORMAT else None


def check_same_run(checkpoint: Path, current: dict) -> None:
    """Refuse (naming each flag) a resume whose arguments change the run recorded in the
    checkpoint: it would not continue that run."""
    saved = _read_args(checkpoint / ARGS_FILE)
    if saved is None:
        return  # a checkpoint of a SeatTrainer script: SeatTrainer's own resume check applies
    old, new = saved.get("arguments", {}), current["arguments"]
    diffs = [f"{BY_DEST[k].flag}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
             for k in TRAJECTORY if old.get(k) != new.get(k)]
    if saved.get("data_sha256") != current["data_sha256"]:
        diffs.append(f"--data: the facts differ from those the checkpoint was trained on "
                     f"({saved.get('records')} records then, {current['records']} now)")
    if diffs:
        raise UsageError(f"argument --resume: {checkpoint} was trained with other arguments, so resuming would not "
                         f"continue that run: {'; '.join(diffs)}. Pass the same values to continue it, or start "
                         "a new run in another --output-dir")


def plan(output_dir: str, resume: str) -> Path | None:
    """The checkpoint to resume from (None: a new run), after checking the folder's state;
    UsageError for a folder that cannot take this run. Writes nothing."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"argument --output-dir: {output_dir!r} is a file; give a folder (new or empty)")
    if resume not in ("auto", "never"):
        checkpoint = Path(resume)
        if not checkpoint.is_dir() or not is_complete(checkpoint, ours=False):
            missing = [n for n in CHECKPOINT_FILES if not (checkpoint / n).exists()] if checkpoint.is_dir() else []
            raise UsageError(f"argument --resume: {resume!r} is not a complete SeatTrainer checkpoint folder"
                             + (f" (missing {', '.join(missing)})" if missing else "")
                             + "; give a checkpoint-N folder, 'auto' or 'never'")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        if resume == "auto" or resume == "never":
            return None
        return Path(resume)
    if any((out / name).exists() for name in ("seat_run.json", "trainer_state.json")):
        raise UsageError(f"argument --output-dir: {output_dir!r} is a checkpoint folder, not a run folder; give "
                         f"the run folder that holds it ({out.resolve().parent}) to resume, or a new folder")
    ours = (out / ARGS_FILE).exists()
    found = checkpoints(out)
    seat_checkpoints = [c for c in found if (c / "seat_run.json").exists()]
    if not ours and not seat_checkpoints:
        raise UsageError(f"argument --output-dir: {output_dir!r} holds files that are not a seat run "
                         f"({', '.join(entries[:6])}{', ...' if len(entries) > 6 else ''}); choose a new or empty "
                         "folder (nothing of yours is overwritten)")
    delta = out / DELTA
    if delta.exists() and not (delta / "seat_config.json").exists():
        raise UsageError(f"argument --output-dir: {delta} exists and is not a seat delta; move it away or choose "
                         "another --output-dir")
    if (out / REPORT_FILE).is_dir():
        raise UsageError(f"argument --output-dir: {out / REPORT_FILE} is a folder; move it away")
    if resume == "never":
        raise UsageError(f"argument --resume: {output_dir!r} holds an earlier seat run; pass --resume auto to "
                         "continue it, or choose a new --output-dir (it is not overwritten)")
    if resume != "auto":
        return Path(resume)
    complete = [c for c in found if is_complete(c, ours)]
    if complete:
        return complete[0]
    if (out / REPORT_FILE).exists() or delta.exists():
        raise UsageError(f"argument --output-dir: {output_dir!r} holds a finished seat run without checkpoints "
                         "to resume from; choose a new --output-dir (its delta and report are not overwritten)")
    return None  # an earlier run stopped before its first checkpoint: start it again


class FolderState:
    """The output folder and its args file as they were before this run began, so a run
    refused when its checkpoint loads leaves the folder as it found it."""

    def __init__(self, out: Path):
        self.out, self.had_folder = out, out.exists()
        args = out / ARGS_FILE
        self.args = args.read_bytes() if args.is_file() else None

    def restore(self) -> None:
        args = self.out / ARGS_FILE
        if self.args is None:
            args.unlink(missing_ok=True)
        elif args.read_bytes() != self.args:
            tmp = args.with_name(f".{ARGS_FILE}.restore")
            tmp.write_bytes(self.args)
            os.replace(tmp, args)
        if not self.had_folder and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


def ensure_writable(output_dir: str, flag: str = "--output-dir") -> None:
    """`output_dir` (or its nearest existing parent) takes new folders: a folder is made
    there and removed at once. os.access alone misses read-only mounts and places like
    /proc, and lets root pass everywhere; the failure would otherwise come after the model
    was loaded."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"argument {flag}: {path!r} is not a writable folder; choose a folder you can write to")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".seat-probe-", dir=path))
    except OSError as e:
        raise UsageError(f"argument {flag}: {output_dir!r} cannot be created in {path!r} ({e.strerror}); choose "
                         "a folder you can write to") from None
