"""Tampered, incomplete and foreign SeatTrainer checkpoints: a resume either continues
the run bit-exactly or is refused with ResumeMismatchError naming what is missing or
what differs, before anything is loaded (weights, optimizer state and the collator's
counter stay as they were, and a later good resume is still bit-exact)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _trainer_helpers import RECORDS, assert_params_equal, make_trainer, tokenizer, trained_params  # noqa: E402
from seat.delta import _format as delta_format  # noqa: E402
from seat.perturb import EntityPerturber  # noqa: E402
from seat.trainer_resume import ResumeMismatchError  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run "a" (6 steps, checkpoints at 3 and 6) with its final weights, and a checkpoint
    of a run "b" with another mask seed."""
    root = tmp_path_factory.mktemp("runs")
    trainer, model, _ = make_trainer(root / "a")
    trainer.train()
    other, _, _ = make_trainer(root / "b", seat_config=seat.SeatConfig(density=0.2, seed=1), max_steps=1,
                               save_steps=1)
    other.train()
    return {"a": root / "a" / "checkpoint-3", "b": root / "b" / "checkpoint-1", "final": trained_params(model)}


def _copy(runs, tmp_path):
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(runs["a"], checkpoint)
    return checkpoint


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _state(trainer, model, collator):
    opt = trainer.seat._optimizer
    return (trained_params(model), {id(p): (s["step"], s["exp_avg"].clone()) for p, s in opt.state.items()},
            collator.step)


def _assert_unchanged(before, trainer, model, collator):
    params, optimizer_state, step = before
    assert_params_equal(model, params)
    opt = trainer.seat._optimizer
    for p, s in opt.state.items():
        assert s["step"] == optimizer_state[id(p)][0] and torch.equal(s["exp_avg"], optimizer_state[id(p)][1])
    assert collator.step == step and trainer.nonfinite_skipped == 0


def _refused(tmp_path, checkpoint, match, **setup):
    trainer, model, collator = make_trainer(tmp_path / "out", **setup)
    before = _state(trainer, model, collator)
    with pytest.raises(ResumeMismatchError, match=match):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    _assert_unchanged(before, trainer, model, collator)
    return trainer, model


# ---------------------------------------------------------------------- another run

def _collator(**options):
    tok = tokenizer()
    perturber = EntityPerturber(exclude=[r["entity"] for r in RECORDS], seed=options.pop("perturber_seed", 1))
    return seat.PairedCollator(tok, perturber, **options)


ANOTHER_RUN = {
    "mask-seed": (dict(seat_config=seat.SeatConfig(density=0.2, seed=1)),
                  r"seat_config\.seed: checkpoint 0, this run 1 .*fix: build the SeatTrainer with the checkpoint's"),
    "density": (dict(seat_config=seat.SeatConfig(density=0.3)),
                r"seat_config\.density: checkpoint 0\.2, this run 0\.3"),
    "mask-encoding": (dict(seat_config=seat.SeatConfig(density=0.2, mask_encoding="block16")),
                      r"seat_config\.mask_encoding"),
    "optimizer-state-bits": (dict(trainer_kwargs=dict(optimizer_kwargs=dict(state_bits=8))),
                             r"optimizer\.state_bits: checkpoint 32, this run 8 .*optimizer_kwargs"),
    "learning-rate": (dict(learning_rate=1e-2), r"training_args\.learning_rate: checkpoint 0\.02, this run 0\.01"),
    "accumulation": (dict(gradient_accumulation_steps=1), r"training_args\.gradient_accumulation_steps"),
    "max-steps": (dict(max_steps=8), r"training_args\.max_steps.*seat\.load_delta"),
    "perturber-seed": (dict(collator=_collator(perturber_seed=2)),
                       r"collator\.perturber\.seed: checkpoint 1, this run 2"),
    "prompt-format": (dict(collator=_collator(prompt_format="Q: {question}\nA:")), r"collator\.prompt_format"),
    # every difference is named, section by section
    "several": (dict(seat_config=seat.SeatConfig(density=0.2, kl_weight=0.5),
                     trainer_kwargs=dict(optimizer_kwargs=dict(grad_dtype=torch.bfloat16)),
                     per_device_train_batch_size=1, max_grad_norm=0.5, data_seed=1,
                     collator=_collator(add_eos=False, max_length=60)),
                r"seat_config\.kl_weight.*optimizer\.grad_dtype.*training_args\.max_grad_norm.*"
                r"training_args\.data_seed.*training_args\.global_train_batch_size.*collator\.max_length.*"
                r"collator\.add_eos"),
}


@pytest.mark.parametrize("setup,match", ANOTHER_RUN.values(), ids=ANOTHER_RUN.keys())
def test_a_checkpoint_of_another_run_is_refused_naming_the_difference(runs, tmp_path, setup, match):
    _refused(tmp_path, runs["a"], match, **setup)


