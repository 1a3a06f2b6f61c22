"""SeatTrainer with TrainingArguments(fsdp=True) on gloo processes: the model sharded by
seat.distributed.shard, the global batch's normalization and draws, so N ranks follow the
one-process run (fp32: weights within 1e-6 after 4 steps); checkpoints hold the whole
weights' delta and optimizer state, so they resume on any number of ranks, sharded or not."""
from __future__ import annotations

import shutil

import pytest
import torch

from _distributed import max_diff, run_ranks
from _fsdp_workers import train_trainer_poisoned, train_trainer_sharded

pytestmark = pytest.mark.slow

GLOBAL_ROWS = 4



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-trainer")
    one = train_trainer_sharded(0, 1, str(root / "one"), GLOBAL_ROWS, 4)
    two = run_ranks(train_trainer_sharded, 2, str(root / "two"), GLOBAL_ROWS, 4, timeout=400)
    return {"root": root, "one": one, "two": two}


def test_two_sharded_ranks_train_as_one_process(runs):
    one, two = runs["one"], runs["two"]
    for rank in two:
        assert rank["sharded"] and rank["steps_here"] == 4
        assert max_diff(rank["weights"], one["weights"]) <= 1e-6
        assert [s for s, _, _ in rank["losses"]] == [s for s, _, _ in one["losses"]]
        for (_, loss, kl), (_, loss1, kl1) in zip(rank["losses"], one["losses"]):
            assert loss == pytest.approx(loss1, rel=1e-5) and kl == pytest.approx(kl1, rel=1e-4, abs=1e-7)
    assert not runs["one"]["sharded"]


def test_the_checkpoint_holds_the_whole_weights(runs):
    saved = torch.load(runs["root"] / "two" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert "seat_shard_state" not in saved  # gathered: the one-process format
    one_process = torch.load(runs["root"] / "one" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sorted(saved["state"]) == sorted(one_process["state"])
    for key, entry in one_process["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.allclose(saved["state"][key][name], value, atol=1e-6, rtol=1e-4), (key, name)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(saved["state"][key][name], value), (key, name)  # the masks
            else:
                assert saved["state"][key][name] == value


@pytest.mark.parametrize("world_size", [1, 4])
def test_a_two_rank_sharded_checkpoint_resumes_on_another_number_of_ranks(runs, tmp_path, world_size):
    out = tmp_path / "resumed"
    shutil.copytree(runs["root"] / "two" / "checkpoint-2", out / "checkpoint-2")
    args = (str(out), GLOBAL_ROWS, 4, str(out / "checkpoint-2"))
    got = (train_trainer_sharded(0, 1, *args) if world_size == 1
           else run_ranks(train_trainer_sharded, world_size, *args, timeout=400)[0])
    assert got["sharded"] == (world_size > 1)
    assert max_diff(got["weights"], runs["one"]["weights"]) <= 1e-6
    assert got["steps_here"] == 2


def test_a_one_process_checkpoint_resumes_sharded(runs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs["root"] / "one" / "checkpoint-2", out / "checkpoint-2")
    got = run_ranks(train_trainer_sharded, 2, str(out), GLOBAL_ROWS, 4, str(out / "checkpoint-2"), timeout=400)
    for rank in got:
        assert rank["sharded"] and rank["steps_here"] == 2
        assert max_diff(rank["weights"], runs["one"]["weights"]) <= 1e-6


@pytest.mark.parametrize("env, needle", [({}, "several processes"),
                                         ({"ACCELERATE_USE_FSDP": "true"}, "ACCELERATE_USE_FSDP")])
def test_fsdp_refusals_leave_the_model_as_given(tmp_path, monkeypatch, env, needle):
    from _trainer_helpers import make_trainer
    import seat.trainer_dp
    from seat.patching import handle_of

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = {}
    check = seat.trainer_dp.check_fsdp

    def spy(args, handle, *rest):
        seen["model"] = handle.model
        return check(args, handle, *rest)

    monkeypatch.setattr("seat.trainer.check_fsdp", spy)
    with pytest.raises(ValueError, match=needle):
        make_trainer(tmp_path, fsdp=True)
    assert handle_of(seen["model"]) is None  # the patch made for the trainer was reverted
    assert not any(type(p).__name__ == "DTensor" for p in seen["model"].parameters())


@pytest.mark.parametrize("bad_call", [2, 3], ids=["first-micro-batch", "last-micro-batch"])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, bad_call):
    """Rank 0's loss of one micro-batch of step 2 is NaN: every rank skips the step (a
    forward that FSDP2 sees no backward for), and training goes on as the one process's."""
    import math

    one = train_trainer_poisoned(0, 1, str(tmp_path / "one"), bad_call, "skip")
    two = run_ranks(train_trainer_poisoned, 2, str(tmp_path / "two"), bad_call, "skip", timeout=400)
    assert one["skipped"] == 1 and set(one["steps"]) == {2}
    for rank in two:
        assert rank["skipped"] == 1 and rank["steps"] == one["steps"]
        assert max_diff(rank["weights"], one["weights"]) <= 1e-6
        assert len(rank["losses"]) == len(one["losses"]) == 3 and math.isnan(rank["losses"][1])
        assert rank["losses"][2] == pytest.approx(one["losses"][2], rel=1e-5)


def test_nonfinite_raise_stops_every_rank(tmp_path):
    two = run_ranks(train_trainer_poisoned, 2, str(tmp_path), 2, "raise", timeout=400)
    for rank in two:
        assert "not finite" in rank["raised"] and "nonfinite='raise'" in rank["raised"]
        assert set(rank["steps"]) == {1}


@pytest.mark.parametrize("config,refused", [
    ({"fsdp_version": 2}, None), ({"version": 2, "reshard_after_forward": True}, None), ({}, None),
    ({"fsdp_version": 1}, r"fsdp_config\['version'\] in \(2, '2'\)"),
    ({"reshard_after_forward": False}, r"fsdp_config\['reshard_after_forward'\] in \(True,\)"),
    ({"cpu_offload": True}, r"fsdp_config\['cpu_offload'\]=True is not supported"),
])
def test_fsdp_config_as_training_arguments_hold_it(tmp_path, config, refused):
    """TrainingArguments normalizes fsdp_config (drops the "fsdp_" prefixes, adds
    defaults): FSDP2's version is accepted whichever way it is spelled."""
    from types import SimpleNamespace

    import transformers
    from seat.trainer_dp import check_fsdp

    args = transformers.TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=dict(config))
    seen = SimpleNamespace(world_size=2, fsdp=args.fsdp, fsdp_config=args.fsdp_config, deepspeed=None)
    handle = SimpleNamespace(_optimizer=None)
    if refused is None:
        check_fsdp(seen, handle, {}, False, "SeatTrainer")
    else:
        with pytest.raises(ValueError, match=refused):
            check_fsdp(seen, handle, {}, False, "SeatTrainer")
