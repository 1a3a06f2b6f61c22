"""The facts file of `seat train`: read, renamed to question / answer / entity, checked.

Formats (by extension, or a folder):
  .jsonl            one JSON object per line (blank lines skipped); errors name path:line
  .json             a JSON array of objects (or JSON Lines, as .jsonl)
  .csv              a header row and one record per row, every cell read as text
  .parquet / .pq    string columns
  folder            written by datasets.Dataset.save_to_disk (a DatasetDict: its "train" split)
CSV is read by the csv module, Parquet and folders by the `datasets` library. Every record is checked as
seat.data.load_records checks one (the three keys as non-empty strings where needed, the
entity mentioned in the question or the answer, as seat.perturb finds it); the first bad
record is named. Extra columns are ignored.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile

from ..data import _check_record
from ..messages import record_mentions
from ._options import UsageError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")
KEYS = ("question", "answer", "entity")


def _fail(message: str):
    raise UsageError(f"argument --data: {message}")


def _json_lines(path: str, lines) -> list[tuple[str, object]]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            _fail(f"{path}:{lineno} is not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                  'object like {"question": ..., "answer": ..., "entity": ...}')
    return rows


def _read_json(path: str, jsonl: bool) -> list[tuple[str, object]]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark some editors write is skipped
            content = f.read()
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    if not jsonl:
        try:
            data = json.loads(content)
        except json.JSONDecodeError as e:
            if content.lstrip().startswith("["):
                _fail(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
            data = None  # not one JSON document: JSON Lines under a .json name
        if isinstance(data, list):
            return [(f"{path} item {i}", row) for i, row in enumerate(data)]
        if isinstance(data, dict) and not set(data) & set(KEYS):
            _fail(f"{path} holds one JSON object (keys {', '.join(map(repr, list(data)[:6]))}), not a list of "
                  "records; write a JSON array of objects, or one object per line in a .jsonl file")
    return _json_lines(path, content.splitlines())


def _read_csv(path: str) -> list[tuple[str, object]]:
    """Every cell as text, as the csv module reads it (the `datasets` / pandas reader would
    guess numbers, fail on a header-only file, and read a row with more cells than the
    header shifted by one column: an unquoted comma would silently move the answer)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long answer is no error (the default limit is 131072 characters)
    try:
        # utf-8-sig: the byte-order mark Excel writes before the header is not part of its first name
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                _fail(f"{path} is empty; the first row must name the columns")
            rows = []
            for cells in reader:
                if not cells:
                    continue  # a blank line
                where = f"{path} row {len(rows) + 1} (line {reader.line_num})"
                if len(cells) != len(header):
                    _fail(f"{where} has {len(cells)} cells but the header names {len(header)}; quote a cell "
                          'that holds a comma ("Ann Lee, a baker .")')
                rows.append((where, dict(zip(header, cells))))
    except UnicodeDecodeError as e:
        _fail(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    except csv.Error as e:
        _fail(f"{path} cannot be read as CSV: {e}")
    finally:
        csv.field_size_limit(limit)
    return rows


def _read_with_datasets(path: str, kind: str) -> list[tuple[str, object]]:
    try:
        import datasets
    except ImportError:
        _fail(f"reading {kind} needs the `datasets` package (pip install datasets, or seat[cli]); or give a "
              "JSONL file")
    datasets.disable_progress_bars()
    # the builders cache what they read: into a folder of ours, removed at once
    with tempfile.TemporaryDirectory(prefix="seat-facts-") as cache:
        try:
            if kind == "Parquet":
                ds = datasets.Dataset.from_parquet(path, cache_dir=cache, keep_in_memory=True)
            else:
                ds = datasets.load_from_disk(path, keep_in_memory=True)
                if isinstance(ds, datasets.DatasetDict):
                    if "train" not in ds:
                        _fail(f"{path} holds a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                              "save the split to train on with Dataset.save_to_disk")
                    ds = ds["train"]
            rows = ds.to_list()
        except UsageError:
            raise
        except (UnicodeDecodeError, ValueError, TypeError, OSError) as e:
            _fail(f"{path} cannot be read as {kind}: {e}")
        except Exception as e:  # pyarrow's and datasets' own error classes: a damaged or foreign file
            _fail(f"{path} cannot be read as {kind}: {type(e).__name__}: {e}")
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(rows)]


def read_rows(path: str) -> list[tuple[str, object]]:
    """(where, raw row) of every record of the file or folder at `path`."""
    if os.path.isdir(path):
        if not (os.path.exists(os.path.join(path, "dataset_info.json"))
                or os.path.exists(os.path.join(path, "dataset_dict.json"))):
            _fail(f"{path!r} is a folder but not one written by datasets' save_to_disk; give a JSONL, JSON, CSV "
                  "or Parquet file, or such a folder")
        return _read_with_datasets(path, "a save_to_disk folder")
    if not os.path.isfile(path):
        _fail(f"{path!r} does not exist; give the facts file (JSONL, JSON, CSV or Parquet)")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        _fail(f"{path!r}: unknown file type {suffix or '(no extension)'!r}; name it .jsonl, .json, .csv or .parquet")
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json(path, suffix == ".jsonl")
        if suffix == ".csv":
            return _read_csv(path)
        return _read_with_datasets(path, "Parquet")
    except PermissionError as e:
        _fail(f"{path!r} cannot be read: {e.strerror}")


def load_facts(path: str, question_key: str = "question", answer_key: str = "answer",
               entity_key: str = "entity") -> list[dict]:
    """The records of `path` as [{"question", "answer", "entity"}] (str each), checked."""
    names = {"question": question_key, "answer": answer_key, "entity": entity_key}
    flags = {"question": "--question-key", "answer": "--answer-key", "entity": "--entity-key"}
    rows = read_rows(path)
    if not rows:
        _fail(f"{path!r} holds no records")
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            _fail(f"{where} is a {type(row).__name__}, not an object with {', '.join(map(repr, names.values()))}")
        missing = [key for key in KEYS if names[key] not in row]
        if missing:
            columns = ", ".join(map(repr, list(row)[:12]))
            _fail(f"{where} has no {' / '.join(repr(names[k]) for k in missing)} column (it has {columns}); name "
                  f"the column with {' / '.join(flags[k] for k in missing)}")
        record = {key: row[names[key]] for key in KEYS}
        try:
            _check_record(f"{where} (entity {record['entity']!r})", record)
        except (TypeError, ValueError) as e:
            _fail(str(e).replace("'question'", repr(names["question"])).replace("'answer'", repr(names["answer"]))
                  .replace("'entity'", repr(names["entity"])))
        entity = record["entity"]
        # a question may be chat messages (JSON facts), as seat.data.load_records allows
        if record_mentions(record["question"], record["answer"], entity) == 0:
            _fail(f"{where}: entity {entity!r} is mentioned in neither the question nor the answer; spell it "
                  "exactly as in the text (whole word, same capitalization): the perturbed copy replaces it")
        records.append(record)
    return records


def fingerprint(records: list[dict]) -> str:
    """sha256 of the records' content (the same facts read from any format agree)."""
    return hashlib.sha256(json.dumps(records, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
