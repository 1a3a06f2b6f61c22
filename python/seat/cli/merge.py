"""`seat merge`: a base model plus a seat delta, saved as one ordinary model folder.

The base is loaded in the delta's dtype, seat.load_delta writes the trained values
(checking every checksum, and that the base values under the masks are those the delta was
trained from), and the model is saved with save_pretrained (safetensors, sharded by
--max-shard-size) together with the base's tokenizer, so the folder loads with
AutoModelForCausalLM.from_pretrained. It is written into a temporary sibling folder and
renamed into place: OUTPUT_DIR is either absent (or empty) or the whole merged model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from ._options import UsageError
from ._rundir import ensure_writable

DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
MERGE_FILE = "seat_merge.json"


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge", help="write base model + delta as one model folder (from_pretrained loads it)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--model", required=True, metavar="DIR_OR_ID",
                        help="the base model the delta was trained from (folder or hub id in the local cache)")
    parser.add_argument("--delta", required=True, metavar="DIR",
                        help="a delta folder (OUTPUT_DIR/delta of `seat train`, or handle.save_delta)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="where the merged model goes: a new or empty folder")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="cast the merged model to this dtype before saving (default: the delta's dtype, "
                             "which the base is loaded in)")
    parser.set_defaults(command_main=main)
    return parser


def _shard_size(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except (ValueError, AttributeError):
        size = None
    if size is None or size <= 0:
        raise UsageError(f"argument --max-shard-size: {text!r} is not a size; give a positive whole number with a "
                         "unit, e.g. 5GB, 500MB or 2GiB")
    return size


def _check_output(path: str) -> None:
    if path == os.path.realpath(os.getcwd()):  # it would be removed and replaced under the shell that is in it
        raise UsageError("argument --output-dir: it is the current folder, which the merged model (renamed into "
                         "place) cannot replace; give a new folder, e.g. --output-dir merged")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"argument --output-dir: {path!r} exists and is not an empty folder; choose a new folder "
                         "(nothing there is overwritten)")
    ensure_writable(os.path.dirname(os.path.abspath(path)))  # the merged model is renamed into place from there


def _has_tokenizer(model: str) -> bool:
    if os.path.isdir(model):
        return any(os.path.exists(os.path.join(model, n)) for n in TOKENIZER_FILES)
    return True  # a hub id: try it (a missing one is skipped below)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..delta import DeltaMismatchError, load_delta, read_delta
    from .train import _check_model_folder

    max_shard = _shard_size(args.max_shard_size)
    # a symlink (even one to a folder not made yet): the model goes where it points, renamed into place there
    out = os.path.realpath(args.output_dir)
    _check_output(out)
    if not os.path.isdir(args.delta):
        raise UsageError(f"argument --delta: {args.delta!r} is not a folder; give a delta folder "
                         "(OUTPUT_DIR/delta of `seat train`)")
    for inner in ("delta", "seat_delta"):  # a `seat train` folder or one of its checkpoints, given for its delta
        if not os.path.exists(os.path.join(args.delta, "seat_config.json")) and \
                os.path.exists(os.path.join(args.delta, inner, "seat_config.json")):
            raise UsageError(f"argument --delta: {args.delta!r} is not a delta folder but holds one; give "
                             f"--delta {os.path.join(args.delta, inner)}")
    try:
        meta, _ = read_delta(args.delta)  # every checksum, before the model is loaded
    except (FileNotFoundError, DeltaMismatchError) as e:
        raise UsageError(f"argument --delta: {e}") from None
    config = _check_model_folder(args.model)
    architectures = getattr(config, "architectures", None) or []
    if architectures and meta["model_class"] not in architectures:
        raise UsageError(f"argument --delta: it was trained on a {meta['model_class']}, but --model {args.model!r} "
                         f"is a {', '.join(architectures)}; give the base model the delta was trained from")
    delta_dtypes = sorted({w["dtype"] for w in meta["weights"].values()})
    tokenizer = None
    if _has_tokenizer(args.model):
        import transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, TypeError) as e:
            if os.path.isdir(args.model):
                raise UsageError(f"argument --model: its tokenizer files do not load ({e}); fix or remove "
                                 "them") from None
            print(f"seat merge: no tokenizer loads from {args.model!r}; the merged folder has none")

    import torch
    import transformers
    from safetensors import SafetensorError

    load_dtype = getattr(torch, delta_dtypes[0]) if len(delta_dtypes) == 1 else "auto"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=load_dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise UsageError(f"argument --model: the weights of {args.model!r} do not load: {e}") from None
    try:
        load_delta(model, args.delta)
    except DeltaMismatchError as e:
        raise UsageError(f"argument --delta: it does not fit --model {args.model!r}: {e}") from None
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out))
    try:
        model.save_pretrained(tmp, max_shard_size=max_shard)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MERGE_FILE), "w", encoding="utf-8") as f:
            json.dump({"base": args.model, "delta": os.path.abspath(args.delta),
                       "delta_config_sha256": meta.get("config_sha256"), "seat_config": meta["config"],
                       "seat_version": meta.get("seat_version"), "dtype": str(model.dtype).replace("torch.", "")},
                      f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked); fails, keeping it, if something appeared there meanwhile
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trained = sum(w["nnz"] for w in meta["weights"].values())
    print(f"seat merge: {trained:,} trained entries of {len(meta['weights'])} weights merged into {out}")
    return 0
