"""What seat wrote before the sparse-update ops were unified still loads and means the same:
deltas and optimizer checkpoints of a tiny Llama trained 2 steps in each mask encoding by
the code of commit 0ec13a8 (tests/api/data/v0ec13a8, made with that code; the hashes are
of every parameter's bytes after training).

Old files load bit for bit. Training the same 2 steps again agrees with the old weights to
float32 rounding, not bit for bit: the loss kernels now sum each row in double lanes and the
AdamW moments follow torch's lerp, which moves the last bit of some updates."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import seat
from _models import paired_batch, tiny_model

pytest.importorskip("safetensors")

DATA = Path(__file__).parent / "data" / "v0ec13a8"
ENCODINGS = ("int32", "implicit", "block16")
EXPECTED = json.loads((DATA / "weights_sha256.json").read_text())


def _hashes(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for n, p in model.named_parameters()}


def _patched(encoding):
    model = tiny_model("llama", seed=0)
    handle = seat.patch(model, seat.SeatConfig(density=0.1, mask_encoding=encoding, seed=3))
    return model, handle, handle.optimizer(lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_training_gives_the_same_weights_as_before(encoding):
    model, handle, opt = _patched(encoding)
    for step in range(2):
        handle.loss(paired_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    old = tiny_model("llama", seed=0)
    seat.load_delta(old, DATA / f"delta-{encoding}")
    assert _hashes(old) == EXPECTED[encoding]
    base = dict(tiny_model("llama", seed=0).named_parameters())
    for (name, new), (_, before) in zip(model.named_parameters(), old.named_parameters()):
        # An update is at most lr = 1e-2 per step; rounding moves it by a few float32 ulps.
        torch.testing.assert_close(new, before, rtol=0, atol=1e-6, msg=name)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert moved, "training changed no weight: the comparison above proves nothing"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_old_deltas_load_bit_exactly(encoding):
    model = tiny_model("llama", seed=0)
    seat.load_delta(model, DATA / f"delta-{encoding}")
    assert _hashes(model) == EXPECTED[encoding]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_old_optimizer_checkpoints_resume(encoding):
    """The old state loads into the new optimizer (masks compared on load) and steps on."""
    model, handle, opt = _patched(encoding)
    seat.load_delta(model, DATA / f"delta-{encoding}")
    opt.load_state_dict(torch.load(DATA / f"optimizer-{encoding}.pt", weights_only=True))
    assert all(s["step"] == 2 for s in opt.state.values())
    before = _hashes(model)
    handle.loss(paired_batch(seed=2)).loss.backward()
    opt.step()
    assert _hashes(model) != before and all(s["step"] == 3 for s in opt.state.values())
