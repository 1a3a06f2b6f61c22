"""Fixtures for the `seat` command's tests: a tiny Llama and its word-level tokenizer saved
to a folder (as save_pretrained writes them), facts files in each format, and main(argv)
run in-process with its exit code and output."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import transformers

from _trainer_helpers import RECORDS, tiny_llama, tokenizer

# a short run: 2 records per step, a checkpoint every 2 steps, 4 steps in all
TRAIN_FLAGS = ["--density", "0.2", "--lr", "0.02", "--batch-size", "2", "--max-steps", "4", "--save-steps", "2",
               "--logging-steps", "1", "--device", "cpu", "--no-progress", "--seed", "0"]


def save_tiny_model(directory: Path) -> Path:
    """The tiny Llama and its tokenizer, saved as one folder; returns it."""
    tok = tokenizer()
    model = tiny_llama(tok)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_dataset(path: Path, kind: str, records=RECORDS, rename: dict | None = None) -> Path:
    """records as CSV, Parquet, JSON (array) or a save_to_disk folder, columns renamed by `rename`."""
    import datasets

    rows = [{(rename or {}).get(k, k): v for k, v in r.items()} for r in records]
    if kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    ds = datasets.Dataset.from_list(rows)
    if kind == "csv":
        ds.to_csv(path, index=False)
    elif kind == "parquet":
        ds.to_parquet(path)
    elif kind == "disk":
        ds.save_to_disk(path)
    else:
        raise ValueError(kind)
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of seat.cli.main(argv) in this process."""
    from seat.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def load_model(directory: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
