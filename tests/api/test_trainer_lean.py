"""SeatTrainer and handle.optimizer with the lean SparseAdamW modes: options pass
through, incompatible TrainingArguments are refused, optimizer-in-backward trains the same
trajectory as the default mode, lean checkpoints resume bit-exactly, and a non-finite
loss never reaches an update applied during backward."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import seat  # noqa: E402
from _trainer_helpers import assert_params_equal, make_trainer, trained_params  # noqa: E402

LEAN_ARGS = dict(gradient_accumulation_steps=1, max_grad_norm=0.0)


def _setup(tmp_path, optimizer_kwargs=None, **arg_overrides):
    trainer, model, _ = make_trainer(tmp_path, trainer_kwargs=dict(optimizer_kwargs=optimizer_kwargs),
                                     **{**LEAN_ARGS, **arg_overrides})
    return trainer, model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_update_in_backward_trains_the_default_trajectory(tmp_path, checkpointing):
    """With a linear LR schedule: the update of step t runs in backward t with the lr the
    scheduler set after step t-1, as the default mode's step() t does. With gradient
    checkpointing too: a weight is updated only after its gradient is complete, so the
    recomputed forward of every segment still sees the old weights."""
    default, model_a = _setup(tmp_path / "a", gradient_checkpointing=checkpointing)
    default.train()
    lean, model_b = _setup(tmp_path / "b", optimizer_kwargs=dict(update_in_backward=True),
                           gradient_checkpointing=checkpointing)
    assert lean.seat._optimizer.update_in_backward and lean.seat._optimizer._grads == {}
    lean.train()
    assert model_b.is_gradient_checkpointing == checkpointing
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(p, q) for p, q in zip(model_b.parameters(), _setup(tmp_path / "c")[1].parameters()))


@pytest.mark.parametrize("overrides, match", [
    (dict(gradient_accumulation_steps=2), r"set gradient_accumulation_steps=1 \(got 2"),
    (dict(max_grad_norm=1.0), r"set max_grad_norm=0 in TrainingArguments \(got 1.0\)"),
])
def test_update_in_backward_refuses_accumulation_and_clipping(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        _setup(tmp_path, optimizer_kwargs=dict(update_in_backward=True), **overrides)


def test_lean_checkpoint_resumes_bit_exactly(tmp_path):
    lean = dict(update_in_backward=True, state_bits=8, grad_dtype=torch.bfloat16)
    trainer, model = _setup(tmp_path / "a", optimizer_kwargs=lean)
    trainer.train()
    assert trainer.seat._optimizer.state[model.model.layers[0].self_attn.q_proj.weight]["exp_avg"].dtype == torch.uint8
    uninterrupted = trained_params(model)
    resumed_trainer, resumed = _setup(tmp_path / "a", optimizer_kwargs=lean)
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert_params_equal(resumed, uninterrupted)


def test_update_in_backward_skips_a_nonfinite_loss_before_its_update(tmp_path):
    """The update runs inside backward: the loss must be checked before it. Step 2's NaN
    loss leaves the weights as step 1 left them; step 3 trains on."""
    trainer, model = _setup(tmp_path, optimizer_kwargs=dict(update_in_backward=True), max_steps=3, save_steps=100)
    after = []
    trainer.add_callback(type("Snap", (transformers.TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: after.append(trained_params(model))})())
    loss_fn, calls = trainer.seat.loss, []

    def poisoned(batch, **kwargs):
        out = loss_fn(batch, **kwargs)
        calls.append(None)
        if len(calls) == 2:
            out.loss = out.loss * float("inf")
        return out

    trainer.seat.loss = poisoned
    with pytest.warns(RuntimeWarning, match="optimizer step 2 is"):
        trainer.train()
    assert_params_equal(model, after[2])
    for name in after[0]:
        assert torch.equal(after[1][name], after[0][name]), name
        assert torch.isfinite(after[2][name]).all(), name
    assert any(not torch.equal(after[2][n], after[1][n]) for n in after[0])
    assert trainer.nonfinite_skipped == 1


def test_handle_optimizer_passes_lean_options_through():
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    handle = seat.patch(model, seat.SeatConfig(density=0.5))
    opt = handle.optimizer(lr=1e-3, grad_dtype=torch.bfloat16, state_bits=8, update_in_backward=True)
    assert opt.grad_dtype == torch.bfloat16 and opt.state_bits == 8 and opt.update_in_backward
    assert all(opt.state[t.param]["exp_avg"].dtype == torch.uint8 for t in handle.targets.values())
    handle.unpatch()
