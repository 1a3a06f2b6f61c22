"""Sparse deltas: save, load onto a fresh base bit-exactly, refuse the wrong base,
write atomically, and never write over what is not a delta. (Faults during a save:
tests/reliability/test_delta_faults.py; damaged deltas: test_delta_tamper.py.)"""
from __future__ import annotations

import json

import pytest
import torch

import seat
from _delta_helpers import patched, step
from _models import paired_batch, tiny_model
from seat.delta import DeltaMismatchError

pytest.importorskip("safetensors")


def _trained(kind="llama", seed=0, dtype=torch.float32):
    model = tiny_model(kind, seed=seed, dtype=dtype)
    handle = seat.patch(model, density=0.1)
    opt = handle.optimizer(lr=1e-2)
    for step in range(2):
        handle.loss(paired_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, handle


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("qwen2", torch.bfloat16)])
def test_round_trip_is_bit_exact(tmp_path, kind, dtype):
    model, handle = _trained(kind, dtype=dtype)
    handle.save_delta(tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "seat_config.json").read_text())
    assert meta["config"]["density"] == 0.1 and len(meta["weights"]) == len(handle.targets)
    fresh = tiny_model(kind, dtype=dtype)
    seat.load_delta(fresh, tmp_path / "delta")
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_the_delta_is_small(tmp_path):
    _, handle = _trained()
    handle.save_delta(tmp_path / "d")
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert size < 8 * handle.num_trainable + 16_384  # 4 B index + 4 B value per entry, plus headers


def test_another_base_model_is_refused(tmp_path):
    _, handle = _trained()
    handle.save_delta(tmp_path / "d")
    other = tiny_model(seed=1)
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(DeltaMismatchError, match="base values under the mask differ"):
        seat.load_delta(other, tmp_path / "d")
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())  # nothing written
    with pytest.raises(DeltaMismatchError, match="trained on a LlamaForCausalLM"):
        seat.load_delta(tiny_model("gpt2"), tmp_path / "d")
    with pytest.raises(DeltaMismatchError, match="expects shape"):
        seat.load_delta(tiny_model(dtype=torch.bfloat16), tmp_path / "d")


def test_write_is_atomic(tmp_path, monkeypatch):
    _, handle = _trained()
    handle.save_delta(tmp_path / "d")
    good = (tmp_path / "d" / "delta.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        handle.save_delta(tmp_path / "d")
    assert (tmp_path / "d" / "delta.safetensors").read_bytes() == good  # the old delta is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left behind


def test_missing_files_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a seat delta"):
        seat.load_delta(tiny_model(), tmp_path / "empty")


def _trained_implicit(kind="llama", dtype=torch.float32, seed=0):
    model = tiny_model(kind, seed=seed, dtype=dtype)
    handle = seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding="implicit", seed=4))
    opt = handle.optimizer(lr=1e-2)
    for step in range(2):
        handle.loss(paired_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, handle


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("qwen2", torch.bfloat16)])
def test_implicit_mask_delta_round_trip_is_bit_exact(tmp_path, kind, dtype):
    """A delta of an implicit-mask run stores the masks' seeds, no indices, and reloads
    bit-exactly; the base-values check still guards it."""
    from safetensors.torch import load_file

    from seat.masks import ImplicitMask

    model, handle = _trained_implicit(kind, dtype)
    assert all(isinstance(t.idx, ImplicitMask) for t in handle.targets.values())
    handle.save_delta(tmp_path / "delta")
    meta = json.loads((tmp_path / "delta" / "seat_config.json").read_text())
    assert meta["format_version"] == 3 and meta["config"]["mask_encoding"] == "implicit"
    for name, info in meta["weights"].items():
        assert info["mask"] == handle.targets[name].idx.spec() and info["mask"]["seed"] == 4
    assert not any(k.startswith("idx/") for k in load_file(str(tmp_path / "delta" / "delta.safetensors")))
    fresh = tiny_model(kind, dtype=dtype)
    seat.load_delta(fresh, tmp_path / "delta")
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(DeltaMismatchError, match="base values under the mask differ"):
        seat.load_delta(tiny_model(kind, seed=1, dtype=dtype), tmp_path / "delta")


def test_implicit_mask_delta_is_values_only(tmp_path):
    _, handle = _trained_implicit()
    handle.save_delta(tmp_path / "d")
    size = (tmp_path / "d" / "delta.safetensors").stat().st_size
    assert size < 4 * handle.num_trainable + 16_384  # 4 B value per entry (fp32), no index


