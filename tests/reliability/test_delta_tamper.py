"""Tampered, corrupted and malformed deltas: every case raises DeltaMismatchError (or
FileNotFoundError when there is no delta) naming what is wrong, and leaves the model
bit-identical to before the failed load.

Edits "resealed" recompute every checksum after the edit, as a writer of bad deltas
would, so the checks behind the checksums are reached too."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import seat
from _delta_helpers import (flip_bit, patched, read_config, rewrite_tensors, same, snapshot, step, tensor_spans,
                            write_config)
from _models import tiny_model
from seat.delta import DeltaMismatchError

pytest.importorskip("safetensors")

LEGACY = Path(__file__).parents[1] / "api" / "data" / "v0ec13a8" / "delta-int32"
ENCODINGS = ("int32", "implicit")
W, C = "delta.safetensors", "seat_config.json"


@pytest.fixture(scope="module")
def deltas(tmp_path_factory):
    """A format 3 delta per mask encoding (stored indices; implicit-mask specs), a format
    2 one, the base model they load onto and its parameters."""
    root = tmp_path_factory.mktemp("deltas")
    for encoding in ENCODINGS:
        _, handle = patched(encoding)
        step(handle, seed=1)
        handle.save_delta(root / encoding)
    shutil.copytree(LEGACY, root / "format 2")
    base = tiny_model("llama", seed=0)
    return {"root": root, "base": base, "params": snapshot(base)}


class Case:
    """A copy of a template delta to tamper with, then load_delta refused."""

    def __init__(self, deltas, template: str):
        self.deltas = deltas
        self._tmp = tempfile.TemporaryDirectory()
        self.path = Path(self._tmp.name) / "delta"
        shutil.copytree(deltas["root"] / template, self.path)

    def refused(self, match: str | None, error=DeltaMismatchError, model=None, **load_kwargs) -> str:
        """load_delta raises `error` matching `match` (None: naming the delta's path) and
        writes nothing; its message."""
        model = self.deltas["base"] if model is None else model
        match = re.escape(str(self.path)) if match is None else match
        before = snapshot(model)
        try:
            with pytest.raises(error, match=match) as info:
                seat.load_delta(model, self.path, **load_kwargs)
            assert same(model, before), "a refused load wrote into the model"
            return str(info.value)
        finally:
            self._tmp.cleanup()

    def meta(self) -> dict:
        return read_config(self.path)


def _first(meta) -> str:
    return next(iter(meta["weights"]))


def _last(meta) -> str:
    """(a check failing at the last weight shows that nothing is written before all pass)"""
    return list(meta["weights"])[-1]


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_bit_flip_in_any_stored_tensor_is_caught_by_its_checksum(deltas, encoding):
    spans = tensor_spans(deltas["root"] / encoding / W)
    for key, (start, end) in spans.items():
        case = Case(deltas, encoding)
        # the highest exponent bit of a float32 value (1e-2 -> ~3e36), the low bit of an index
        flip_bit(case.path / W, start + 3, 6 if key.startswith("values/") else 0)
        message = case.refused("does not match its checksum")
        assert repr(key) in message and str(case.path / W) in message
    assert len(spans) == (28 if encoding == "int32" else 14)


@given(st.floats(0, 1, exclude_max=True), st.integers(0, 7), st.sampled_from((W, C)))
def test_a_bit_flip_anywhere_in_either_file_is_refused(deltas, where, bit, name):
    case = Case(deltas, "int32")
    size = (case.path / name).stat().st_size
    flip_bit(case.path / name, int(where * size), bit)
    case.refused(None)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m["weights"].pop(_first(m)), "altered after it was saved"),
    (lambda m: m.update(model_class="GPT2LMHeadModel"), "altered after it was saved"),
    (lambda m: m["config"].update(density=0.5), "altered after it was saved"),
    (lambda m: m.update(config_sha256="0" * 64), "altered after it was saved"),
    (lambda m: m.update(weights_sha256="0" * 64), "altered after it was saved"),
    (lambda m: m.update(config_sha256="xyz"), "must be a sha256"),
])
def test_a_config_edited_without_resealing_is_refused(deltas, edit, match):
    case = Case(deltas, "int32")
    meta = case.meta()
    edit(meta)
    write_config(case.path, meta, reseal=False)
    case.refused(match)


def test_files_of_two_saves_do_not_pair(deltas):
    """The config of one delta with the weights of another (same model, other values)."""
    case = Case(deltas, "int32")
    other = tempfile.mkdtemp()
    _, handle = patched("int32")
    step(handle, seed=2)
    handle.save_delta(Path(other) / "d")
    shutil.copy(Path(other) / "d" / W, case.path / W)
    shutil.rmtree(other)
    case.refused("does not match its checksum")


# ---------------------------------------------------------------- config edits (resealed)

CONFIG_EDITS = {
    "drop a weight": (lambda m: m["weights"].pop(_first(m)), "does not list"),
    "drop every weight": (lambda m: m["weights"].clear(), "lists no weights"),
    "add a weight": (lambda m: m["weights"].update({"lm_head.weight": m["weights"][_first(m)]}), "has no tensor"),
    "rename a weight": (lambda m: m.update(weights={k + ".x": v for k, v in m["weights"].items()}),
                        "has no tensor"),
    "shape of another numel": (lambda m: m["weights"][_first(m)].update(shape=[32, 33]), "expects shape"),
    "shape of the same numel": (lambda m: m["weights"][_first(m)].update(shape=[1024]), "expects shape"),
    "huge shape": (lambda m: m["weights"][_first(m)].update(shape=[10**30, 1]), "expects shape"),
    "negative shape": (lambda m: m["weights"][_first(m)].update(shape=[-32, -32]), "non-negative ints"),
    "shape not a list": (lambda m: m["weights"][_first(m)].update(shape="32x32"), "non-negative ints"),
    "shape of bools": (lambda m: m["weights"][_first(m)].update(shape=[True, 32]), "non-negative ints"),
    "other dtype": (lambda m: m["weights"][_first(m)].update(dtype="float16"), "needs float16"),
    "unknown dtype": (lambda m: m["weights"][_first(m)].update(dtype="float128"), "must name a torch dtype"),
    "dtype not a dtype": (lambda m: m["weights"][_first(m)].update(dtype="Tensor"), "must name a torch dtype"),
    "dtype a number": (lambda m: m["weights"][_first(m)].update(dtype=32), "must name a torch dtype"),
    "nnz + 1": (lambda m: m["weights"][_first(m)].update(nnz=m["weights"][_first(m)]["nnz"] + 1), "needs"),
    "nnz negative": (lambda m: m["weights"][_first(m)].update(nnz=-1), "'nnz' must be an int"),
    "nnz huge": (lambda m: m["weights"][_first(m)].update(nnz=10**30), "'nnz' must be an int"),
    "nnz a string": (lambda m: m["weights"][_first(m)].update(nnz="98"), "'nnz' must be an int"),
    "nnz a float": (lambda m: m["weights"][_first(m)].update(nnz=98.0), "'nnz' must be an int"),
    "nnz a bool": (lambda m: m["weights"][_first(m)].update(nnz=True), "'nnz' must be an int"),
    "no shape": (lambda m: m["weights"][_first(m)].pop("shape"), "has no 'shape'"),
    "no values checksum": (lambda m: m["weights"][_first(m)].pop("values_sha256"), "has no 'values_sha256'"),
    "no index checksum": (lambda m: m["weights"][_first(m)].pop("idx_sha256"), "exactly one of"),
    "unknown weight key": (lambda m: m["weights"][_first(m)].update(scale=2.0), "holds keys"),
    "base checksum of the last weight edited": (lambda m: m["weights"][_last(m)].update(base_sha256="1" * 64),
                                                "base values under the mask differ"),
    "base checksum not hex": (lambda m: m["weights"][_first(m)].update(base_sha256="zz"), "must be a sha256"),
    "weight entry a list": (lambda m: m["weights"].update({_first(m): [1, 2]}), "must be a JSON object"),
    "weights a list": (lambda m: m.update(weights=[1]), "'weights' must be a dict"),
    "config a list": (lambda m: m.update(config=[]), "'config' must be a dict"),
    "model class a number": (lambda m: m.update(model_class=5), "'model_class' must be a str"),
    "other model class": (lambda m: m.update(model_class="GPT2LMHeadModel"), "trained on a GPT2LMHeadModel"),
    "no model class": (lambda m: m.pop("model_class"), "has no 'model_class'"),
    "unknown top-level key": (lambda m: m.update(extra=1), "holds keys"),
    "other format": (lambda m: m.update(format="peft"), "is not a seat-delta file"),
    "format version 5": (lambda m: m.update(format_version=5), "is not one this seat reads"),
    "format version 4 without 4-bit weights": (lambda m: m.update(format_version=4), "marks a delta of 4-bit"),
    "format version a string": (lambda m: m.update(format_version="3"), "is not one this seat reads"),
    "format version a bool": (lambda m: m.update(format_version=True), "is not one this seat reads"),
    "format version 2 with checksums": (lambda m: m.update(format_version=2), "format_version was edited"),
    "format version 1 with checksums": (lambda m: m.update(format_version=1), "format_version was edited"),
    "no format version": (lambda m: m.pop("format_version"), "is not one this seat reads"),
}

IMPLICIT_EDITS = {
    "mask seed": (lambda m: m["weights"][_first(m)]["mask"].update(seed=99), "gives .* entries|base values"),
    "mask numel": (lambda m: m["weights"][_first(m)]["mask"].update(numel=7), "covers 7 elements"),
    "mask density out of range": (lambda m: m["weights"][_first(m)]["mask"].update(density=5.0), "is invalid"),
    "mask block a string": (lambda m: m["weights"][_first(m)]["mask"].update(block="x"), "is invalid"),
    "mask without its seed": (lambda m: m["weights"][_first(m)]["mask"].pop("seed"), "is invalid"),
    "mask of an unknown encoding": (lambda m: m["weights"][_first(m)]["mask"].update(encoding="zip"), "is invalid"),
    "mask a list": (lambda m: m["weights"][_first(m)].update(mask=[1]), "must be a mask spec"),
    "mask removed": (lambda m: m["weights"][_first(m)].pop("mask"), "exactly one of"),
}


@pytest.mark.parametrize("name", list(CONFIG_EDITS))
def test_a_resealed_config_edit_is_refused(deltas, name):
    edit, match = CONFIG_EDITS[name]
    case = Case(deltas, "int32")
    meta = case.meta()
    edit(meta)
    write_config(case.path, meta)
    assert str(case.path) in case.refused(match)


@pytest.mark.parametrize("name", list(IMPLICIT_EDITS))
def test_a_resealed_mask_spec_edit_is_refused(deltas, name):
    edit, match = IMPLICIT_EDITS[name]
    case = Case(deltas, "implicit")
    meta = case.meta()
    edit(meta)
    write_config(case.path, meta)
    case.refused(match)


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                     allow_infinity=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=6)


@given(st.sampled_from(["shape", "dtype", "nnz", "base_sha256", "values_sha256", "idx_sha256", "mask", "other"]),
       _json, st.sampled_from(ENCODINGS))
def test_any_json_value_in_any_weight_field_is_refused_cleanly(deltas, key, value, encoding):
    """Resealed: never a KeyError/TypeError/AttributeError, never a partial write."""
    case = Case(deltas, encoding)
    meta = case.meta()
    info = meta["weights"][_first(meta)]
    assume(key not in info or value != info[key])
    info[key] = value
    write_config(case.path, meta)
    case.refused(None)


@given(st.sampled_from(["format", "format_version", "model_class", "weights", "weights_sha256"]), _json)
def test_any_json_value_in_any_top_level_field_is_refused_cleanly(deltas, key, value):
    """(seat_version and config are informational: any str / dict loads.)"""
    case = Case(deltas, "int32")
    meta = case.meta()
    assume(value != meta[key])
    meta[key] = value
    write_config(case.path, meta)
    case.refused(None)


# ---------------------------------------------------------------- tensor edits (resealed)

def _swap_first_two(t):
    t = t.clone()
    t[[0, 1]] = t[[1, 0]]
    return t


def _on_first(kind, fn):
    def edit(tensors):
        key = next(k for k in tensors if k.startswith(kind + "/"))
        tensors[key] = fn(tensors[key])
        return tensors
    return edit


TENSOR_EDITS = {
    "indices unsorted": (_on_first("idx", _swap_first_two), "not sorted and unique"),
    "indices duplicated": (_on_first("idx", lambda t: torch.cat([t[:1], t[:-1]])), "not sorted and unique"),
    "index past the end": (_on_first("idx", lambda t: torch.cat([t[:-1], t.new_tensor([2**31 - 1])])), "outside"),
    "index negative": (_on_first("idx", lambda t: torch.cat([t.new_tensor([-1]), t[1:]])), "outside"),
    "indices int64": (_on_first("idx", lambda t: t.long()), "needs int32"),
    "values float16": (_on_first("values", lambda t: t.half()), "needs float32"),
    "values 2-D": (_on_first("values", lambda t: t[None]), "needs float32 of shape"),
    "values one short": (_on_first("values", lambda t: t[:-1]), "needs float32 of shape"),
    "indices removed": (lambda ts: {k: v for k, v in ts.items() if not k.startswith("idx/")}, "has no tensor"),
    "a tensor added": (lambda ts: {**ts, "values/lm_head.weight": torch.zeros(3)}, "does not list"),
    "a tensor renamed": (lambda ts: {k.replace("q_proj", "q_prj"): v for k, v in ts.items()}, "has no tensor"),
}


@pytest.mark.parametrize("name", list(TENSOR_EDITS))
def test_a_resealed_tensor_edit_is_refused(deltas, name):
    edit, match = TENSOR_EDITS[name]
    case = Case(deltas, "int32")
    rewrite_tensors(case.path, edit)
    message = case.refused(match)
    assert str(case.path / W) in message


@pytest.mark.parametrize("name", ["indices unsorted", "index past the end", "values float16", "a tensor added"])
def test_format_2_deltas_get_the_structural_checks(deltas, name):
    """Format 2 has no checksums; its tensors are still checked against its config."""
    edit, match = TENSOR_EDITS[name]
    case = Case(deltas, "format 2")
    rewrite_tensors(case.path, edit)
    case.refused(match)


def test_a_format_2_config_dropping_a_weight_is_refused(deltas):
    case = Case(deltas, "format 2")
    meta = case.meta()
    meta["weights"].pop(_first(meta))
    write_config(case.path, meta)
    case.refused("does not list")


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("name", [W, C])
@pytest.mark.parametrize("keep", ["nothing", "8 bytes", "half", "all but the last byte"])
def test_a_truncated_file_is_refused(deltas, name, keep):
    case = Case(deltas, "int32")
    raw = (case.path / name).read_bytes()
    length = {"nothing": 0, "8 bytes": 8, "half": len(raw) // 2, "all but the last byte": len(raw) - 1}[keep]
    (case.path / name).write_bytes(raw[:length])
    case.refused("not a readable safetensors|does not match|not valid JSON")


MALFORMED_CONFIGS = {
    "not JSON": (b"seat delta", "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "not UTF-8": (b'{"format": "\xff\xfe"}', "not valid JSON"),
    "NaN": (b'{"format": NaN}', "not valid JSON"),
    "a number out of range": (b'{"format": 1e999}', "not valid JSON"),
    "a 5000-digit integer": (b'{"format_version": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "a repeated key": (b'{"format": "seat-delta", "format": "seat-delta"}', "appears more than once"),
    "an array": (b"[1, 2]", "must hold a JSON object"),
    "a string": (b'"seat-delta"', "must hold a JSON object"),
    "null": (b"null", "must hold a JSON object"),
}


@pytest.mark.parametrize("name", list(MALFORMED_CONFIGS))
def test_a_malformed_config_is_refused(deltas, name):
    raw, match = MALFORMED_CONFIGS[name]
    case = Case(deltas, "int32")
    (case.path / C).write_bytes(raw)
    message = case.refused(match)
    assert str(case.path / C) in message


def test_a_huge_config_is_refused_unread(deltas):
    case = Case(deltas, "int32")
    with open(case.path / C, "r+b") as f:
        f.truncate(65 << 20)  # sparse: no disk used
    case.refused("more than a delta config holds")


def test_missing_files_and_directories(deltas):
    for missing in (W, C):
        case = Case(deltas, "int32")
        (case.path / missing).unlink()
        case.refused(f"{missing} is missing", FileNotFoundError)
    case = Case(deltas, "int32")
    shutil.rmtree(case.path)
    case.refused("does not exist", FileNotFoundError)


def test_files_and_directories_swapped(deltas):
    case = Case(deltas, "int32")
    shutil.rmtree(case.path)
    case.path.write_text("a file")
    case.refused("is a file, not a seat delta")
    for name in (W, C):
        case = Case(deltas, "int32")
        (case.path / name).unlink()
        (case.path / name).mkdir()
        case.refused("not a regular file")


def test_symlinks_out_of_the_directory_are_refused(deltas):
    for name in (W, C):
        case = Case(deltas, "int32")
        outside = case.path.parent / f"outside-{name}"
        shutil.move(case.path / name, outside)
        os.symlink(outside, case.path / name)
        case.refused("outside the delta directory")
    case = Case(deltas, "int32")
    (case.path / W).unlink()
    os.symlink(case.path / "nowhere", case.path / W)
    case.refused("broken symlink")


def test_a_symlink_within_the_directory_loads(deltas):
    case = Case(deltas, "int32")
    shutil.move(case.path / W, case.path / "weights")
    os.symlink("weights", case.path / W)
    model = tiny_model("llama", seed=0)
    seat.load_delta(model, case.path)
    assert not same(model, deltas["params"])


def test_an_uncommitted_pending_file_is_ignored(deltas):
    """What a save killed before its commit point leaves: the old delta loads."""
    case = Case(deltas, "int32")
    shutil.copy(deltas["root"] / "implicit" / W, case.path / "delta.safetensors.pending")
    expected = tiny_model("llama", seed=0)
    seat.load_delta(expected, deltas["root"] / "int32")
    model = tiny_model("llama", seed=0)
    seat.load_delta(model, case.path)
    assert same(model, snapshot(expected))


# ---------------------------------------------------------------- the model

def test_models_the_delta_does_not_fit(deltas):
    gpt2 = tiny_model("gpt2")
    Case(deltas, "int32").refused("trained on a LlamaForCausalLM", model=gpt2)
    Case(deltas, "int32").refused("which this model does not have", model=gpt2, strict_class=False)
    Case(deltas, "int32").refused("expects shape", model=tiny_model("llama", dtype=torch.bfloat16))
    Case(deltas, "int32").refused("base values under the mask differ", model=tiny_model("llama", seed=1))
    case = Case(deltas, "int32")
    model = tiny_model("llama", seed=0)
    weight = dict(model.named_parameters())[_last(case.meta())]
    weight.data = weight.data.t().contiguous().t()  # the same values, column-major
    case.refused("not contiguous", model=model)