def test_other_masks_under_the_same_config_are_refused(runs, tmp_path):
    tok_model = make_trainer(tmp_path / "probe")[1]  # the weights' names and shapes
    q = "model.layers.1.self_attn.q_proj.weight"
    weight = dict(tok_model.named_parameters())[q]
    masks = {q: seat.masks.random_mask(weight, 0.2, seed=7)}
    _refused(tmp_path, runs["a"], rf"masks\.{q}.*fix: patch the model with the masks", masks=masks)


# ---------------------------------------------------------------------- missing pieces

MISSING = ["optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth", "seat_collator.json",
           "seat_run.json", "seat_delta"]


@pytest.mark.parametrize("piece", MISSING)
def test_a_checkpoint_missing_a_piece_is_refused(runs, tmp_path, piece):
    checkpoint = _copy(runs, tmp_path)
    path = checkpoint / piece
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    _refused(tmp_path, checkpoint, rf"cannot resume this run bit-exactly: {piece} is missing")


def test_a_missing_checkpoint_directory_is_refused(tmp_path):
    _refused(tmp_path, tmp_path / "nowhere", "is not a directory")


# ---------------------------------------------------------------------- tampered pieces

def _swap_from_b(name):
    def tamper(checkpoint, runs):
        target = checkpoint / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if (runs["b"] / name).is_dir() else shutil.copy)(runs["b"] / name, target)
    return tamper


def _write(name, text):
    return lambda checkpoint, runs: (checkpoint / name).write_text(text)


def _json(name, edit):
    return lambda checkpoint, runs: _edit_json(checkpoint / name, edit)


def _base_hash(meta):
    """Another base under the first weight's mask, resealed as seat would write it (so the
    check reached is the base comparison in load_delta, not the config checksum)."""
    weight = next(iter(meta["weights"].values()))
    weight["base_sha256"] = "0" * 64
    meta["config_sha256"] = delta_format.config_sha256(meta)


TAMPERED = {
    # the optimizer state of the other run: its masks are not this run's
    "optimizer-of-another-run": (_swap_from_b("optimizer.pt"), r"optimizer\.pt does not fit this run's optimizer"),
    "optimizer-garbage": (_write("optimizer.pt", "not a torch file"), r"optimizer\.pt does not fit"),
    "delta-of-another-run": (_swap_from_b("seat_delta"), r"seat_delta was not trained with this run's SeatConfig.*"
                                                         r"seat_config\.seed"),
    "delta-weights-garbage": (_write("seat_delta/delta.safetensors", "junk"), "is not a readable seat delta"),
    "delta-meta-garbage": (_write("seat_delta/seat_config.json", "{"), "is not a readable seat delta"),
    "delta-base-hash": (_json("seat_delta/seat_config.json", _base_hash), "base values"),
    "delta-config-unsealed": (_json("seat_delta/seat_config.json", lambda d: d.update(model_class="Other")),
                              "altered after it was saved"),
    "run-record-garbage": (_write("seat_run.json", "{"), r"seat_run\.json is not readable JSON"),
    "run-record-format": (_json("seat_run.json", lambda d: d.update(format="other")), "is not a seat-trainer-run"),
    "run-record-config": (_json("seat_run.json", lambda d: d["seat_config"].update(seed=5)),
                          r"seat_config\.seed: checkpoint 5, this run 0"),
    "run-record-skipped": (_json("seat_run.json", lambda d: d["nonfinite"].update(skipped=-1)),
                           r"nonfinite\.skipped must be an int >= 0"),
    "collator-state-garbage": (_write("seat_collator.json", "[1, 2"), r"seat_collator\.json is not readable JSON"),
    "collator-state-negative": (_json("seat_collator.json", lambda d: d.update(step=-3)),
                                r"seat_collator\.json: state\['step'\] must be an int >= 0"),
}


@pytest.mark.parametrize("tamper,match", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_checkpoint_is_refused_and_changes_nothing(runs, tmp_path, tamper, match):
    checkpoint = _copy(runs, tmp_path)
    tamper(checkpoint, runs)
    _refused(tmp_path, checkpoint, match)


def test_a_refused_resume_leaves_the_run_resumable_bit_exactly(runs, tmp_path):
    """The delta fails its base check after the optimizer state was loaded: both are
    rolled back, and the same trainer then resumes the good checkpoint bit-exactly."""
    bad = _copy(runs, tmp_path)
    _edit_json(bad / "seat_delta" / "seat_config.json", _base_hash)
    trainer, model = _refused(tmp_path, bad, "base values")
    trainer.train(resume_from_checkpoint=str(runs["a"]))
    assert_params_equal(model, runs["final"])