def test_implicit_and_int32_masks_train_the_same_model():
    """seat.patch with mask_encoding='implicit' and with the same entries as int32 indices
    (patch(masks=...)) give bit-identical weights after training."""
    a, handle = _trained_implicit()
    model = tiny_model("llama", seed=0)
    masks = {name: t.idx.indices() for name, t in handle.targets.items()}
    h2 = seat.patch(model, seat.SeatConfig(density=0.1, seed=4), masks=masks)
    opt = h2.optimizer(lr=1e-2)
    for step in range(2):
        h2.loss(paired_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for (n, p), (_, q) in zip(a.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    with h2.reference():  # the reference swap works on either form
        pass
    h2.revert()
    handle.revert()
    for (n, p), (_, q) in zip(a.named_parameters(), tiny_model("llama", seed=0).named_parameters()):
        assert torch.equal(p, q), n


def test_seat_config_mask_encoding():
    assert seat.SeatConfig().mask_encoding == "int32"
    with pytest.raises(ValueError, match="mask_encoding must be one of"):
        seat.SeatConfig(mask_encoding="uint16")
    with pytest.raises(ValueError, match="mask_encoding='implicit' stores a random mask"):
        seat.SeatConfig(mask="magnitude", mask_encoding="implicit")


@pytest.mark.parametrize("mask", ["random", "magnitude"])
def test_block16_masks_train_the_same_model_and_save_deltas(tmp_path, mask):
    from seat.masks import Block16Mask

    models = []
    for encoding in ("int32", "block16"):
        model = tiny_model("llama", seed=0)
        handle = seat.patch(model, seat.SeatConfig(density=0.1, mask=mask, mask_encoding=encoding))
        assert all(isinstance(t.idx, Block16Mask) == (encoding == "block16") for t in handle.targets.values())
        opt = handle.optimizer(lr=1e-2)
        for step in range(2):
            handle.loss(paired_batch(seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
        handle.save_delta(tmp_path / encoding)
        models.append(model)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(p, q), n
    fresh = tiny_model("llama", seed=0)
    seat.load_delta(fresh, tmp_path / "block16")
    for (n, p), (_, q) in zip(models[1].named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def _tree(path):
    """{relative path: bytes (files) or None (directories)} of everything under path."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def test_save_refuses_a_path_that_is_not_a_delta_and_leaves_it_untouched(tmp_path):
    _, handle = patched()
    run = tmp_path / "run"  # a run directory: checkpoints and notes, no delta
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")
    (run / "notes.txt").write_text("keep me")
    before = _tree(run)
    with pytest.raises(FileExistsError, match=f"{run}.*checkpoint-1, notes.txt.*new or empty directory"):
        handle.save_delta(run)
    assert _tree(run) == before
    (run / "file").write_text("a file")
    with pytest.raises(FileExistsError, match=f"{run / 'file'} exists and is not a directory"):
        handle.save_delta(run / "file")
    assert (run / "file").read_text() == "a file"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "seat_config.json").write_text("{not ours")
    with pytest.raises(FileExistsError, match="is not a seat delta's config"):
        handle.save_delta(tmp_path / "other")
    assert (tmp_path / "other" / "seat_config.json").read_text() == "{not ours"


def test_save_writes_into_an_empty_directory_and_replaces_a_delta(tmp_path):
    model, handle = patched()
    (tmp_path / "d").mkdir()
    step(handle, seed=0)
    handle.save_delta(tmp_path / "d")
    step(handle, seed=1)
    (tmp_path / "d" / ".seat-tmp-0123").write_bytes(b"left by a killed save")
    handle.save_delta(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["delta.safetensors", "seat_config.json"]
    fresh = tiny_model()
    seat.load_delta(fresh, tmp_path / "d")
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n


def test_a_format_2_delta_is_replaced_by_a_format_3_one(tmp_path):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parent / "data" / "v0ec13a8" / "delta-int32", tmp_path / "d")
    model, handle = patched()
    step(handle, seed=0)
    handle.save_delta(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "seat_config.json").read_text())
    assert meta["format_version"] == 3 and len(meta["config_sha256"]) == len(meta["weights_sha256"]) == 64
    assert all(len(info["values_sha256"]) == 64 for info in meta["weights"].values())
    fresh = tiny_model()
    seat.load_delta(fresh, tmp_path / "d")
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
