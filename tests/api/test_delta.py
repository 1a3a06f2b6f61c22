"""Sparse deltas: save, load onto a fresh base bit-exactly, refuse the wrong base,
write atomically."""
from __future__ import annotations

import json

import pytest
import torch

import seat
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
